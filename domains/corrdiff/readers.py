"""Weather data readers: CorrDiff's dataset formats read into one DownscalingData (data.py) on the output grid.

Formats (`open_dataset` picks one from the suffix and the contents):
  hrrr-mini  one netCDF4 file, groups input / output / invariant (one variable per channel), root time and
             lat, lon (y, x); stats in `stats.json` in the SAME DIRECTORY (PhysicsNeMo's HRRR-mini layout,
             where train and valid files share it): {group: {var: {"mean": m, "std": s}}}. So one directory
             holds one dataset (or files that share stats); stats=<path> overrides.
  cwb        consolidated Zarr v2: cwb / era5 (time, channel, y, x), *_center, *_scale, *_variable (+ *_pressure:
             channel name "<variable>_<level>"), *_valid (time) or (time, channel; only selected channels
             count), XLAT, XLONG, time.
             era5 is the input, cwb the output; invariants are the other arrays on the cwb (y, x) dims.
  xarray     any netCDF / Zarr with named (time, y, x) input and output variables and (y, x) invariants.
Everything comes out float32 in physical units on the output grid [H, W] (upsampling: data.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import netCDF4
import numpy as np
import xarray as xr

from .data import (GROUPS, DataError, DownscalingData, GridError, MissingVariableError, NonFiniteError, Store,
                   _stats_dict, check_stats, compute_stats, moments, read_stats, validate)

SUPPORTED = ("hrrr-mini (netCDF4 file with groups input/output/invariant and stats.json beside it), "
             "cwb (consolidated Zarr v2 store with cwb/era5 arrays), "
             "xarray (netCDF or Zarr with named (time, y, x) variables; pass input_vars= and output_vars=)")
LATLON = (("lat", "latitude", "XLAT"), ("lon", "longitude", "XLONG"))
EAGER_BYTES = 256 * 2**20  # stores smaller than this are loaded whole and scanned for NaN / inf at open


def _pick(requested, available: Sequence[str], *, what: str, where: str) -> tuple[str, ...]:
    """The requested names (default: all available), or one error listing what is available."""
    if requested is None:
        return tuple(available)
    requested = (requested,) if isinstance(requested, str) else tuple(requested)
    missing = [v for v in requested if v not in available]
    if missing:
        raise MissingVariableError(f"{where}: {what} variable(s) {missing} not found; available {what} variables: "
                                   f"{list(available)} (pass {what}_vars= from that list)")
    return requested


def _store(ds: xr.Dataset, names: Sequence[str], *, group: str, where: str) -> Store:
    """Per-variable (time, y, x) arrays of one grid."""
    shapes = {v: ds[v].shape for v in names}
    if not names or any(len(s) != 3 for s in shapes.values()) or len(set(shapes.values())) > 1:
        raise GridError(f"{where}: {group} variables must be non-empty, (time, y, x) and on one grid; got {shapes}")
    return Store(tuple(ds[v].variable for v in names))


def _fields(ds: xr.Dataset, names: Sequence[str], *, grid: tuple[int, int], where: str) -> np.ndarray:
    """Invariant fields [C, H, W] (float32) on the output grid."""
    arrs = [np.asarray(ds[v].values, dtype=np.float32) for v in names]
    bad = {v: a.shape for v, a in zip(names, arrs) if a.shape != tuple(grid)}
    if bad:
        raise GridError(f"{where}: invariants {bad} are not on the output grid {tuple(grid)}; regrid them")
    return np.stack(arrs) if arrs else np.zeros((0, *grid), dtype=np.float32)


def _latlon(ds: xr.Dataset, grid: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """2-D lat, lon [H, W] from the first of LATLON found (1-D axes are meshed), NaN when absent."""
    found = [next((np.asarray(ds[k].values, np.float64) for k in names if k in ds.variables), None) for names in LATLON]
    if any(a is None for a in found):
        return np.full(grid, np.nan), np.full(grid, np.nan)
    lat, lon = np.meshgrid(*found, indexing="ij") if found[0].ndim == found[1].ndim == 1 else found
    if lat.shape != tuple(grid) or lon.shape != tuple(grid):
        raise GridError(f"{where}: lat {lat.shape} / lon {lon.shape} do not match the output grid {tuple(grid)}; "
                        "they must be [y, x] (or 1-D axes) on the output grid")
    return lat, lon


def _assemble(*, where: str, stats, eager: bool | None, time, **fields) -> DownscalingData:
    """Check grids and lengths, optionally load and scan, resolve stats ('compute' or a mapping)."""
    lengths = {len(time), fields["input_store"].shape[0], fields["output_store"].shape[0]}
    if len(lengths) > 1:
        raise GridError(f"{where}: time, input and output lengths differ ({sorted(lengths)}); they must agree")
    data = DownscalingData(time=np.asarray(time)[fields["store_index"]], stats={}, source=where, **fields)
    _ = data.factor  # a GridError unless the input grid divides the output grid
    if data.upsample not in ("nearest", "bilinear"):
        raise ValueError(f"upsample={data.upsample!r}; use 'nearest' or 'bilinear'")
    if len(data) == 0:
        raise DataError(f"{where}: no valid times (every time is masked invalid or the time axis is empty)")
    if not np.isfinite(data.invariant_fields).all():
        bad = [v for v, f in zip(data.invariant_vars, data.invariant_fields) if not np.isfinite(f).all()]
        raise NonFiniteError(f"{where}: invariant(s) {bad} hold NaN or inf; fill them (e.g. 0 over the sea)")
    if (data.nbytes <= EAGER_BYTES) if eager is None else eager:
        data = data.load()
        validate(data)
    stats = compute_stats(data) if isinstance(stats, str) and stats == "compute" else stats
    stats = read_stats(stats) if isinstance(stats, (str, Path)) else stats
    check_stats(stats, data, where=where)
    return dataclasses.replace(data, stats=stats)


def read_hrrr_mini(path, *, input_vars=None, output_vars=None, invariant_vars=None, upsample: str = "nearest",
                   stats=None, eager: bool | None = None) -> DownscalingData:
    """HRRR-mini netCDF4 file; stats default: stats.json in the same directory."""
    path, where = Path(path), str(path)
    with netCDF4.Dataset(path) as nc:
        found = set(nc.groups)
    if not {"input", "output"} <= found:
        raise DataError(f"{where}: HRRR-mini needs groups input and output (found {sorted(found)}); {SUPPORTED}")
    root = xr.open_dataset(path, engine="netcdf4")
    g = {k: xr.open_dataset(path, engine="netcdf4", group=k) for k in GROUPS if k in found}
    inv = g.get("invariant", xr.Dataset())
    names = {k: _pick(req, list(g[k].data_vars) if k in g else [], what=k, where=f"{where} group '{k}'")
             for k, req in zip(GROUPS, (input_vars, output_vars, invariant_vars))}
    out = _store(g["output"], names["output"], group="output", where=where)
    (T, _, H, W), stats = out.shape, path.parent / "stats.json" if stats is None else stats
    lat, lon = _latlon(root, (H, W), where)
    return _assemble(
        where=where, stats=stats, eager=eager, time=root["time"].values if "time" in root.variables else np.arange(T),
        input_vars=names["input"], output_vars=names["output"], invariant_vars=names["invariant"],
        input_store=_store(g["input"], names["input"], group="input", where=where), output_store=out,
        invariant_fields=_fields(inv, names["invariant"], grid=(H, W), where=where), lat=lat, lon=lon,
        store_index=np.arange(T), upsample=upsample)


def _channel_names(ds: xr.Dataset, prefix: str) -> list[str]:
    """Channel names from *_variable, with the level appended where *_pressure is finite."""
    names = [s.decode() if isinstance(s, bytes) else str(s) for s in ds[f"{prefix}_variable"].values]
    levels = ds[f"{prefix}_pressure"].values if f"{prefix}_pressure" in ds.variables else [np.nan] * len(names)
    return [n if not np.isfinite(p) else f"{n}_{p:g}" for n, p in zip(names, levels)]


def _valid(ds: xr.Dataset, prefix: str, channels: list[int]) -> np.ndarray:
    """[T] bool: the store's *_valid mask, (time) or (time, channel) over the selected channels."""
    if f"{prefix}_valid" not in ds.variables:
        return np.ones(ds[prefix].shape[0], dtype=bool)
    v = ds[f"{prefix}_valid"].values != 0
    return v[:, channels].all(axis=1) if v.ndim == 2 else v


