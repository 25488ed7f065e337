"""Writers for CorrDiff's formats: the default benchmark dataset (HRRR-mini netCDF4 + stats.json), CWB-style
consolidated Zarr v2 stores, CorrDiff's generate netCDF (groups input / truth / prediction) and stats.json.

Every writer is atomic: it writes under a temporary sibling name (atomic_path) and renames it over the target
only on success; on any error the temporary is removed, so no reader ever sees a half-written file.
write_default_dataset deletes an old data file before it replaces stats.json: a crash never pairs old data with
new stats.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import netCDF4
import numpy as np
import xarray as xr

from .benchmark import VARIABLES, DownscalingBenchmark
from .data import DownscalingData, GridError, _stats_dict, moments
from .readers import open_dataset
from .terrain import STEP_DEG, SIZE, load_terrain

ATTRS = {  # CF attributes of the variables this pack writes
    "t2m": {"units": "K", "standard_name": "air_temperature", "long_name": "2 m air temperature"},
    "u10": {"units": "m s-1", "standard_name": "eastward_wind", "long_name": "10 m eastward wind"},
    "v10": {"units": "m s-1", "standard_name": "northward_wind", "long_name": "10 m northward wind"},
    "elevation": {"units": "m", "standard_name": "surface_altitude", "long_name": "surface elevation, ocean 0"},
    "land_fraction": {"units": "1", "standard_name": "land_area_fraction", "long_name": "land fraction"},
}


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary sibling of path; on success it replaces path, on any error it is removed."""
    tmp, old = (path.with_name(f".{path.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    _remove(tmp), _remove(old)
    try:
        yield tmp
        if path.is_dir():  # os.replace cannot overwrite a non-empty directory: move it aside first
            os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def write_stats(path: str | Path, stats: Mapping) -> Path:
    """stats.json, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return path


def _cf_time(time: np.ndarray) -> tuple[np.ndarray, dict]:
    """Numbers and CF attributes for a time axis (datetime64 -> hours since the first time)."""
    time = np.asarray(time)
    if not np.issubdtype(time.dtype, np.datetime64):
        return time.astype(np.float64), {"units": "1", "long_name": "time index"}
    t0 = time[0].astype("datetime64[s]")
    units = f"hours since {str(t0).replace('T', ' ')}"
    return (time - t0) / np.timedelta64(1, "h"), {"units": units, "calendar": "standard", "standard_name": "time"}


def put_variable(group, name: str, values: np.ndarray, dims: tuple[str, ...], *, dtype: str = "f4",
                 attrs: Mapping | None = None) -> None:
    """One compressed netCDF4 variable with CF attributes; [..., T, H, W] is chunked ~2**16 values along T."""
    values = np.asarray(values)
    chunks = None
    if values.ndim >= 3:
        T, H, W = values.shape[-3:]
        chunks = [1] * (values.ndim - 3) + [max(1, min(T, 2**16 // (H * W))), H, W]
    var = group.createVariable(name, dtype, dims, zlib=True, complevel=1, shuffle=True, chunksizes=chunks)
    attrs = {**ATTRS.get(name, {}), **(attrs or {})}
    var.setncatts({k: v for k, v in attrs.items() if k != "_FillValue" and isinstance(v, (str, int, float))})
    var[:] = values


def _write_root(nc, *, time: np.ndarray, lat: np.ndarray, lon: np.ndarray, ensemble: int = 0) -> None:
    """Root dims time, y, x (+ ensemble) and variables time, lat(y, x), lon(y, x)."""
    dims = {"time": len(time), "y": lat.shape[0], "x": lat.shape[1], **({"ensemble": ensemble} if ensemble else {})}
    for name, n in dims.items():
        nc.createDimension(name, n)
    t, t_attrs = _cf_time(time)
    put_variable(nc, "time", t, ("time",), dtype="f8", attrs=t_attrs)
    put_variable(nc, "lat", lat, ("y", "x"), dtype="f8", attrs={"units": "degrees_north", "standard_name": "latitude"})
    put_variable(nc, "lon", lon, ("y", "x"), dtype="f8", attrs={"units": "degrees_east", "standard_name": "longitude"})


def _terrain_fields(benchmark: DownscalingBenchmark) -> dict[str, np.ndarray]:
    """elevation (m), land_fraction, lat, lon [N, N] of the benchmark's patch (flat: sea at 0N 0E)."""
    if benchmark.terrain is not None:
        p = load_terrain(benchmark.terrain, N=benchmark.N)
        return {"elevation": p.elevation, "land_fraction": p.land_mask, "lat": p.lat, "lon": p.lon}
    axis = (np.arange(benchmark.N) - (benchmark.N - 1) / 2) * STEP_DEG * SIZE / benchmark.N
    lat, lon = np.meshgrid(axis, axis, indexing="ij")
    zero = np.zeros((benchmark.N, benchmark.N), dtype=np.float32)
    return {"elevation": zero, "land_fraction": zero, "lat": lat, "lon": lon}


def write_default_dataset(path: str | Path, *, benchmark: DownscalingBenchmark, n_times: int, seed: int) -> Path:
    """The benchmark as HRRR-mini: output = fine truth, input = coarse y = A x + e on (y_lr, x_lr), invariants.

    Times are hourly from 2020-01-01. stats.json (beside the file) is computed from the written float32 data.
    Atomic: the netCDF is written under a temporary name and renamed last, after stats.json.
    """
    path = Path(path)
    x = benchmark.sample_truth(n_times, seed=seed)  # [T, 3, N, N] float64
    y = benchmark.coarse(x, seed=seed).astype(np.float32)  # [T, 3, N/b, N/b]
    x = x.astype(np.float32)
    terrain = _terrain_fields(benchmark)
    inv = np.stack([terrain["elevation"], terrain["land_fraction"]]).astype(np.float32)  # [2, N, N]
    stats = {"input": _stats_dict(VARIABLES, *moments([y])), "output": _stats_dict(VARIABLES, *moments([x])),
             "invariant": _stats_dict(("elevation", "land_fraction"), *moments([inv[None]]))}
    time = np.datetime64("2020-01-01T00", "ns") + np.arange(n_times) * np.timedelta64(1, "h")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            _write_root(nc, time=time, lat=terrain["lat"], lon=terrain["lon"])
            nc.createDimension("y_lr", y.shape[-2]), nc.createDimension("x_lr", y.shape[-1])
            nc.setncatts({"title": "fastgen-sci exact downscaling benchmark (SCIENCE.md section 2)",
                          "source": f"{benchmark!r}, seed={seed}", "Conventions": "CF-1.8"})
            for group, arr, dims in (("input", y, ("time", "y_lr", "x_lr")), ("output", x, ("time", "y", "x"))):
                g = nc.createGroup(group)
                for c, name in enumerate(VARIABLES):
                    put_variable(g, name, arr[:, c], dims)
            g = nc.createGroup("invariant")
            for name, field in zip(("elevation", "land_fraction"), inv):
                put_variable(g, name, field, ("y", "x"))
        _remove(path)  # an old data file must not outlive the stats.json written next
        write_stats(path.parent / "stats.json", stats)
    return path


def default_dataset(root: str | Path, *, benchmark: DownscalingBenchmark | None = None, n_times: int = 2000,
                    seed: int = 0, **open_kwargs) -> DownscalingData:
    """Open the default benchmark dataset under root/<key>/, writing it first if absent (key: benchmark, n, seed)."""
    benchmark = benchmark or DownscalingBenchmark()
    key = hashlib.sha1(f"{benchmark!r}|{n_times}|{seed}".encode()).hexdigest()[:12]
    path = Path(root) / f"benchmark-{key}" / "data.nc"
    if not path.is_file():
        print(f"writing the embedded benchmark ({n_times} times, {benchmark.N} x {benchmark.N}, seed {seed}) to {path}")
        write_default_dataset(path, benchmark=benchmark, n_times=n_times, seed=seed)
    return open_dataset(path, format="hrrr-mini", **open_kwargs)


def write_cwb_zarr(path: str | Path, *, inputs: np.ndarray, outputs: np.ndarray, input_vars: Sequence[str],
                   output_vars: Sequence[str], time: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                   valid: np.ndarray | None = None, stats: Mapping | None = None,
                   invariants: np.ndarray | None = None, invariant_vars: Sequence[str] = ()) -> Path:
    """A small CWB-style consolidated Zarr v2 store: inputs [T, C_in, H, W] (era5), outputs [T, C_out, H, W] (cwb).

    valid [T] -> cwb_valid (time) and era5_valid (time, channel); stats (stats.json layout) -> *_center/*_scale,
    computed over valid times when None. invariants [C_inv, H, W] become (south_north, west_east) arrays.
    """
    path, valid = Path(path), np.ones(len(outputs), bool) if valid is None else np.asarray(valid, bool)
    if inputs.shape[-2:] != outputs.shape[-2:]:
        raise GridError(f"write_cwb_zarr: inputs {inputs.shape} and outputs {outputs.shape} must share one grid "
                        "(upsample the inputs first, e.g. DownscalingData.inputs)")
    if stats is None:
        stats = {"input": _stats_dict(input_vars, *moments([inputs[valid]])),
                 "output": _stats_dict(output_vars, *moments([outputs[valid]]))}
    yx = ("south_north", "west_east")
    ds = xr.Dataset(coords={"time": ("time", np.asarray(time))})
    for p, g, arr, names in (("era5", "input", inputs, input_vars), ("cwb", "output", outputs, output_vars)):
        ds[p] = (("time", f"{p}_channel", *yx), np.asarray(arr, dtype=np.float32))
        ds[f"{p}_variable"] = (f"{p}_channel",), np.array(names, dtype=str)
        for k, s in (("center", "mean"), ("scale", "std")):
            ds[f"{p}_{k}"] = (f"{p}_channel",), np.array([stats[g][v][s] for v in names], dtype=np.float32)
    ds["cwb_valid"] = ("time",), valid
    ds["era5_valid"] = ("time", "era5_channel"), np.repeat(valid[:, None], len(input_vars), axis=1)
    ds["XLAT"] = yx, np.asarray(lat, np.float64), {"units": "degrees_north"}
    ds["XLONG"] = yx, np.asarray(lon, np.float64), {"units": "degrees_east"}
    for name, field in zip(invariant_vars, [] if invariants is None else invariants):
        ds[name] = yx, np.asarray(field, np.float32), ATTRS.get(name, {})
    chunks = {p: {"chunks": (1, *ds[p].shape[1:])} for p in ("era5", "cwb")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, zarr_format=2, consolidated=True, mode="w", encoding=chunks)
    return path


def export_cwb_zarr(path: str | Path, data: DownscalingData) -> Path:
    """Convert loaded data (inputs upsampled to the output grid) to a CWB-style store; reads everything at once."""
    every = slice(None)
    return write_cwb_zarr(path, inputs=data.inputs(every), outputs=data.outputs(every), input_vars=data.input_vars,
                          output_vars=data.output_vars, time=data.time, lat=data.lat, lon=data.lon,
                          stats=data.stats, invariants=data.invariant_fields, invariant_vars=data.invariant_vars)


def write_generate_netcdf(path: str | Path, *, prediction: xr.Dataset, input: xr.Dataset, truth: xr.Dataset | None,
                          lat: np.ndarray, lon: np.ndarray, time: np.ndarray) -> Path:
    """CorrDiff's generate output: root lat, lon (y, x), time; groups input, truth (time, y, x) and prediction
    (ensemble, time, y, x; a 'member' dim is renamed), physical units, written atomically."""
    path, lat = Path(path), np.asarray(lat)
    pred = prediction.rename({"member": "ensemble"}) if "member" in prediction.dims else prediction
    groups = {"input": (input, ("time",)), "truth": (truth, ("time",)), "prediction": (pred, ("ensemble", "time"))}
    with atomic_path(path) as tmp, netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
        _write_root(nc, time=np.asarray(time), lat=lat, lon=np.asarray(lon), ensemble=pred.sizes.get("ensemble", 0))
        for group, (ds, lead) in groups.items():
            if ds is None:
                continue
            g = nc.createGroup(group)
            want = (pred.sizes.get("ensemble"),) * (group == "prediction") + (len(time), *lat.shape)
            for name, da in ds.data_vars.items():
                da = da.transpose(*lead, ...)
                if da.shape != want:
                    raise GridError(f"write_generate_netcdf: {group} variable {name!r} has dims {dict(da.sizes)}; "
                                    f"expected ({', '.join(lead)}, y, x) with time {len(time)} and y, x {lat.shape}")
                put_variable(g, str(name), da.values, (*lead, "y", "x"), attrs=dict(da.attrs))
    return path
