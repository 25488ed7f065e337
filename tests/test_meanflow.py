"""MeanFlow: the loss against the closed-form average velocity of Gaussian data, its time derivative both
ways, the time-gap student, and distillation of the toy pack."""
import copy
import math

import pytest
import torch
from torch import nn

from fastgen_sci.denoiser import EDMPrecond, expand_sigma
from fastgen_sci.methods.meanflow import (MeanFlow, TimeGap, adaptive_loss, average_velocity, meanflow_loss,
                                          sample_t_r, time_derivative)
from fastgen_sci.rng import StepRNG
from fastgen_sci.samplers import SamplerSpec
from fastgen_sci.train import Progress

S_STAR = 0.7  # data N(0, S_STAR^2 I), the teacher of conftest's gaussian_denoiser
T_MAX = 80 / 81  # sigma_max = 80 in rectified-flow time


def a(t, s=S_STAR):
    """Std of z_t = (1 - t) x + t eps; along the probability-flow ODE z_t = a(t) w."""
    return ((1 - t) ** 2 * s**2 + t**2).sqrt()


def phi(t, r, s=S_STAR):
    """Exact average velocity over [r, t] per unit z_t: (1 - a(r) / a(t)) / (t - r); a'(t) / a(t) at r = t."""
    gap = t - r
    small = gap < 1e-6
    safe = torch.where(small, torch.ones_like(gap), gap)
    return torch.where(small, (t - (1 - t) * s**2) / a(t, s) ** 2, (1 - a(t - safe, s) / a(t, s)) / safe)


class GaussianMeanFlow(nn.Module):
    """Two-time denoiser with u(z, t, r) = z (theta_0 phi(t, r) + theta_1): exact at theta = (1, 0). `s` may be
    a tensor [1, C, 1] (data N(0, s_c^2) per channel)."""

    def __init__(self, theta, s=S_STAR):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.s, self.sigma_data, self.sigma_min, self.sigma_max = s, S_STAR, 0.002, 80.0

    def forward(self, x, sigma, cond=None, gap=0.0):
        t = expand_sigma(sigma, x) / (1 + expand_sigma(sigma, x))
        z = x * (1 - t)
        u = z * (self.theta[0] * phi(t, t - expand_sigma(gap, x), self.s) + self.theta[1])
        return z - t * u  # D_h = z_t - t u


def mean_grad(model, hp, teacher, n=20_000, repeats=6):
    grads = []
    for k in range(repeats):
        x = StepRNG(k, 1).randn(n, 2, dtype=torch.float64) * S_STAR
        model.zero_grad()
        meanflow_loss(model, x, None, StepRNG(k, 0), Progress(0, 0), hp=hp, sigma_min=0.002, sigma_max=80.0,
                      teacher=teacher).mean().backward()
        grads.append(model.theta.grad.clone())
    g = torch.stack(grads)
    return g.mean(0), g.std(0) / math.sqrt(repeats)


@pytest.mark.parametrize("variant,jvp", [("ct", "exact"), ("cd", "exact"), ("cd", "fd")])
def test_gradient_vanishes_at_the_exact_average_velocity_only(gaussian_denoiser, variant, jvp):
    hp = MeanFlow(variant=variant, jvp=jvp, flow_ratio=0.25)
    teacher = gaussian_denoiser if variant == "cd" else None
    g_exact, se = mean_grad(GaussianMeanFlow([1.0, 0.0]), hp, teacher)
    g_off, se_off = mean_grad(GaussianMeanFlow([1.15, 0.1]), hp, teacher)
    if variant == "cd":  # deterministic target: Delta = 0 at the exact solution, up to the derivative's error
        assert g_exact.abs().max() < 1e-3 * g_off.abs().max(), (g_exact, g_off)
    else:
        assert (g_exact.abs() < 4 * se + 1e-3 * g_off.abs().max()).all(), (g_exact, se, g_off)
        assert (g_off.abs() > 10 * se_off).any(), (g_off, se_off)
    assert float(g_off @ torch.tensor([0.15, 0.1], dtype=torch.float64)) > 0  # descent moves back to (1, 0)