def read_cwb_zarr(path, *, input_vars=None, output_vars=None, invariant_vars=None, upsample: str = "nearest",
                  stats=None, eager: bool | None = None) -> DownscalingData:
    """CWB-style consolidated Zarr v2 store; stats default: *_center / *_scale; invalid times skipped."""
    where = str(path)
    ds = _open_zarr(Path(path))
    need = [f"{p}{s}" for p in ("cwb", "era5") for s in ("", "_center", "_scale", "_variable")
            if f"{p}{s}" not in ds.variables]
    if need:
        raise DataError(f"{where}: not a CWB-style store, it lacks {need}; supported formats: {SUPPORTED}")
    avail = {"input": _channel_names(ds, "era5"), "output": _channel_names(ds, "cwb")}
    names = {k: _pick(req, avail[k], what=k, where=where)
             for k, req in (("input", input_vars), ("output", output_vars))}
    ch = {k: [avail[k].index(v) for v in names[k]] for k in names}
    grid_dims, latlon = ds["cwb"].dims[-2:], {n for pair in LATLON for n in pair}
    inv_avail = [k for k, v in ds.variables.items() if v.dims == grid_dims and k not in latlon]
    inv_names = _pick(invariant_vars, inv_avail, what="invariant", where=where)
    T, _, H, W = ds["cwb"].shape
    fields = _fields(ds, inv_names, grid=(H, W), where=where)
    if stats is None:
        stats = {k: _stats_dict(names[k], ds[f"{p}_center"].values[ch[k]], ds[f"{p}_scale"].values[ch[k]])
                 for k, p in (("input", "era5"), ("output", "cwb"))}
        stats["invariant"] = _stats_dict(inv_names, *moments([fields[None]]))
    lat, lon = _latlon(ds, (H, W), where)
    return _assemble(
        where=where, stats=stats, eager=eager, time=ds["time"].values if "time" in ds.variables else np.arange(T),
        input_vars=names["input"], output_vars=names["output"], invariant_vars=inv_names,
        input_store=Store((ds["era5"].variable,), tuple(ch["input"])),
        output_store=Store((ds["cwb"].variable,), tuple(ch["output"])), invariant_fields=fields, lat=lat, lon=lon,
        store_index=np.flatnonzero(_valid(ds, "era5", ch["input"]) & _valid(ds, "cwb", ch["output"])),
        upsample=upsample)


