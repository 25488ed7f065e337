"""Weather data: CorrDiff's datasets as one view on the output grid (readers: readers.py; writers: writers.py).

`DownscalingData` holds inputs, outputs and invariants, float32 in physical units on the output grid [H, W],
over lazy or in-memory `Store`s. Inputs on a coarser grid are upsampled by an integer factor (nearest:
np.repeat; bilinear: torch interpolate, align_corners=False). Channel order is the order of the variable
lists; the model condition is inputs, then invariants. Also here: the data errors, per-variable stats
(stats.json layout) and the NaN / inf scan.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import xarray as xr

GROUPS = ("input", "output", "invariant")


class DataError(ValueError):
    """A dataset that cannot be read as asked; the message says what, where and what to do."""


class MissingVariableError(DataError):
    """A requested variable, or its stats, is not there."""


class GridError(DataError):
    """Grids that disagree: a non-integer input/output factor, lat/lon or invariants of the wrong shape."""


class NonFiniteError(DataError):
    """NaN or inf at a valid time."""


# ----------------------------------------------------------------------------- the in-memory / lazy view
@dataclasses.dataclass(frozen=True)
class Store:
    """Lazy [T, C, h, w]: one (time, y, x) array per channel, or one (time, channel, y, x) array and picks."""

    arrays: tuple[xr.Variable, ...]
    channels: tuple[int, ...] | None = None  # picks on axis 1 of arrays[0]; None: one array per channel

    @property
    def shape(self) -> tuple[int, int, int, int]:
        a = self.arrays[0]
        return (a.shape[0], len(self.arrays) if self.channels is None else len(self.channels), *a.shape[-2:])

    def read(self, pos: np.ndarray) -> np.ndarray:
        """float32 [B, C, h, w] at file time positions pos (any order, repeats allowed)."""
        u, inv = np.unique(pos, return_inverse=True)  # backends read sorted indices best
        if self.channels is None:
            out = np.stack([a[u].values for a in self.arrays], axis=1)
        else:
            out = self.arrays[0][u][:, list(self.channels)].values
        return out.astype(np.float32, copy=False)[inv.ravel()]

    def load(self) -> Store:
        """The same stack held in memory (selected channels only)."""
        if self.channels is None:
            return Store(tuple(a.load() for a in self.arrays))
        return Store((self.arrays[0][:, list(self.channels)].load(),), tuple(range(len(self.channels))))


@dataclasses.dataclass(frozen=True, eq=False)
class DownscalingData:
    """Inputs, outputs and invariants on the output grid [H, W], float32, physical units.

    Index i runs over valid times only; store_index[i] is that time's position in the file.
    stats has the stats.json layout {group: {var: {"mean", "std"}}} (inputs: of the stored, coarse fields).
    """

    input_vars: tuple[str, ...]
    output_vars: tuple[str, ...]
    invariant_vars: tuple[str, ...]
    time: np.ndarray = dataclasses.field(repr=False)  # [T] valid times
    lat: np.ndarray = dataclasses.field(repr=False)  # [H, W] degrees north (NaN where the file has none)
    lon: np.ndarray = dataclasses.field(repr=False)  # [H, W] degrees east
    stats: Mapping = dataclasses.field(repr=False)
    input_store: Store = dataclasses.field(repr=False)  # [T_file, C_in, h, w]
    output_store: Store = dataclasses.field(repr=False)  # [T_file, C_out, H, W]
    invariant_fields: np.ndarray = dataclasses.field(repr=False)  # [C_inv, H, W]
    store_index: np.ndarray = dataclasses.field(repr=False)  # [T] int
    upsample: str = "nearest"
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.store_index)

    @property
    def grid(self) -> tuple[int, int]:
        return self.output_store.shape[-2:]

    @property
    def factor(self) -> tuple[int, int]:
        return grid_factor(fine=self.grid, coarse=self.input_store.shape[-2:], where=self.source)

    @property
    def nbytes(self) -> int:
        return 4 * sum(int(np.prod(s.shape)) for s in (self.input_store, self.output_store))

    def variables(self, group: str) -> tuple[str, ...]:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; use one of {GROUPS}")
        return {"input": self.input_vars, "output": self.output_vars, "invariant": self.invariant_vars}[group]

    def read(self, group: str, idx) -> np.ndarray:
        """Stored fields [B, C, h, w] of group 'input' or 'output' (inputs not upsampled), NaN/inf checked."""
        if group not in ("input", "output"):
            raise ValueError(f"read(group={group!r}): use 'input' or 'output' (invariants() has the rest)")
        k = np.atleast_1d(np.arange(len(self))[idx])
        pos = self.store_index[k]
        arr = (self.input_store if group == "input" else self.output_store).read(pos)
        bad = ~np.isfinite(arr).all(axis=(-2, -1))  # [B, C]
        if bad.any():
            b, c = np.argwhere(bad)[0]
            raise NonFiniteError(f"{self.source}: {group} variable {self.variables(group)[c]!r} holds NaN or inf "
                                 f"at time index {pos[b]} of the file ({self.time[k[b]]}); fill or drop that time, "
                                 "or mark it invalid in the store's *_valid mask")
        return arr

    def inputs(self, idx) -> np.ndarray:
        """Inputs upsampled to the output grid [B, C_in, H, W]."""
        return upsample(self.read("input", idx), factor=self.factor, mode=self.upsample)

    def outputs(self, idx) -> np.ndarray:
        """[B, C_out, H, W]."""
        return self.read("output", idx)

    def invariants(self) -> np.ndarray:
        """[C_inv, H, W]."""
        return self.invariant_fields.copy()

    def mean_std(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std [C] (float32); a constant channel (std 0) is scaled by 1."""
        s = [self.stats[group][v] for v in self.variables(group)]
        mean, std = (np.array([x[k] for x in s], dtype=np.float32) for k in ("mean", "std"))
        return mean, np.where(std > 0, std, np.float32(1))

    def normalize(self, group: str, arr):
        """Physical -> normalised, arr [..., C, H, W] numpy or torch, channels in the group's order."""
        mean, std = (_like(a[:, None, None], arr) for a in self.mean_std(group))
        return (arr - mean) / std

    def denormalize(self, group: str, arr):
        """Normalised -> physical, arr [..., C, H, W]."""
        mean, std = (_like(a[:, None, None], arr) for a in self.mean_std(group))
        return arr * std + mean

    def condition(self, idx) -> np.ndarray:
        """CorrDiff's condition [B, C_in + C_inv, H, W]: normalised inputs, then normalised invariants."""
        x = self.normalize("input", self.inputs(idx))
        inv = self.normalize("invariant", self.invariant_fields)  # [C_inv, H, W]
        return np.concatenate([x, np.broadcast_to(inv, (len(x), *inv.shape))], axis=1).astype(np.float32)

    def load(self) -> DownscalingData:
        """The same data held in memory."""
        return dataclasses.replace(self, input_store=self.input_store.load(), output_store=self.output_store.load())


