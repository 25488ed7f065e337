"""Ensemble generation: member k of case c is drawn from its own random stream, whatever the batching.

`generate_ensemble` describes an ensemble as a lazy xarray Dataset (member, case, *event dims) whose dask
blocks call a `sample_block(case_ids, member_ids)`; `write_ensemble` computes it one block at a time into
a resumable Zarr store (and, for `.nc`, converts it once complete); `open_ensemble` refuses unfinished stores.

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
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .registry import EvalCases
from .rng import MemberRNG
from .samplers import SamplerSpec

SampleBlock = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (case ids, member ids) -> [Nc, Nm, V, *shape]
Decode = Callable[[Tensor, Tensor], Tensor]  # (x [B, *model shape], case ids [B]) -> [B, V, *shape]


class EnsembleStoreError(ValueError):
    """An ensemble store that is incomplete, or that belongs to a different run than the one writing it."""


def member_batches(n_cases: int, members: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """(case ids, member ids) of each batch, walking cases then members; [B] each."""
    case = torch.arange(n_cases).repeat_interleave(members)
    member = torch.arange(members).repeat(n_cases)
    return list(zip(case.split(batch_size), member.split(batch_size)))


@torch.no_grad()
def _draw(denoiser: Denoiser, sampler: SamplerSpec, cases: EvalCases, case_ids: Tensor, member_ids: Tensor, *,
          seed: int, device: torch.device | str) -> Tensor:
    """Member (case_ids[b], member_ids[b]) from its own stream (seed, case, member); [B, *shape] on device."""
    rng = MemberRNG(seed, case_ids.tolist(), member_ids.tolist(), device=device)
    cond = cases.cond_rows(case_ids)
    cond = None if cond is None else {k: v.to(device) for k, v in cond.items()}
    return sampler(denoiser, rng.randn(*cases.shape), cond, randn_like=rng.randn_like)


@torch.no_grad()
def sample_ensemble(denoiser: Denoiser, sampler: SamplerSpec, cases: EvalCases, members: int, *, seed: int = 0,
                    batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                    desc: str = "sample") -> Tensor:
    """Draw `members` samples for each case; returns [N, M, *shape] on the CPU."""
    out = torch.empty(cases.n, members, *cases.shape)
    batches = member_batches(cases.n, members, batch_size)
    for case_ids, member_ids in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x = _draw(denoiser, sampler, cases, case_ids, member_ids, seed=seed, device=device)
        out[case_ids, member_ids] = x.float().cpu()
    return out


@dataclass
class MemberSampler:
    """A `sample_block` for `generate_ensemble`: each member drawn exactly as `sample_ensemble` draws it.

    Args:
        decode: model space -> physical variables, `(x [B, *cases.shape], case_ids [B]) -> [B, V, *shape]`
            (e.g. denormalise, add a regression mean); None keeps model space, so cases.shape = (V, *shape).
    """

    denoiser: Denoiser
    sampler: SamplerSpec
    cases: EvalCases
    seed: int = 0
    batch_size: int = 256
    device: torch.device | str = "cpu"
    decode: Decode | None = None

    @torch.no_grad()
    def __call__(self, case_ids: np.ndarray, member_ids: np.ndarray) -> np.ndarray:
        """[len(case_ids), len(member_ids), V, *shape] float32."""
        c = torch.as_tensor(np.asarray(case_ids, np.int64)).repeat_interleave(len(member_ids))
        m = torch.as_tensor(np.asarray(member_ids, np.int64)).repeat(len(case_ids))
        out = []
        for cb, mb in zip(c.split(self.batch_size), m.split(self.batch_size)):
            x = _draw(self.denoiser, self.sampler, self.cases, cb, mb, seed=self.seed, device=self.device)
            x = x if self.decode is None else self.decode(x, cb.to(x.device))
            out.append(x.float().cpu().numpy())
        x = np.concatenate(out)  # [Nc * Nm, V, *shape]
        return x.reshape(len(case_ids), len(member_ids), *x.shape[1:])

    @property
    def attrs(self) -> dict:
        """Provenance for `generate_ensemble(attrs_global=...)`."""
        return {"seed": self.seed, "sampler": repr(self.sampler), "sampler_nfe": self.sampler.nfe}


def generate_ensemble(sample_block: SampleBlock, *, cases: int, members: int, variables: Sequence[str],
                      shape: tuple[int, ...], dims: Sequence[str] = ("y", "x"), coords: Mapping | None = None,
                      attrs: Mapping[str, Mapping] | None = None, attrs_global: Mapping | None = None,
                      case_dim: str = "time", member_dim: str = "member", chunks: tuple[int, int] | None = None,
                      dtype=np.float32):
    """An ensemble as a lazy, dask-backed xarray Dataset: nothing is sampled until a block is computed.

    Each variable has dims (member, case, *dims). The (case, member) grid is cut into blocks of
    `chunks = (cases per block, members per block)`; computing a block calls
    `sample_block(case_ids, member_ids) -> [n_cases, n_members, n_vars, *shape]` once, for all variables
    together (one dask array [member, case, var, *shape], split lazily). Anything that computes a subset
    (`ds.isel(time=3).mean("member").compute()`) samples only the blocks it touches; with per-member
    seeding (`MemberSampler`, `MemberRNG`) the values do not depend on `chunks`. Compute variables
    together (`ds.compute()`, `ds[["u", "v"]]`): computing them one by one samples each block again.

        s = MemberSampler(student, SamplerSpec("few_step"), cases, seed=0, decode=to_physical)
        ds = generate_ensemble(s, cases=cases.n, members=100, variables=["t2m", "u10"], shape=(448, 448),
                               coords={"time": times, "lat": (("y", "x"), lat)}, attrs={"t2m": {"units": "K"}},
                               attrs_global=s.attrs, chunks=(1, 25))
        write_ensemble(ds, "out.zarr")  # resumable; or "out.nc"

    Args:
        coords: xarray coordinates, e.g. {"time": times, "lat": (("y", "x"), lat)}; `member` is added.
        attrs: per-variable attributes (units, long_name).
        attrs_global: dataset attributes (seed, sampler, ...); fastgen_version, members and cases are added.
        chunks: (cases, members) per block; default one case with all its members.
    """
    import dask.array as da
    import xarray as xr

    from . import __version__

    shape, variables = tuple(shape), list(variables)
    if len(dims) != len(shape):
        raise ValueError(f"generate_ensemble: dims {tuple(dims)} do not name the {len(shape)} axes of shape {shape}")
    cc, mc = chunks or (1, members)
    if cc < 1 or mc < 1:
        raise ValueError(f"generate_ensemble: chunks {chunks} must be positive (cases per block, members per block)")

    def block(member_ids: np.ndarray, case_ids: np.ndarray) -> np.ndarray:
        x = np.asarray(sample_block(case_ids, member_ids))
        want = (len(case_ids), len(member_ids), len(variables), *shape)
        if x.shape != want:
            raise ValueError(f"sample_block returned shape {x.shape} for {want[0]} cases x {want[1]} members; "
                             f"expected {want} = (cases, members, variables {variables}, *shape)")
        return np.ascontiguousarray(x.swapaxes(0, 1), dtype=dtype)  # [Nm, Nc, V, *shape]

    event = "".join(chr(ord("a") + i) for i in range(len(shape)))  # index letters of the event axes
    x = da.blockwise(block, "mcv" + event, da.arange(members, chunks=mc), "m", da.arange(cases, chunks=cc), "c",
                     new_axes={"v": len(variables), **dict(zip(event, shape))}, dtype=dtype,
                     meta=np.empty((0,) * (3 + len(shape)), dtype), name=f"fastgen-ensemble-{uuid.uuid4().hex}")
    var_dims = (member_dim, case_dim, *dims)
    attrs = attrs or {}
    ds = xr.Dataset({v: (var_dims, x[:, :, i], dict(attrs.get(v, {}))) for i, v in enumerate(variables)},
                    coords={member_dim: np.arange(members), **(coords or {})})
    provenance = {"fastgen_version": __version__, "members": members, "cases": cases}
    return ds.assign_attrs({**provenance, **(attrs_global or {})})


# --- writing ------------------------------------------------------------------------------------------------

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