def read_xarray(source, *, input_vars=None, output_vars=None, invariant_vars=None, upsample: str = "nearest",
                stats=None, eager: bool | None = None) -> DownscalingData:
    """A plain xarray dataset (path or xr.Dataset) with named variables; stats default: computed from the data."""
    where = str(source) if not isinstance(source, xr.Dataset) else "<xarray.Dataset>"
    ds = source if isinstance(source, xr.Dataset) else _open_plain(Path(source))
    avail = [k for k in ds.variables if k not in ds.dims]
    if input_vars is None or output_vars is None:
        raise MissingVariableError(f"{where}: a plain xarray dataset needs input_vars= and output_vars= "
                                   f"(its variables: {avail})")
    names = {k: _pick(req, avail, what=k, where=where)
             for k, req in zip(GROUPS, (input_vars, output_vars, invariant_vars or ()))}
    out = _store(ds, names["output"], group="output", where=where)
    (T, _, H, W), tdim = out.shape, ds[names["output"][0]].dims[0]
    lat, lon = _latlon(ds, (H, W), where)
    return _assemble(
        where=where, stats="compute" if stats is None else stats, eager=eager,
        time=ds[tdim].values if tdim in ds.variables else np.arange(T),
        input_vars=names["input"], output_vars=names["output"], invariant_vars=names["invariant"],
        input_store=_store(ds, names["input"], group="input", where=where), output_store=out,
        invariant_fields=_fields(ds, names["invariant"], grid=(H, W), where=where), lat=lat, lon=lon,
        store_index=np.arange(T), upsample=upsample)


def _open_plain(path: Path) -> xr.Dataset:
    if path.is_dir() or path.suffix == ".zarr":
        return _open_zarr(path)
    return xr.open_dataset(path, engine="netcdf4")


def _open_zarr(path: Path) -> xr.Dataset:
    """A Zarr v2 or v3 store, lazily (no dask), with consolidated metadata when it has some."""
    v3 = path / "zarr.json"
    consolidated = (path / ".zmetadata").is_file() or (
        v3.is_file() and json.loads(v3.read_text()).get("consolidated_metadata") is not None)
    return xr.open_dataset(path, engine="zarr", consolidated=consolidated, chunks=None, decode_coords=False)


def detect_format(path: str | Path) -> str:
    """'hrrr-mini', 'cwb' or 'xarray' from the suffix and contents, or one DataError naming what is supported."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; supported formats: {SUPPORTED}")
    if path.is_dir() and any((path / m).exists() for m in (".zmetadata", ".zgroup", "zarr.json")):
        names = set(_open_zarr(path).variables)
        return "cwb" if {"cwb", "era5"} <= names else "xarray"
    if path.is_file() and _magic(path) in (b"\x89HDF", b"CDF\x01", b"CDF\x02", b"CDF\x05"):
        with netCDF4.Dataset(path) as nc:
            return "hrrr-mini" if {"input", "output"} <= set(nc.groups) else "xarray"
    raise DataError(f"{path}: not a netCDF file or Zarr store; supported formats: {SUPPORTED}")


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


READERS = {"hrrr-mini": read_hrrr_mini, "cwb": read_cwb_zarr, "xarray": read_xarray}


def open_dataset(path: str | Path, *, format: str = "auto", input_vars=None, output_vars=None, invariant_vars=None,
                 upsample: str = "nearest", stats=None, eager: bool | None = None) -> DownscalingData:
    """Open any supported format as DownscalingData.

    Args:
        stats: None (the format's own), 'compute' (from the data), a stats.json path, or a mapping in its layout.
        eager: load the whole store and scan it for NaN / inf now; None: when it is under EAGER_BYTES.
    """
    if format != "auto" and format not in READERS:
        raise DataError(f"unknown format {format!r}; supported formats: {SUPPORTED}")
    fmt = detect_format(path) if format == "auto" else format
    return READERS[fmt](path, input_vars=input_vars, output_vars=output_vars, invariant_vars=invariant_vars,
                        upsample=upsample, stats=stats, eager=eager)
