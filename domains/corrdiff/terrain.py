"""Real terrain for the weather benchmark: 64 x 64 mountain patches cut once from ETOPO5 and shipped.

Maintainer command (run once; needs an ETOPO5 netCDF, e.g. Debian `ferret-datasets`' etopo5.cdf):
    python -m fastgen_sci.domains.corrdiff.terrain --etopo /usr/share/ferret-vis/data/etopo5.cdf \
        --out domains/corrdiff/data/terrain_patches.nc
(or `python domains/corrdiff/terrain.py ...` from a checkout). See data/PROVENANCE.md.
Grids are native ETOPO5 points (5 arc-minutes, no interpolation); axis -2 is y (south to north),
axis -1 is x (west to east). Elevation is in metres with the ocean (relief <= 0) set to 0.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

TERRAIN_FILE = Path(__file__).resolve().parent / "data" / "terrain_patches.nc"
SIZE = 64  # points per side of a shipped patch
STEP_DEG = 1.0 / 12.0  # ETOPO5 spacing: 5 arc-minutes

# name -> (lat, lon) of the patch centre, degrees north / east
PATCHES = {
    "alps": (46.0, 9.0),  # Mont Blanc to the Bernina
    "rockies": (39.0, -106.0),  # Colorado Front Range and San Juans
    "andes": (-32.5, -70.0),  # Aconcagua, Chile coast to Argentine plains
    "himalaya": (28.5, 86.0),  # Everest, Tibetan plateau edge
    "taiwan": (23.7, 121.0),  # CorrDiff's CWB domain: Central Range and the Strait
    "ethiopia": (11.5, 38.5),  # Simien mountains and the Rift escarpment
    "southern_alps": (-43.5, 170.5),  # New Zealand, ocean on both sides
    "caucasus": (42.8, 44.0),  # Elbrus to Kazbek
}


class TerrainPatch(NamedTuple):
    """One patch: elevation (m, ocean 0), lat, lon (degrees) and land fraction, each [H, W]."""

    elevation: np.ndarray  # [H, W] float32
    lat: np.ndarray  # [H, W] float64
    lon: np.ndarray  # [H, W] float64, in [-180, 180)
    land_mask: np.ndarray  # [H, W] float32: 1 land, 0 sea; a land fraction after block averaging


def cut_patch(rose: np.ndarray, lat_src: np.ndarray, lon_src: np.ndarray, lat_c: float, lon_c: float):
    """SIZE x SIZE native points of a global lat-lon grid centred on (lat_c, lon_c)."""
    i0 = int(np.argmin(np.abs(lat_src - lat_c))) - SIZE // 2
    j0 = int(np.argmin(np.abs((lon_src - lon_c + 180.0) % 360.0 - 180.0))) - SIZE // 2
    if i0 < 0 or i0 + SIZE > len(lat_src):
        raise ValueError(f"a patch centred at latitude {lat_c} runs past a pole")
    rows, cols = np.arange(i0, i0 + SIZE), np.arange(j0, j0 + SIZE) % len(lon_src)
    relief = rose[np.ix_(rows, cols)].astype(np.float64)  # [SIZE, SIZE]
    lon = (lon_src[cols].astype(np.float64) + 180.0) % 360.0 - 180.0
    return relief, lat_src[rows].astype(np.float64), lon


def read_etopo(path: str | Path):
    """(relief [Y, X] m, lat [Y], lon [X]) from an ETOPO5 netCDF, coordinates snapped to the 5' grid."""
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        name = next(v for v in ("ROSE", "z", "elevation") if v in ds.variables)
        var = ds[name]
        lat = ds[var.dimensions[0]][:].filled(np.nan)
        lon = ds[var.dimensions[1]][:].filled(np.nan)
        snap = lambda c: np.round(np.asarray(c, dtype=np.float64) / STEP_DEG) * STEP_DEG  # Ferret's X drifts 0.003 deg
        return np.ma.filled(var[:], 0.0), snap(lat), snap(lon)


