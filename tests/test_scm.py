"""sCT and sCD: the tangent against closed forms on Gaussian data, exact vs finite-difference JVP, and the toy pack."""
import math

import pytest
import torch

from conftest import GaussianDenoiser
from fastgen_sci import registry
from fastgen_sci.adapters import trigflow_velocity
from fastgen_sci.denoiser import EDMPrecond, FunctionDenoiser, expand_sigma
from fastgen_sci.methods.scm import SCD, SCT, LogVar, SCMStudent, tangent_jvp
from fastgen_sci.rng import StepRNG
from fastgen_sci.train import Progress

S_STAR, SIGMA_D = 0.8, 0.5  # data N(0, S_STAR^2 I); the student's sigma_data differs on purpose


class ConsistencyFamily(torch.nn.Module):
    """f_a(x; sigma) = a / sqrt(a^2 + sigma^2) x, learnable a: the exact consistency function of N(0, a^2 I)."""

    def __init__(self, a: float):
        super().__init__()
        self.log_a = torch.nn.Parameter(torch.tensor(math.log(a), dtype=torch.float64))
        self.sigma_data, self.sigma_min, self.sigma_max = SIGMA_D, 0.002, 80.0

    def forward(self, x, sigma, cond=None):
        a2 = (2 * self.log_a).exp()
        return (a2 / (a2 + expand_sigma(sigma, x) ** 2)).sqrt() * x


def gaussian_data(n, k, dim=4):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + k)) * S_STAR


def expected_grad(method, a, *, jvp="exact", repeats=8, n=20_000):
    """Mean and standard error over repeats of d loss / d log a (tangent warm-up over: w = 1)."""
    grads = []
    for k in range(repeats):
        family = ConsistencyFamily(a)
        p = method(warmup_iterations=10, jvp=jvp).players(student=family, teacher=GaussianDenoiser(S_STAR))[0]
        p.loss(p.module, gaussian_data(n, k), None, StepRNG(k, 0), Progress(100, 0)).mean().backward()
        grads.append(family.log_a.grad.item())
    g = torch.tensor(grads)
    return g.mean().item(), g.std().item() / math.sqrt(repeats)


@pytest.mark.parametrize("method", [SCD, SCT])
def test_gradient_vanishes_at_the_exact_consistency_function_only(method):
    g_exact, se = expected_grad(method, S_STAR)
    assert abs(g_exact) < 4 * se + 1e-9, (g_exact, se)  # measured: sCD ~1e-16 (g = 0 per sample), sCT 0.002 +- 0.001
    g_small, se_small = expected_grad(method, 0.6)
    g_large, se_large = expected_grad(method, 1.1)
    # gradient descent moves a back towards S_STAR; measured: sCD -0.52 / +0.49, sCT -0.20 / +0.20 (se ~0.001)
    assert g_small < -20 * se_small and g_large > 20 * se_large, (g_small, g_large)


@pytest.mark.parametrize("method", [SCD, SCT])
def test_training_moves_the_family_to_the_data(method):
    family = ConsistencyFamily(1.3)
    p = method(warmup_iterations=50).players(student=family, teacher=GaussianDenoiser(S_STAR))[0]
    opt = torch.optim.Adam(p.module.parameters(), lr=5e-3)
    for it in range(300):
        opt.zero_grad()
        p.loss(p.module, gaussian_data(256, it), None, StepRNG(it, 1), Progress(it, it * 256)).mean().backward()
        opt.step()
    a = family.log_a.exp().item()
    assert abs(a - S_STAR) < 0.03, a  # measured: 1.3 -> 0.801 (sCD), 0.798 (sCT)


