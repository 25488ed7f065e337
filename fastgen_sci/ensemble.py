"""Ensemble generation: member k of case c is drawn from its own random stream, whatever the batching.

`generate_ensemble` describes an ensemble as a lazy xarray Dataset (member, case, *event dims) whose dask
blocks call a `sample_block(case_ids, member_ids)`; store.py writes it one block at a time into a resumable
store (`write_ensemble`) and opens finished ones (`open_ensemble`).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
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
        write_ensemble(ds, "out.zarr")  # fastgen_sci.store; resumable; or "out.nc"

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
