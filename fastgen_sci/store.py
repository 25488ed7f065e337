"""Ensemble stores: `write_ensemble` computes a lazy ensemble (ensemble.generate_ensemble) one block at a time
into a resumable Zarr store (and, for `.nc`, converts it once complete); `open_ensemble` refuses unfinished
stores; `write_dataset` writes eager samples [N, M, ...] atomically.

Store markers (a `.zarr` written here):
* root attributes `fastgen_status` ("incomplete" until the last block is written, then "complete") and
  `fastgen_fingerprint` (JSON: variables with dims, shape, dtype and chunks; coordinate hashes; attributes);
* while incomplete, one empty file `.fastgen/blocks/<i>.<j>` per finished block (member chunk i, case
  chunk j), created after that block's data; the `.fastgen` folder is removed once the store is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm


class EnsembleStoreError(ValueError):
    """An ensemble store that is incomplete, or that belongs to a different run than the one writing it."""


def write_ensemble(ds, path: str | os.PathLike, *, resume: bool = True,
                   to_netcdf: Callable | None = None, progress: bool = True) -> Path:
    """Compute and write an ensemble one block at a time; a rerun resumes where a crash stopped.

    `.zarr`: region writes per block, a marker after each; `.nc`: the same into `<path>.partial.zarr`, then
    `to_netcdf(ds_complete, tmp_path)` (default `ds.to_netcdf`), renamed into place. A store from a
    different run (variables, shape, chunks, coordinates or attributes differ) is refused unless
    resume=False, which starts over.
    """
    path = Path(path)
    if path.suffix == ".zarr":
        _write_zarr(ds, path, resume=resume, progress=progress)
        return path
    if path.suffix != ".nc":
        raise ValueError(f"output '{path}' must end in .zarr or .nc")
    _check_netcdf_attrs(ds)  # now, not after the sampling: attributes are part of the run's fingerprint
    sidecar = path.with_name(path.name + ".partial.zarr")
    if path.exists():
        if not resume:
            path.unlink()  # a stale complete file must not outlive a crash of the run replacing it
        elif _nc_fingerprint(path) == _fingerprint(ds):
            shutil.rmtree(sidecar, ignore_errors=True)
            return path
        else:
            raise EnsembleStoreError(f"{path} exists and was not written by this run (fingerprint differs or is "
                                     "missing); choose another path or pass resume=False to overwrite it")
    _write_zarr(ds, sidecar, resume=resume, progress=progress)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    (to_netcdf or _default_to_netcdf)(open_ensemble(sidecar), tmp)
    os.replace(tmp, path)
    shutil.rmtree(sidecar)
    return path


def open_ensemble(path: str | os.PathLike, **kwargs):
    """Open a written ensemble (lazily), refusing one whose generation has not finished."""
    import xarray as xr

    path = Path(path)
    sidecar = path.with_name(path.name + ".partial.zarr")
    if path.suffix == ".nc" and not path.exists() and sidecar.exists():
        raise EnsembleStoreError(f"{path} is not written yet: its generation stopped at "
                                 f"{_progress_line(sidecar)}. {_resume_hint(path)}")
    if not path.exists():
        raise FileNotFoundError(f"no ensemble at {path}")
    if path.suffix == ".nc":
        return xr.open_dataset(path, **kwargs)
    status = _store_attrs(path).get("fastgen_status", "complete")  # a store not written here has none
    if status != "complete":
        raise EnsembleStoreError(f"{path} is an incomplete ensemble ({_progress_line(path)}). {_resume_hint(path)}")
    with _quiet_zarr():
        return xr.open_zarr(path, **kwargs)


def _write_zarr(ds, path: Path, *, resume: bool, progress: bool) -> None:
    """Create the store once, then compute and region-write each unfinished block, marking it after."""
    member_dim, case_dim = _block_dims(ds)
    fingerprint = _fingerprint(ds)
    if path.exists() and not resume:
        _remove_store(path)
    if path.exists():
        if _check_store(path, fingerprint) == "complete":
            shutil.rmtree(path / ".fastgen", ignore_errors=True)
            return
    else:
        with _quiet_zarr():
            ds.assign_attrs(fastgen_status="incomplete", fastgen_fingerprint=json.dumps(fingerprint)).to_zarr(
                path, mode="w-", compute=False)  # metadata and coordinates only: no block is sampled
    markers = path / ".fastgen" / "blocks"
    markers.mkdir(parents=True, exist_ok=True)
    done = set(os.listdir(markers))
    blocks = _block_regions(ds, member_dim, case_dim)
    todo = [(key, region) for key, region in blocks if key not in done]
    data = ds.drop_vars(list(ds.coords))  # coordinates were written with the metadata
    bar = tqdm(todo, total=len(blocks), initial=len(blocks) - len(todo), desc=f"write {path.name}", unit="block",
               disable=not progress, leave=False)
    for key, region in bar:
        block = data.isel(region).compute(scheduler="synchronous")  # the one block in memory
        with _quiet_zarr():
            block.to_zarr(path, region=region, mode="r+", consolidated=False)
        (markers / key).touch()  # after the data: a marked block is a written block
        del block  # not held while the next one is computed
    _mark_complete(path)


def _block_dims(ds) -> tuple[str, str]:
    """The (member, case) dims: the two leading dims, shared by every data variable."""
    leading = {v.dims[:2] for v in ds.data_vars.values()}
    if len(leading) != 1 or len(next(iter(leading))) != 2:
        raise ValueError(f"an ensemble's data variables must all start with dims (member, case, ...); got "
                         f"{sorted(leading)}")
    return next(iter(leading))


def _block_regions(ds, member_dim: str, case_dim: str) -> list[tuple[str, dict[str, slice]]]:
    """(marker name '<i>.<j>', region) of every block: member chunk i, case chunk j."""
    chunks = ds.chunks or {}

    def bounds(dim):
        sizes = chunks.get(dim, (ds.sizes[dim],))
        stops = np.cumsum(sizes)
        return [slice(int(b - s), int(b)) for s, b in zip(sizes, stops)]

    return [(f"{i}.{j}", {member_dim: m, case_dim: c})
            for i, m in enumerate(bounds(member_dim)) for j, c in enumerate(bounds(case_dim))]


def _fingerprint(ds) -> dict[str, str]:
    """What a store must share with a run to be resumed by it: layout, chunks, coordinates, attributes."""
    fp = {}
    for name, v in ds.data_vars.items():
        chunks = tuple(c[0] for c in v.chunks) if v.chunks else v.shape
        fp[f"variable {name}"] = f"dims {v.dims} shape {v.shape} dtype {v.dtype} chunks {chunks}"
    for name, c in ds.coords.items():
        values = np.asarray(c.values)
        raw = values.tobytes() if values.dtype != object else repr(values.tolist()).encode()
        fp[f"coordinate {name}"] = f"dims {c.dims} {values.dtype} sha1 {hashlib.sha1(raw).hexdigest()[:16]}"
    for key, value in ds.attrs.items():
        if key not in ("fastgen_status", "fastgen_fingerprint"):
            fp[f"attribute {key}"] = json.dumps(value, sort_keys=True, default=_jsonable)
    return fp


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)  # numpy arrays and scalars; anything else as text


def _check_store(path: Path, fingerprint: dict[str, str]) -> str:
    """The status of an existing store this run may resume; raises if it belongs to another run."""
    attrs = _store_attrs(path)
    if "fastgen_fingerprint" not in attrs:
        raise EnsembleStoreError(f"{path} exists and is not an ensemble store written by fastgen-sci; choose "
                                 "another path or pass resume=False to overwrite it")
    stored = json.loads(attrs["fastgen_fingerprint"])
    diff = [f"  {k}: store has {stored.get(k, '(absent)')}, this run has {fingerprint.get(k, '(absent)')}"
            for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
    if diff:
        raise EnsembleStoreError(f"{path} was written by a different run, so it cannot be resumed:\n"
                                 + "\n".join(diff) + "\nRerun with the same settings, or pass resume=False to "
                                 "start over (this deletes the store).")
    return attrs.get("fastgen_status", "incomplete")


def _store_attrs(path: Path) -> dict:
    import zarr
    try:
        with _quiet_zarr():
            return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as e:  # missing or half-created metadata
        raise EnsembleStoreError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e}); pass "
                                 "resume=False to overwrite it") from None


def _mark_complete(path: Path) -> None:
    import zarr
    with _quiet_zarr():
        zarr.open_group(str(path), mode="r+").attrs["fastgen_status"] = "complete"
        zarr.consolidate_metadata(str(path))
    shutil.rmtree(path / ".fastgen")


def _remove_store(path: Path) -> None:
    if not any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs")):
        raise EnsembleStoreError(f"will not delete {path}: it is not a Zarr store; choose another output path")
    shutil.rmtree(path)


def _progress_line(store: Path) -> str:
    """'k of n blocks written' of an incomplete store."""
    import zarr
    markers = store / ".fastgen" / "blocks"
    done = len(os.listdir(markers)) if markers.is_dir() else 0
    with _quiet_zarr():
        group = zarr.open_group(str(store), mode="r")
        var = next(k.split(" ", 1)[1] for k in json.loads(group.attrs["fastgen_fingerprint"]) if k.startswith("var"))
        a = group[var]  # a data variable: all share the block grid
    return f"{done} of {np.prod([-(-n // c) for n, c in zip(a.shape[:2], a.chunks[:2])])} blocks written"


def _resume_hint(path: Path) -> str:
    return (f"Finish it by rerunning the same generation with resume=True (write_ensemble(ds, '{path}')), "
            "or pass resume=False to start over.")


def _nc_fingerprint(path: Path) -> dict | None:
    """The fingerprint a finished .nc carries in its root attributes, if its layout writer kept it."""
    import xarray as xr
    with xr.open_dataset(path) as f:
        raw = f.attrs.get("fastgen_fingerprint")
    return json.loads(raw) if raw else None


def _check_netcdf_attrs(ds) -> None:
    for where, attrs in [("dataset", ds.attrs), *((f"variable {k!r}", v.attrs) for k, v in ds.variables.items())]:
        for key, value in attrs.items():
            if not isinstance(value, (str, int, float, np.number, np.ndarray, list, tuple)):
                raise ValueError(f"{where} attribute {key!r} = {value!r} cannot be stored in netCDF; use a string, "
                                 "a number or a list of them")


def _default_to_netcdf(ds, path: Path) -> None:
    """`ds.to_netcdf`, keeping only the encodings netCDF understands (time units), not Zarr's."""
    ds = ds.copy()
    for v in ds.variables.values():
        v.encoding = {k: v.encoding[k] for k in ("units", "calendar", "dtype") if k in v.encoding}
    ds.to_netcdf(path)


@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr's notes about the `.fastgen` marker folder and v3 consolidated metadata."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def write_dataset(samples: Tensor, path: str, *, name: str = "sample") -> Path:
    """Samples [N, M, ...] as an xarray variable (case, member, dim_0, ...) in .zarr or .nc, written atomically."""
    import xarray as xr

    path = Path(path)
    if path.suffix not in (".zarr", ".nc"):
        raise ValueError(f"output '{path}' must end in .zarr or .nc")
    dims = ("case", "member", *(f"dim_{i}" for i in range(samples.ndim - 2)))
    ds = xr.Dataset({name: (dims, samples.numpy())})
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    ds.to_zarr(tmp, mode="w") if path.suffix == ".zarr" else ds.to_netcdf(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