def _like(a: np.ndarray, ref):
    return torch.as_tensor(a, dtype=ref.dtype, device=ref.device) if isinstance(ref, torch.Tensor) else a


def grid_factor(*, fine: Sequence[int], coarse: Sequence[int], where: str) -> tuple[int, int]:
    """Integer upsampling factor (fy, fx) from the coarse to the fine grid, or a GridError."""
    if any(c < 1 or f % c for f, c in zip(fine, coarse)):
        raise GridError(f"{where}: inputs are on a {coarse[0]} x {coarse[1]} grid, outputs on {fine[0]} x {fine[1]}; "
                        "the output grid must be an integer multiple of the input grid (regrid the inputs)")
    return fine[0] // coarse[0], fine[1] // coarse[1]


def upsample(x: np.ndarray, *, factor: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """[..., h, w] -> [..., h fy, w fx]: nearest (np.repeat) or bilinear (align_corners=False)."""
    fy, fx = factor
    if mode == "nearest":
        return np.repeat(np.repeat(x, fy, axis=-2), fx, axis=-1)
    if mode == "bilinear":
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        h, w = t.shape[-2:]
        out = torch.nn.functional.interpolate(t.reshape(-1, 1, h, w), size=(h * fy, w * fx), mode="bilinear",
                                              align_corners=False)
        return out.reshape(*t.shape[:-2], h * fy, w * fx).numpy()
    raise ValueError(f"upsample={mode!r}; use 'nearest' or 'bilinear'")


# ----------------------------------------------------------------------------- stats and validation
def moments(batches) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof 0) per channel over batches [B, C, h, w], accumulated in float64 about a shift."""
    n, s, ss, shift = 0, 0.0, 0.0, None
    for x in batches:
        x = np.asarray(x, dtype=np.float64)
        shift = x.mean(axis=(0, 2, 3)) if shift is None else shift
        d = x - shift[:, None, None]
        n += d.shape[0] * d.shape[2] * d.shape[3]  # values per channel
        s, ss = s + d.sum(axis=(0, 2, 3)), ss + (d**2).sum(axis=(0, 2, 3))
    return shift + s / n, np.sqrt(np.maximum(ss / n - (s / n) ** 2, 0.0))


def _stats_dict(names: Sequence[str], mean: np.ndarray, std: np.ndarray) -> dict:
    return {v: {"mean": float(m), "std": float(s)} for v, m, s in zip(names, mean, std)}


def _batches(n: int, batch_size: int):
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def compute_stats(data: DownscalingData, *, batch_size: int = 512) -> dict:
    """Per-variable mean/std over valid times and space (stats.json layout); inputs on their stored grid."""
    out = {g: _stats_dict(data.variables(g), *moments(data.read(g, s) for s in _batches(len(data), batch_size)))
           for g in ("input", "output")}
    out["invariant"] = _stats_dict(data.invariant_vars, *moments([data.invariant_fields[None]]))
    return out


def validate(data: DownscalingData, *, batch_size: int = 512) -> None:
    """Scan every valid time of inputs and outputs for NaN / inf (raises NonFiniteError at the first)."""
    for s in _batches(len(data), batch_size):
        data.read("input", s), data.read("output", s)


def check_stats(stats: Mapping, data: DownscalingData, *, where: str) -> None:
    """Every selected variable has a finite mean and std."""
    for g in GROUPS:
        for v in data.variables(g):
            entry = stats.get(g, {}).get(v, {})
            if not all(np.isfinite(entry.get(k, np.nan)) for k in ("mean", "std")):
                raise MissingVariableError(f"{where}: no finite mean/std for {g} variable {v!r} (it has "
                                           f"{sorted(stats.get(g, {}))}); add it, or pass stats='compute'")


def read_stats(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no stats file at {path}; HRRR-mini keeps stats.json ({{group: {{var: {{mean, std}}}}}}) "
                        "beside the data file: write it, pass stats=<path>, or stats='compute' to compute it")
    return json.loads(path.read_text())