def hand_loss(family, x, rng, *, w, teacher, P_mean=-1.0, P_std=1.4, c=0.1):
    """The sCM loss and its gradient written out from the formulas, with autograd's double-backward JVP."""
    sigma = (P_mean + P_std * rng.randn(x.shape[0])).exp().double().clamp(0.002, 80.0)
    s = torch.atan(sigma / SIGMA_D)[:, None]
    z = rng.randn(*x.shape, dtype=torch.float64) * SIGMA_D
    x_t = s.cos() * x + s.sin() * z

    def velocity(D, x_t, s):  # TrigFlow F of an EDM D: (cos(s) x_t - D(x_t / cos(s), sigma_d tan s)) / (sin(s) sigma_d)
        return (s.cos() * x_t - D(x_t / s.cos(), SIGMA_D * s.tan()[:, 0])) / (s.sin() * SIGMA_D)

    F = lambda x_t, s: velocity(family, x_t, s)
    dxds = s.cos() * z - s.sin() * x if teacher is None else SIGMA_D * velocity(teacher, x_t, s)

    dF = torch.autograd.functional.jvp(F, (x_t, s), (dxds, torch.ones_like(s)))[1].detach()
    F_theta = F(x_t, s)
    g = -s.cos() ** 2 * (SIGMA_D * F_theta.detach() - dxds) - w * s.cos() * s.sin() * (x_t + SIGMA_D * dF)
    g = g / (g.pow(2).mean(1, keepdim=True).sqrt() + c)
    grad = torch.autograd.grad(-2 * (g * F_theta).mean(1).mean(), family.log_a)[0]  # d/dtheta ||F - sg F - g||^2
    return g.pow(2).mean(1), grad  # the log-variance head starts at 0: weight e^0, offset 0


@pytest.mark.parametrize("method", [SCT, SCD])
def test_loss_matches_the_formulas_and_tells_the_tangents_apart(method):
    """sCD's dx_t/ds is sigma_d F_teacher (here a deliberately wrong teacher), sCT's cos(s) z - sin(s) x."""
    wrong_teacher = FunctionDenoiser(lambda x, sigma, cond: 0.3 * x, sigma_data=SIGMA_D)
    family = ConsistencyFamily(1.1)
    x = gaussian_data(64, 0)
    p = method(warmup_iterations=1000).players(student=family, teacher=wrong_teacher)[0]
    loss = p.loss(p.module, x, None, StepRNG(5, 0), Progress(250, 0))  # warm-up w = 0.25
    grad = torch.autograd.grad(loss.mean(), family.log_a)[0]
    mine = wrong_teacher if method is SCD else None
    want, want_grad = hand_loss(family, x, StepRNG(5, 0), w=0.25, teacher=mine)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    other, _ = hand_loss(family, x, StepRNG(5, 0), w=0.25, teacher=wrong_teacher if method is SCT else None)
    no_warmup, _ = hand_loss(family, x, StepRNG(5, 0), w=1.0, teacher=mine)
    assert (loss - other).abs().mean() > 0.05 and (loss - no_warmup).abs().mean() > 0.01


def mlp_denoiser(dtype=torch.float64, act: torch.nn.Module | None = None, dropout: float = 0.0):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.t = torch.nn.Linear(3, 32), torch.nn.Linear(32, 2), torch.nn.Linear(1, 32)
            self.act, self.drop = act or torch.nn.SiLU(), torch.nn.Dropout(dropout)

        def forward(self, x, c_noise, cond=None):
            h = self.act(self.a(torch.cat([x, c_noise[:, None]], 1)) + self.t(c_noise[:, None].sin()))
            return self.b(self.drop(h))

    torch.manual_seed(0)
    return EDMPrecond(Net().to(dtype), sigma_data=SIGMA_D)


def test_exact_and_finite_difference_jvp_agree():
    D = mlp_denoiser()
    g = torch.Generator().manual_seed(0)
    sigma = (torch.randn(2048, generator=g, dtype=torch.float64) * 1.4 - 1.0).exp().clamp(0.002, 80.0)
    s = torch.atan(sigma / SIGMA_D)
    x_t, v = torch.randn(2, 2048, 2, generator=g, dtype=torch.float64)
    F_of = lambda x_t, s: trigflow_velocity(D, x_t, s, None, SIGMA_D)
    exact, fd = (tangent_jvp(F_of, x_t, s, v, mode=m) for m in ("exact", "fd"))
    rel = (exact - fd).norm(dim=1) / exact.norm(dim=1)
    # measured (float64, h = 1e-3 s): median 4e-7, overall 5e-4 (the central difference's h^2 error near s = pi/2)
    assert rel.median() < 1e-5 and (exact - fd).norm() / exact.norm() < 3e-3, (rel.median(), rel.max())
    dFds = torch.autograd.functional.jvp(F_of, (x_t, s), (v, torch.ones_like(s)))[1]
    torch.testing.assert_close(exact, (s.cos() * s.sin())[:, None] * dFds)  # J is scaled by cos(s) sin(s)


