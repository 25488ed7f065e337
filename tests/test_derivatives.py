"""derivatives.jvp's exact path: its lean forward-mode rules for group norm and convolutions give PyTorch's own
derivative (torch.autograd.functional.jvp, double backward) on every layer kind they replace."""
import importlib.util

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from fastgen_sci.derivatives import FusedJVP, jvp


class Layers(nn.Module):
    """Every function FusedJVP replaces: conv1d/2d/3d, their transposes, group norm (with and without affine)."""

    def __init__(self):
        super().__init__()
        self.c2, self.t2 = nn.Conv2d(4, 6, 3, padding=1), nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
        self.c1, self.t1 = nn.Conv1d(4, 4, 3, stride=2), nn.ConvTranspose1d(4, 4, 2, stride=2, bias=False)
        self.c3, self.t3 = nn.Conv3d(1, 2, 3, padding=1, groups=1), nn.ConvTranspose3d(2, 1, 2, stride=2)
        self.norm = nn.GroupNorm(3, 6)

    def forward(self, x, s):
        h = F.silu(self.norm(self.c2(x) * s[:, None, None, None]))  # s: a second dual input, as sigma is
        h = self.t2(h)
        seq = self.t1(self.c1(h.flatten(2)[..., :40]))
        vol = self.t3(self.c3(F.group_norm(h[:, :1, None, :6, :6], 1)))
        return torch.cat([h.flatten(1), seq.flatten(1), vol.flatten(1)], dim=1)


def test_lean_rules_match_pytorchs_jvp_for_every_layer_kind():
    torch.manual_seed(0)
    net = Layers().double()
    x, v = torch.randn(3, 4, 7, 9, dtype=torch.float64), torch.randn(3, 4, 7, 9, dtype=torch.float64)
    s, ds = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    exact = jvp(net, (x, s), (v, ds))
    reference = torch.autograd.functional.jvp(net, (x, s), (v, ds))[1]
    torch.testing.assert_close(exact, reference, rtol=1e-10, atol=1e-12)


def test_lean_rules_keep_the_weights_tangents_when_they_have_one():
    """A dual weight or bias (not what jvp makes, but a user's forward-AD code may) still gets its term."""
    torch.manual_seed(1)
    x, dx = torch.randn(2, 2, 4, 6, 5, dtype=torch.float64)
    w, dw = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64)
    b, db, g, dg, c, dc = torch.randn(6, 4, dtype=torch.float64)

    def f(x, w, b, g, c):
        return F.group_norm(F.conv2d(x, w, b, padding=1), 2, g, c)

    pairs = ((x, dx), (w, dw), (b, db), (g, dg), (c, dc))
    with torch.no_grad(), fwAD.dual_level(), FusedJVP():
        out = f(*(fwAD.make_dual(p, t) for p, t in pairs))
        lean = fwAD.unpack_dual(out).tangent
    reference = torch.autograd.functional.jvp(f, tuple(p for p, _ in pairs), tuple(t for _, t in pairs))[1]
    torch.testing.assert_close(lean, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("physicsnemo") is None, reason="needs fastgen-sci[corrdiff]")
def test_songunet_jvp_in_training_mode_matches_and_uses_the_lean_rules():
    """A PhysicsNeMo SongUNet in train mode (where its GroupNorm calls F.group_norm), dropout off. A wrong rule
    is off by O(1); float32 rounding inside the network, 1e-7."""
    from fastgen_sci.domains.corrdiff import networks as N

    with torch.random.fork_rng():
        torch.manual_seed(0)
        D = N.CorrDiffResidual(N.build_residual(4, 2, 16, model_channels=16, channel_mult=(1, 2), num_blocks=1))
    D = D.double().train()
    for m in D.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cond = {"img_lr": torch.randn(2, 4, 16, 16, dtype=torch.float64)}
    x, v = torch.randn(2, 2, 2, 16, 16, dtype=torch.float64).unbind(0)
    sigma, dsigma = torch.tensor([0.7, 12.0], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    f = lambda x, s: D(x, s, cond)
    seen = []

    class Spy(FusedJVP):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (F.group_norm, F.conv2d, F.conv_transpose2d):
                seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    import fastgen_sci.derivatives as d
    lean, d.FusedJVP = d.FusedJVP, Spy
    try:
        exact = jvp(f, (x, sigma), (v, dsigma))
    finally:
        d.FusedJVP = lean
    assert F.group_norm in seen and F.conv2d in seen
    reference = torch.autograd.functional.jvp(f, (x, sigma), (v, dsigma))[1]
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-6)  # SongUNet runs float32 inside; measured 2e-7
