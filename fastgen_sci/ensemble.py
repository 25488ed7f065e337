"""Ensemble generation: member k of case c is drawn from its own random stream, whatever the batching."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .registry import EvalCases
from .rng import MemberRNG
from .samplers import SamplerSpec


def member_batches(n_cases: int, members: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """(case ids, member ids) of each batch, walking cases then members; [B] each."""
    case = torch.arange(n_cases).repeat_interleave(members)
    member = torch.arange(members).repeat(n_cases)
    return list(zip(case.split(batch_size), member.split(batch_size)))


@torch.no_grad()
def sample_ensemble(denoiser: Denoiser, sampler: SamplerSpec, cases: EvalCases, members: int, *, seed: int = 0,
                    batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                    desc: str = "sample") -> Tensor:
    """Draw `members` samples for each case; returns [N, M, *shape] on the CPU."""
    out = torch.empty(cases.n, members, *cases.shape)
    batches = member_batches(cases.n, members, batch_size)
    for case_ids, member_ids in tqdm(batches, desc=desc, disable=not progress, leave=False):
        rng = MemberRNG(seed, case_ids.tolist(), member_ids.tolist(), device=device)
        cond = cases.cond_rows(case_ids)
        cond = None if cond is None else {k: v.to(device) for k, v in cond.items()}
        x = sampler(denoiser, rng.randn(*cases.shape), cond, randn_like=rng.randn_like)
        out[case_ids, member_ids] = x.float().cpu()
    return out


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