@pytest.mark.parametrize("variant", ["ct", "cd"])
def test_training_from_a_perturbed_start_finds_the_exact_average_velocity(gaussian_denoiser, variant):
    model = GaussianMeanFlow([1.3, -0.2])
    hp = MeanFlow(variant=variant, flow_ratio=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for it in range(300):
        x = StepRNG(it, 1).randn(2048, 2, dtype=torch.float64) * S_STAR
        opt.zero_grad()
        meanflow_loss(model, x, None, StepRNG(it, 0), Progress(it, 0), hp=hp, sigma_min=0.002, sigma_max=80.0,
                      teacher=gaussian_denoiser if variant == "cd" else None).mean().backward()
        opt.step()
    err = (model.theta.detach() - torch.tensor([1.0, 0.0], dtype=torch.float64)).norm()
    assert err < 0.05 * math.hypot(0.3, 0.2), model.theta


def test_balanced_channels_keep_the_exact_solution_and_reweight_the_rest():
    """Channels of std 0.7 and 2.1 (ECT's weights 1.5 / 0.5): the gradient still vanishes at the exact average
    velocity (weighting u and its target alike), but not when only one side is weighted; off the solution,
    balancing turns the gradient (measured cos 0.67 to the unbalanced one)."""
    s = torch.tensor([S_STAR, 3 * S_STAR], dtype=torch.float64).reshape(1, 2, 1)

    class Teacher(nn.Module):  # exact per-channel denoiser of N(0, s_c^2)
        sigma_data, sigma_min, sigma_max = S_STAR, 0.002, 80.0

        def forward(self, x, sigma, cond=None):
            return s**2 / (s**2 + expand_sigma(sigma, x) ** 2) * x

    def grad(theta, balance):
        model, g = GaussianMeanFlow(theta, s), []
        for k in range(4):
            x = StepRNG(k, 1).randn(20_000, 2, 1, dtype=torch.float64) * s
            model.zero_grad()
            meanflow_loss(model, x, None, StepRNG(k, 0), Progress(0, 0), sigma_min=0.002, sigma_max=80.0,
                          hp=MeanFlow(flow_ratio=0.25, balance_channels=balance), teacher=Teacher()).mean().backward()
            g.append(model.theta.grad.clone())
        return torch.stack(g).mean(0)

    g_off, g_off_bal = grad([1.15, 0.1], False), grad([1.15, 0.1], True)
    assert grad([1.0, 0.0], True).abs().max() < 1e-3 * g_off_bal.abs().max()
    cos = g_off @ g_off_bal / (g_off.norm() * g_off_bal.norm())
    assert cos < 0.9 and float(g_off_bal @ torch.tensor([0.15, 0.1], dtype=torch.float64)) > 0, (g_off, g_off_bal)


def test_sigma_max_sets_the_top_of_t():
    class Tiny(nn.Module):
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 800.0

        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(1, 4)

    D = TimeGap(Tiny(), "emb")
    assert MeanFlow(variant="ct").players(student=D)[0].loss.keywords["sigma_max"] == 800.0  # None: the student's
    assert MeanFlow(variant="ct", sigma_max=80.0).players(student=D)[0].loss.keywords["sigma_max"] == 80.0
    with pytest.raises(ValueError, match="sigma_max"):
        MeanFlow(sigma_max=0.0)


def test_adaptive_weight_is_one_over_norm_plus_c():
    u = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    u_tgt = torch.randn(5, 3, 4, dtype=torch.float64)
    adaptive_loss(u, u_tgt, p=1.0, c=0.1).sum().backward()
    delta = (u_tgt - u.detach()).flatten(1)
    want = -2 * delta / (delta.norm(dim=1, keepdim=True) + 0.1)  # METHODS.md: lambda = 1 / (||Delta|| + c)^p
    torch.testing.assert_close(u.grad.flatten(1), want)


def test_t_r_are_ordered_inside_the_sigma_range_with_the_flow_share():
    t, r = sample_t_r(100_000, hp=MeanFlow(flow_ratio=0.3), rng=StepRNG(0, 0), t_min=0.002 / 1.002, t_max=T_MAX)
    assert t.min() >= 0.002 / 1.002 and t.max() <= T_MAX and (t == T_MAX).any() and (r >= 0).all() and (r <= t).all()
    assert abs(float((r == t).float().mean()) - 0.3) < 0.01
    # (t, r) = (max, min) of logit-normals N(-0.6, 1.6) and N(-4, 1.6): P(t < 0.5) = P(both < 0.5)
    want = 0.5 * (1 + math.erf(0.6 / 1.6 / math.sqrt(2))) * 0.5 * (1 + math.erf(4 / 1.6 / math.sqrt(2)))
    assert abs(float((t < 0.5).float().mean()) - want) < 0.01


# --- the time derivative, exact and finite-difference -------------------------------------------------

def toy_denoiser(hidden=32, seed=0):
    from fastgen_sci.domains.toy.networks import build_network
    return build_network(dim=2, sigma_data=0.5, hidden=hidden, depth=2, seed=seed)


def gap_student(seed=0, hidden=32):
    """A TimeGap over a toy MLP with a random (non-zero) gap projection."""
    S = TimeGap(toy_denoiser(hidden, seed), "net.embed")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        nn.init.normal_(S.proj.weight, std=0.3)
    return S


def derivative_batch(n=400, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    t = torch.rand(n, generator=g, dtype=dtype) * (T_MAX - 0.01) + 0.005
    r = t * torch.rand(n, generator=g, dtype=dtype)
    t[:20], t[20:40] = T_MAX, 0.98  # at and near the top of the range
    r[40:60] = t[40:60]  # r = t: a forward difference
    r[60:80] = t[60:80] - 1e-5  # r just below t: the stencil may not cross r
    x, eps = torch.randn(n, 2, generator=g, dtype=dtype) * 0.7, torch.randn(n, 2, generator=g, dtype=dtype)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    return z, t, r, eps - x


def test_finite_difference_agrees_with_the_exact_jvp_up_to_its_measured_error():
    # measured (step 1e-3 in ln sigma): error reaching u_tgt max 1.2e-2 / 1.3e-2, median 1.8e-5 / 6.6e-5
    # (float64 / float32 network); interior central differences: median relative error of J 2.2e-5 / 5.4e-5
    S64 = gap_student().double()
    for dtype, tol_max, tol_med in ((torch.float64, 2.5e-2, 1e-4), (torch.float32, 2.5e-2, 3e-4)):
        z, t, r, v = derivative_batch(dtype=dtype)
        kw = dict(t_max=T_MAX, seed=0, step=1e-3)
        J_fd = time_derivative(copy.deepcopy(S64).to(dtype), z, t, r, v, None, mode="fd", **kw).double()
        z, t, r, v = z.double(), t.double(), r.double(), v.double()
        J_exact = time_derivative(S64, z, t, r, v, None, mode="exact", **kw)
        u = average_velocity(S64, z, t, r, None)
        # the error that reaches the target u_tgt = v - (t - r) J, relative to |u| + |v|
        err = ((t - r)[:, None] * (J_fd - J_exact)).norm(dim=1) / (u.norm(dim=1) + v.norm(dim=1))
        assert err.max() < tol_max and err.median() < tol_med, (dtype, err.max(), err.median())
        rel = (J_fd - J_exact).norm(dim=1) / J_exact.norm(dim=1)
        assert rel[80:].median() < tol_med, (dtype, rel[80:].median())


def test_dropout_masks_are_shared_by_every_evaluation():
    from fastgen_sci.domains.toy.networks import build_network
    S = TimeGap(build_network(dim=2, sigma_data=0.5, hidden=32, depth=2, dropout=0.5), "net.embed").double().train()
    z, t, r, v = derivative_batch()
    kw = dict(t_max=T_MAX, seed=5, step=1e-3)
    J_fd, J_exact = (time_derivative(S, z, t, r, v, None, mode=m, **kw) for m in ("fd", "exact"))
    rel = (J_fd - J_exact).norm(dim=1) / J_exact.norm(dim=1)
    assert rel[80:].median() < 1e-3, rel[80:].median()  # with fresh masks per evaluation the quotient is noise


def test_finite_difference_runs_without_autocast():
    S = gap_student()
    z, t, r, v = derivative_batch(dtype=torch.float32)
    kw = dict(t_max=T_MAX, seed=0, step=1e-3)
    J = time_derivative(S, z, t, r, v, None, mode="fd", **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 cannot resolve a 1e-3 step in ln sigma
        torch.testing.assert_close(time_derivative(S, z, t, r, v, None, mode="fd", **kw), J)


def test_finite_difference_stays_inside_r_and_t_max():
    seen = []

    class Recorder(nn.Module):
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 80.0

        def forward(self, x, sigma, cond=None, gap=0.0):
            seen.append((sigma / (1 + sigma), torch.as_tensor(gap).expand(x.shape[0])))
            return x * 0.5

    z, t, r, v = derivative_batch()
    time_derivative(Recorder(), z, t, r, v, None, mode="fd", step=1e-2, t_max=T_MAX, seed=0)
    for t_eval, gap in seen:
        assert (t_eval <= T_MAX + 1e-12).all() and (gap >= -1e-12).all()


class NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule (old-style Function, no setup_context/jvp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class TanhNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.embed, self.inp, self.out, self.act = nn.Linear(1, 16), nn.Linear(2, 16), nn.Linear(16, 2), act

    def forward(self, x, c_noise, cond=None):
        return self.out(self.act(self.inp(x) + self.embed(c_noise[:, None])))


def test_fd_runs_the_loss_for_a_network_without_forward_mode_ad():
    S = TimeGap(EDMPrecond(TanhNet(NoForwardAD.apply)), "net.embed")
    teacher = EDMPrecond(TanhNet(torch.tanh)).requires_grad_(False)
    x = torch.randn(64, 2)
    run = lambda mode: meanflow_loss(S, x, None, StepRNG(0, 0), Progress(0, 0), hp=MeanFlow(jvp=mode), sigma_min=0.002,
                                     sigma_max=80.0, teacher=teacher)
    with pytest.raises(ValueError, match="jvp=fd"):
        run("exact")
    loss = run("fd").mean()
    loss.backward()
    assert torch.isfinite(loss) and S.proj.weight.grad.abs().sum() > 0


# --- the time-gap student -----------------------------------------------------------------------------

def test_time_gap_starts_as_the_teacher_for_every_r():
    teacher = toy_denoiser()
    S = TimeGap(copy.deepcopy(teacher), "net.embed")
    z, t, r, _ = derivative_batch(dtype=torch.float32)
    v_teacher = (z - teacher(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]
    torch.testing.assert_close(average_velocity(S, z, t, r, None), v_teacher, rtol=0, atol=0)
    torch.testing.assert_close(S(z, t), teacher(z, t), rtol=0, atol=0)  # a Denoiser with h = 0


def test_flow_map_ends_at_the_denoiser_with_gap_t_and_the_sampler_steps_by_hand():
    S = gap_student()
    x = torch.randn(6, 2) * 80
    sigma = torch.full((6,), 80.0)
    torch.testing.assert_close(S.flow_map(x, sigma, torch.zeros(6)), S(x, sigma, None, gap=T_MAX))
    noise = torch.randn(6, 2)
    one = SamplerSpec("flow_map")(S, noise)
    torch.testing.assert_close(one, S(80 * noise, sigma, None, gap=T_MAX))
    # two steps by hand in rectified-flow variables: z_r = z_t - (t - r) u(z_t, t, r), x = z / (1 - t)
    two = SamplerSpec("flow_map", sigmas=[1.0])(S, noise)
    z, t, r = 80 * noise / 81, torch.full((6,), T_MAX), torch.full((6,), 0.5)
    z = z - (t - r)[:, None] * average_velocity(S, z, t, r, None)
    z = z - 0.5 * average_velocity(S, z, r, torch.zeros(6), None)
    torch.testing.assert_close(two, z, rtol=1e-5, atol=1e-5)
    assert SamplerSpec("flow_map", sigmas=[1.0]).nfe == 2


def test_hooks_do_not_leak_and_ema_copies_keep_their_own_projection():
    D = toy_denoiser()
    x, sigma = torch.randn(5, 2), torch.full((5,), 3.0)
    plain = D(x, sigma).clone()
    A, B = TimeGap(D, "net.embed"), TimeGap(D, "net.embed")  # two wrappers of one network
    nn.init.normal_(A.proj.weight)
    nn.init.normal_(B.proj.bias)
    out_a, out_b = A(x, sigma, gap=0.3), B(x, sigma, gap=0.3)
    assert not torch.allclose(out_a, plain) and not torch.allclose(out_b, out_a)
    assert not torch.allclose(A(x, sigma, gap=0.6), out_a)  # the output depends on the gap
    assert len(D.net.embed._forward_hooks) == 0
    torch.testing.assert_close(D(x, sigma), plain, rtol=0, atol=0)
    ema = copy.deepcopy(A)  # the trainer's EMA copy
    nn.init.zeros_(A.proj.weight)
    torch.testing.assert_close(ema(x, sigma, gap=0.3), out_a)
    with pytest.raises(RuntimeError):
        A(x[:, :1], sigma)  # a failing call still removes its hook
    assert len(D.net.embed._forward_hooks) == 0


def test_wrong_embedding_path_names_the_candidates():
    with pytest.raises(ValueError, match="net.embed"):
        TimeGap(toy_denoiser(), "net.embedding")
    with pytest.raises(ValueError, match="set it to its noise embedding"):
        MeanFlow().players(student=toy_denoiser(), teacher=toy_denoiser())


# --- end to end on the toy pack ------------------------------------------------------------------------

def test_meanflow_distils_the_toy_mixture_in_one_step(tmp_path):
    from fastgen_sci.domains.toy import ToyPack
    from fastgen_sci.ensemble import sample_ensemble
    from fastgen_sci.train import Trainer

    pack = ToyPack(hidden=64, depth=2, n_train=20_000)
    teacher = pack.teacher()
    method = MeanFlow(embedding="net.embed", flow_ratio=0.1, lr=1e-3)  # lr: few iterations
    players = method.players(student=pack.student(teacher), teacher=teacher)
    cases, spec = pack.eval_cases(), SamplerSpec("flow_map")
    energy = lambda model: pack.score(sample_ensemble(model, spec, cases, 1000, seed=0, progress=False),
                                      cases)["energy_distance"]
    before = energy(players[0].module)
    trainer = Trainer(iterations=600, batch_size=256, ema_halflife_images=20_000, progress_bar=False, tensorboard=False,
                      device="cpu")
    trainer.fit(players, pack.dataset(), tmp_path)
    after = energy(trainer.averaged(players[0]))
    assert after < before / 10 and after < 0.1, (before, after)  # measured 1.13 -> 0.051 (0.003 with the CLI defaults)


# --- configs and the saved student ---------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["toy", "corrdiff"])
def test_configs_compose_into_the_dataclass(domain):
    import yaml
    from dataclasses import fields
    from pathlib import Path

    from fastgen_sci.config import compose
    from omegaconf import OmegaConf

    cfg = compose([f"domain={domain}", "method=meanflow"])
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    assert set(kwargs) == {f.name for f in fields(MeanFlow)}
    method = MeanFlow(**kwargs | {"betas": tuple(kwargs["betas"])})
    tuned = Path(__file__).parents[1] / "configs" / "domain_method" / f"{domain}_meanflow.yaml"
    tuned = yaml.safe_load(tuned.read_text())
    assert method.embedding == tuned["method"]["embedding"] and cfg.student_sampler.name == "flow_map"


def test_saved_meanflow_student_keeps_its_gap_embedding(tmp_path):
    from fastgen_sci.cli import load_student, save_student
    from fastgen_sci.domains.toy import ToyPack
    pack = ToyPack(hidden=32)
    model = TimeGap(pack.student(pack.teacher()), "net.embed")
    torch.nn.init.normal_(model.proj.weight)  # a trained, non-zero gap embedding
    path = save_student(pack, model, tmp_path)
    loaded = load_student(pack, str(path))
    x, sigma, sigma_r = torch.randn(8, 2), torch.full((8,), 5.0), torch.full((8,), 0.5)
    assert isinstance(loaded, TimeGap)
    torch.testing.assert_close(loaded.flow_map(x, sigma, sigma_r), model.flow_map(x, sigma, sigma_r))
    fresh = TimeGap(loaded.denoiser, "net.embed")  # the same network without the trained gap weights
    assert not torch.allclose(fresh.flow_map(x, sigma, sigma_r), model.flow_map(x, sigma, sigma_r), atol=1e-3)