def test_every_evaluation_of_the_student_shares_one_dropout_mask():
    """With dropout on, exact and finite-difference losses agree only if each call sees the same mask."""
    student = mlp_denoiser(dropout=0.5).train()
    x = gaussian_data(256, 0)[:, :2]
    losses = {}
    for mode in ("exact", "fd"):
        p = SCD(jvp=mode).players(student=student, teacher=GaussianDenoiser(S_STAR))[0]
        losses[mode] = p.loss(p.module, x, None, StepRNG(0, 0), Progress(10**5, 0)).detach()
    rel = (losses["exact"] - losses["fd"]).abs() / losses["exact"].abs()
    assert rel.median() < 1e-4, rel.median()  # measured: 1e-8; a fresh mask per call: 1.0


class NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no jvp: like attention kernels and sharded ops that lack forward-mode AD."""

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)


def test_finite_differences_run_where_forward_mode_cannot():
    act = type("Act", (torch.nn.Module,), {"forward": lambda self, x: NoForwardAD.apply(x)})()
    x = gaussian_data(32, 0)[:, :2]
    p = SCD(jvp="exact").players(student=mlp_denoiser(act=act), teacher=GaussianDenoiser(S_STAR))[0]
    with pytest.raises(ValueError, match="method.jvp=fd"):
        p.loss(p.module, x, None, StepRNG(0, 0), Progress(0, 0))
    p = SCD(jvp="fd").players(student=mlp_denoiser(act=act), teacher=GaussianDenoiser(S_STAR))[0]
    p.loss(p.module, x, None, StepRNG(0, 0), Progress(0, 0)).mean().backward()
    grads = [q.grad for q in p.module.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_contract():
    with pytest.raises(ValueError, match="teacher"):
        SCD().players(student=ConsistencyFamily(1.0), teacher=None)
    with pytest.raises(ValueError, match="jvp"):
        SCT(jvp="forward")
    family = ConsistencyFamily(1.0)
    p = SCT().players(student=family, teacher=GaussianDenoiser())[0]
    assert isinstance(p.module, SCMStudent) and registry.sampleable(SCT(), p.module) is family
    assert p.optimizer == "radam" and p.betas == (0.9, 0.99) and p.lr == 1e-4
    sigma = torch.tensor([0.01, 1.0, 50.0])
    assert torch.equal(p.module.logvar(sigma), torch.zeros(3))  # zero-initialised: plain MSE at the start
    torch.manual_seed(1)
    a = LogVar().state_dict()
    torch.rand(7)  # a different global RNG state (e.g. data generated, or not, before the run)
    b = LogVar().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the head's init is the seed's alone: reruns match exactly


@pytest.mark.parametrize("method", [SCD, SCT])
def test_drives_energy_distance_far_below_the_untrained_student(method, tmp_path):
    from fastgen_sci.domains.toy import ToyPack
    from fastgen_sci.ensemble import sample_ensemble
    from fastgen_sci.samplers import SamplerSpec
    from fastgen_sci.train import Trainer

    pack = ToyPack(hidden=64, depth=2, n_train=20_000)
    teacher, cases = pack.teacher(), pack.eval_cases()
    student = pack.student(teacher)

    def ed(model):
        return pack.score(sample_ensemble(model.eval(), SamplerSpec("few_step"), cases, 1000, progress=False),
                          cases)["energy_distance"]

    before = ed(student)
    hp = method(warmup_iterations=100, lr=1e-3)
    players = hp.players(student=student.train(), teacher=teacher)
    trainer = Trainer(iterations=400, batch_size=256, ema_halflife_images=10_000, progress_bar=False, tensorboard=False)
    trainer.fit(players, pack.dataset(), tmp_path)
    after = ed(registry.sampleable(hp, trainer.averaged(players[0])))
    assert after < before / 8, (before, after)  # measured: 1.13 -> 0.052 (sCD), 0.064 (sCT)