def write_patches(*, etopo: str | Path, out: str | Path) -> None:
    """Cut every patch in PATCHES from ETOPO and write one small compressed netCDF."""
    import netCDF4

    rose, lat_src, lon_src = read_etopo(etopo)
    names = list(PATCHES)
    with netCDF4.Dataset(out, "w", format="NETCDF4") as ds:
        ds.createDimension("patch", len(names))
        ds.createDimension("y", SIZE)
        ds.createDimension("x", SIZE)
        kw = dict(zlib=True, complevel=9, shuffle=True)
        v_name = ds.createVariable("name", str, ("patch",))
        v_lat = ds.createVariable("lat", "f8", ("patch", "y"), **kw)
        v_lon = ds.createVariable("lon", "f8", ("patch", "x"), **kw)
        v_h = ds.createVariable("elevation", "f4", ("patch", "y", "x"), **kw)
        v_m = ds.createVariable("land_mask", "i1", ("patch", "y", "x"), **kw)
        for p, name in enumerate(names):
            relief, lat, lon = cut_patch(rose, lat_src, lon_src, *PATCHES[name])
            v_name[p], v_lat[p], v_lon[p] = name, lat, lon
            v_h[p] = np.maximum(relief, 0.0).astype(np.float32)
            v_m[p] = (relief > 0).astype(np.int8)
        _set_attributes(ds, v_lat, v_lon, v_h, v_m, etopo)


def _set_attributes(ds, v_lat, v_lon, v_h, v_m, etopo) -> None:
    """CF-style units and the source and licence of the relief."""
    v_lat.setncatts({"units": "degrees_north", "long_name": "latitude of row y"})
    v_lon.setncatts({"units": "degrees_east", "long_name": "longitude of column x"})
    v_h.setncatts({"units": "m", "long_name": "surface elevation, ocean (relief <= 0) set to 0"})
    v_m.setncatts({"units": "1", "long_name": "land-sea mask: 1 where ETOPO5 relief > 0"})
    ds.setncatts({
        "title": "fastgen-sci terrain patches for the exact CorrDiff-style downscaling benchmark",
        "source": "ETOPO5 5-minute gridded elevation (NOAA NGDC, 1988), file "
                  f"{Path(etopo).name} of Debian ferret-datasets (Ferret ROSE, from IRI/LDEO worldbath.nc)",
        "license": "public domain: ETOPO5 is a work of the U.S. Government (NOAA)",
        "grid": f"{SIZE} x {SIZE} native ETOPO5 points per patch, 5 arc-minute spacing, y south to north",
        "patch_centres": "; ".join(f"{k}: {v[0]}N {v[1]}E" for k, v in PATCHES.items()),
        "history": "python -m fastgen_sci.domains.corrdiff.terrain --etopo <etopo5.cdf> --out <file>",
    })


@functools.lru_cache(maxsize=1)
def _read_patches(path: str) -> dict[str, np.ndarray]:
    """Every array of the shipped file, read once."""
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        out = {k: np.asarray(ds[k][:]) for k in ("lat", "lon", "elevation", "land_mask")}
        out["name"] = np.asarray(ds["name"][:], dtype=str)
    return out


def terrain_names(path: str | Path = TERRAIN_FILE) -> list[str]:
    """Names of the shipped patches, in file order."""
    return list(_read_patches(str(path))["name"])


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Average over non-overlapping f x f blocks of the last two axes."""
    *lead, H, W = a.shape
    return a.reshape(*lead, H // f, f, W // f, f).mean(axis=(-3, -1))


def load_terrain(name_or_index: str | int, *, N: int = SIZE, path: str | Path = TERRAIN_FILE) -> TerrainPatch:
    """A shipped patch, block-averaged from 64 x 64 to N x N (N must divide 64)."""
    if N < 1 or SIZE % N:
        raise ValueError(f"load_terrain: N={N} must divide {SIZE} (patches are {SIZE} x {SIZE}; "
                         "downsampling is a block average)")
    data, names = _read_patches(str(path)), terrain_names(path)
    p = name_or_index if isinstance(name_or_index, (int, np.integer)) else None
    if p is None and name_or_index in names:
        p = names.index(name_or_index)
    if p is None or not -len(names) <= p < len(names):
        raise ValueError(f"load_terrain: unknown patch {name_or_index!r}; choose one of {names} or an index")
    lat, lon = np.meshgrid(data["lat"][p], data["lon"][p], indexing="ij")  # [64, 64] each
    f = SIZE // N
    return TerrainPatch(elevation=block_mean(data["elevation"][p].astype(np.float32), f),
                        lat=block_mean(lat, f), lon=block_mean(lon, f),
                        land_mask=block_mean(data["land_mask"][p].astype(np.float32), f))


def main(argv: list[str] | None = None) -> None:
    """Maintainer entry point: write the shipped patch file from an ETOPO5 netCDF."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etopo", required=True, help="ETOPO5 netCDF (e.g. /usr/share/ferret-vis/data/etopo5.cdf)")
    parser.add_argument("--out", default=str(TERRAIN_FILE), help="output netCDF (default: the shipped file)")
    args = parser.parse_args(argv)
    write_patches(etopo=args.etopo, out=args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} kB): {', '.join(PATCHES)}")


if __name__ == "__main__":
    main()
