"""Checkpoints: weights in safetensors, optimizer state in a torch file read with weights_only=True.

A checkpoint is a directory `iter-00001000/` written under a temporary name and renamed when complete,
so a crash never leaves a half-written checkpoint that looks finished.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

_NAME = re.compile(r"^iter-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the network."""


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a module's state dict to a .safetensors file atomically."""
    return save_state(module.state_dict(), path, metadata)


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors to a .safetensors file atomically (a temporary name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_plain(state), str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, with an error naming the file if it is not one."""
    from safetensors import safe_open
    state = _read(Path(path))
    with safe_open(str(path), framework="pt") as f:
        return state, dict(f.metadata() or {})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's metadata, without reading its tensors."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a .safetensors state dict into `module`, with errors that name the file and the mismatch."""
    state = _read(Path(path))
    _check_state(module, state, Path(path))
    module.load_state_dict(state, strict=True)
    return module


def save(directory: Path, iteration: int, *, players: Sequence, optimizers: Mapping, emas: Mapping,
         scaler: torch.amp.GradScaler, keep: int = 2) -> Path:
    """Write checkpoint `iteration` (all players, their EMAs and optimizers) and prune old ones."""
    final = directory / f"iter-{iteration:08d}"
    tmp = directory / f".iter-{iteration:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"{p.name}/{k}": v for p in players for k, v in p.module.state_dict().items()}
    weights |= {f"ema/{name}/{k}": v for name, m in emas.items() for k, v in m.state_dict().items()}
    save_file(_plain(weights), str(tmp / "weights.safetensors"))
    torch.save({"iteration": iteration, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "scaler": scaler.state_dict()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [d for d in directory.iterdir() if _NAME.match(d.name) and (d / "state.pt").exists()]
    return sorted(found, key=lambda d: d.name)


def load_latest(directory: Path, *, players: Sequence, optimizers: Mapping, emas: Mapping,
                scaler: torch.amp.GradScaler) -> int:
    """Restore the newest checkpoint in `directory`; returns the iteration to continue from (0 if none)."""
    found = complete(directory)
    if not found:
        return 0
    path = found[-1]
    weights = _read(path / "weights.safetensors")
    for p in players:
        _load_prefixed(p.module, weights, f"{p.name}/", path)
    for name, m in emas.items():
        _load_prefixed(m, weights, f"ema/{name}/", path)
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # corrupt or foreign file: say which and what to do
        raise CheckpointError(f"checkpoint {path / 'state.pt'} cannot be read ({e}); delete {path} to resume "
                           "from the previous checkpoint") from None
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    scaler.load_state_dict(state["scaler"])
    print(f"resumed from {path} (iteration {state['iteration']})")
    return int(state["iteration"])


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _load_prefixed(module: nn.Module, weights: dict, prefix: str, path: Path) -> None:
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    _check_state(module, state, path)
    module.load_state_dict(state, strict=True)


def _check_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise one readable error listing missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" * bool(missing), f"unexpected {unexpected[:5]}" * bool(unexpected),
                 "; ".join(shapes[:5])]
        raise CheckpointError(f"{path} does not fit {type(module).__name__}: " + "; ".join(p for p in parts if p))


def write_json(path: str | os.PathLike, obj) -> None:
    """json.dump to a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)
