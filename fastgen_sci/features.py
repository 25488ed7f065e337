"""Features of a frozen network for discriminators: forward hooks on named modules, heads for any shape.

The feature protocol: `FeatureTap(model, names)(x, sigma, cond)` calls the model once and returns the outputs
of the named submodules (PyTorch module paths, e.g. `net.model.dec.8x8_in1` of a PhysicsNeMo SongUNet, or
`net.blocks.2` of the toy MLP), in order. Hooks live only for that call, so the foreign network is never
edited. With no names the feature is the model's own output (a formula teacher has no inner modules).
Your own model: pass the names of the blocks whose outputs you want (`print(dict(model.named_modules()))`
lists them); any tensor output [B, C, *spatial] works, with 0, 1, 2 or 3 spatial dimensions.

Gradients flow through the tap to the network's input, never into a frozen network's parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoiser import Cond, Denoiser


class FeatureTap:
    """Call a network and collect the outputs of its named submodules (or its output when names is empty)."""

    def __init__(self, model: Denoiser, names: Sequence[str] = ()):
        self.model, self.names = model, list(names)
        if self.names:
            modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
            if missing := [n for n in self.names if n not in modules]:
                close = [n for n in modules if n and any(m.split(".")[-1] in n for m in missing)][:8]
                raise ValueError(f"feature taps {missing} are not modules of {type(model).__name__}"
                                 + (f"; similar: {close}" if close else "; list them with model.named_modules()"))
            self.modules = [modules[n] for n in self.names]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> list[Tensor]:
        if not self.names:
            return [self.model(x, sigma, cond)]
        found: dict[int, Tensor] = {}

        def keep(i):
            def hook(module, args, output):
                found[i] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self.modules)]
        try:
            self.model(x, sigma, cond)
        finally:
            for h in handles:
                h.remove()
        return [found[i] for i in range(len(self.modules))]


class FeatureHead(nn.Module):
    """Logit per sample from one feature [B, C, *spatial]: two shape-preserving layers, then a spatial mean.

    Convolutions use padding 'same' and no striding, so odd and non-square grids (36 x 58), sequences and
    pooled vectors [B, C] all work; the mean over positions makes the logit independent of the grid size.
    """

    def __init__(self, channels: int, spatial_dims: int, hidden: int = 64):
        super().__init__()
        if spatial_dims == 0:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(spatial_dims)
            if conv is None:
                raise ValueError(f"feature heads take 0 to 3 spatial dimensions, got {spatial_dims}")
            self.body = nn.Sequential(nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                      conv(channels, hidden, 3, padding="same"), nn.SiLU(), conv(hidden, 1, 1))
        self.channels, self.spatial_dims = channels, spatial_dims

    def logits(self, f: Tensor) -> Tensor:
        """A logit per position [B, N] (N = 1 for vectors): each position is judged on its receptive field."""
        if f.ndim != 2 + self.spatial_dims or f.shape[1] != self.channels:
            raise ValueError(f"feature head built for [B, {self.channels}, {self.spatial_dims} spatial dims], "
                             f"got {list(f.shape)}")
        return self.body(f.float()).flatten(1)

    def forward(self, f: Tensor) -> Tensor:
        return self.logits(f).mean(dim=1)


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class Discriminator(nn.Module):
    """One FeatureHead per tapped feature; the logit is their sum. Built from example features; the heads' init
    is a function of `seed` alone (not of the global RNG state, which differs between `distill` and `compare`)."""

    def __init__(self, hidden: int = 64, seed: int = 0):
        super().__init__()
        self.hidden, self.seed, self.heads = hidden, seed, nn.ModuleList()

    @property
    def built(self) -> bool:
        return len(self.heads) > 0

    def build(self, features: Sequence[Tensor]) -> "Discriminator":
        """Create the heads for features shaped like these (once; before the optimizer sees the parameters)."""
        if not self.built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.heads.extend(FeatureHead(f.shape[1], f.ndim - 2, self.hidden) for f in features)
        return self

    def forward(self, features: Sequence[Tensor], patch: bool = False) -> Tensor | list[Tensor]:
        """The logit per sample [B] (the heads' position-mean logits, summed), or with patch=True each head's
        logits per position, [[B, N_head], ...]. (Both through forward, so a DDP-wrapped D syncs its gradients.)"""
        heads = self._check(features)
        if patch:
            return [h.logits(f) for h, f in zip(heads, features)]
        return torch.stack([h(f) for h, f in zip(heads, features)]).sum(0)

    def _check(self, features: Sequence[Tensor]) -> nn.ModuleList:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads, got {len(features)} features")
        return self.heads


def logistic(D: nn.Module, features: Sequence[Tensor], *, real: bool, patch: bool = False) -> Tensor:
    """The logistic GAN loss of a `Discriminator` D (or its DDP wrapper) towards `real`: softplus(-D), or softplus(D)
    towards fake; per sample [B].

    patch=False: of the logit D (the heads' position-mean logits, summed). patch=True: per position, averaged over
    each head's positions and summed over heads (PatchGAN; LADD's per-token heads), so every region of a field is
    judged on its own rather than only through the field's mean logit.
    """
    sign = -1.0 if real else 1.0
    if not patch:
        return F.softplus(sign * D(features))
    return torch.stack([F.softplus(sign * l).mean(dim=1) for l in D(features, patch=True)]).sum(0)
