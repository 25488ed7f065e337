"""SFT and ECT: the losses against closed forms, and ECT's effect on the toy pack."""
import math

import pytest
import torch

from fastgen_sci.denoiser import expand_sigma
from fastgen_sci.methods.ect import ECT, ect_loss, ect_r, ect_ratio
from fastgen_sci.methods.sft import SFT, dsm_loss
from fastgen_sci.rng import StepRNG
from fastgen_sci.train import Progress


class GaussianFamily(torch.nn.Module):
    """D(x; sigma) = s^2 / (s^2 + sigma^2) x with a learnable s: exact for N(0, s*^2) data at s = s*."""

    def __init__(self, s: float):
        super().__init__()
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(s), dtype=torch.float64))
        self.sigma_data, self.sigma_min, self.sigma_max = 1.0, 0.002, 80.0

    def forward(self, x, sigma, cond=None):
        s2 = (2 * self.log_s).exp()
        return s2 / (s2 + expand_sigma(sigma, x) ** 2) * x


def mean_grad(loss_fn, model, x, repeats=8):
    grads = []
    for k in range(repeats):
        model.zero_grad()
        loss_fn(model, x, None, StepRNG(k, 0), Progress(0, 0)).mean().backward()
        grads.append(model.log_s.grad.item())
    g = torch.tensor(grads)
    return g.mean().item(), g.std().item() / math.sqrt(repeats)


@pytest.mark.parametrize("P_mean", [-1.2, 0.0])
def test_dsm_gradient_vanishes_at_the_exact_denoiser_only(P_mean):
    torch.manual_seed(0)
    x = torch.randn(50_000, 4, dtype=torch.float64) * 0.8
    loss = lambda D, *a: dsm_loss(D, *a, sigma_data=1.0, P_mean=P_mean, P_std=1.2)
    g_exact, se = mean_grad(loss, GaussianFamily(0.8), x)
    assert abs(g_exact) < 4 * se + 1e-3, (g_exact, se)
    g_small, _ = mean_grad(loss, GaussianFamily(0.6), x)
    g_large, _ = mean_grad(loss, GaussianFamily(1.1), x)
    assert g_small < -10 * se and g_large > 10 * se  # gradient descent moves s back towards 0.8


def test_dsm_weighting_is_edm_lambda():
    D = GaussianFamily(0.5)
    x = torch.zeros(3, 2, dtype=torch.float64)
    rng = StepRNG(0, 0)
    per_sample = dsm_loss(D, x, None, rng, Progress(0, 0), sigma_data=0.5, P_mean=0.0, P_std=1.0)
    rng = StepRNG(0, 0)
    sigma = (0.0 + 1.0 * rng.randn(3)).exp().double()
    eps = rng.randn(3, 2).double()
    x0_hat = D(sigma[:, None] * eps, sigma)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(per_sample, lam * (x0_hat**2).mean(1))


def test_ect_schedule():
    assert ect_ratio(0, images_per_stage=100, q=2, ratio_limit=0.999) == 0.5
    assert ect_ratio(250, images_per_stage=100, q=2, ratio_limit=0.999) == 1 - 2**-3
    assert ect_ratio(10**6, images_per_stage=100, q=2, ratio_limit=0.999) == 0.999
    t = torch.tensor([0.01, 1.0, 80.0])
    r = ect_r(t, 0.5)
    assert r[0] == 0  # clamped: small t maps to the data end
    torch.testing.assert_close(r[2], torch.tensor(40.0), rtol=1e-6, atol=1e-6)  # sigmoid(-80) ~ 0: r = t/2
    torch.testing.assert_close(r[1], 1.0 - 0.5 * (1 + 8 * torch.sigmoid(torch.tensor(-1.0))).clamp(max=2), rtol=1e-6, atol=1e-6)


def test_ect_loss_at_r_zero_is_distance_to_data_over_t():
    """Stage 0 with tiny t: r = 0, target is x itself; loss = ||f(y_t, t) - x|| / t."""
    hp = ECT(P_mean=math.log(0.01), P_std=1e-6, c=0.0)
    f = GaussianFamily(1e6)  # f ~ identity: f(y_t) = y_t
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = ect_loss(f, x, None, StepRNG(1, 0), Progress(0, 0), hp=hp)
    rng = StepRNG(1, 0)
    rng.randn(4)
    eps = rng.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(loss, (0.01 * eps).norm(dim=1) / 0.01, rtol=1e-4, atol=1e-6)


def test_ect_cd_requires_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        ECT(variant="cd").players(student=GaussianFamily(1.0), teacher=None)
    with pytest.raises(ValueError, match="variant"):
        ECT(variant="xx")
    with pytest.raises(ValueError, match="solver"):
        ECT(variant="cd", solver="rk4")


def test_cd_teacher_steps_against_the_exact_probability_flow(gaussian_denoiser):
    """One step of N(0, s^2)'s PF-ODE, y_r = y_t sqrt((s^2 + r^2) / (s^2 + t^2)): Euler's local error falls
    as (t - r)^2, Heun's as (t - r)^3; at r = 0 both return the teacher's denoised estimate."""
    from fastgen_sci.methods.ect import euler_step, heun_step
    s, t = gaussian_denoiser.s, torch.full((256,), 2.0, dtype=torch.float64)
    y_t = torch.randn(256, 3, dtype=torch.float64) * math.sqrt(s**2 + 4.0)

    def err(step, dt):
        r = t - dt
        exact = y_t * ((s**2 + r**2) / (s**2 + t**2)).sqrt()[:, None]
        return float((step(gaussian_denoiser, y_t, t, r, None) - exact).abs().max())

    dts = (0.2, 0.1, 0.05)
    euler_errs, heun_errs = [err(euler_step, d) for d in dts], [err(heun_step, d) for d in dts]
    for coarse, fine in zip(euler_errs, euler_errs[1:]):
        assert 3.5 < coarse / fine < 4.5, euler_errs
    for coarse, fine in zip(heun_errs, heun_errs[1:]):
        assert 7.0 < coarse / fine < 9.0, heun_errs
    r = torch.where(torch.arange(256) % 2 == 0, 0.0, 1.0).double()  # r = 0 rows: the denoised estimate
    out = heun_step(gaussian_denoiser, y_t, t, r, None)
    torch.testing.assert_close(out[::2], gaussian_denoiser(y_t, t)[::2])
    assert torch.isfinite(out).all()


def test_ect_drives_energy_distance_far_below_the_untrained_student(tmp_path):
    from fastgen_sci.domains.toy import ToyPack
    from fastgen_sci.ensemble import sample_ensemble
    from fastgen_sci.samplers import SamplerSpec
    from fastgen_sci.train import Trainer

    pack = ToyPack(hidden=128, depth=2, n_train=20_000)
    teacher = pack.teacher()
    student = pack.student(teacher)
    one_step = SamplerSpec("few_step")
    cases = pack.eval_cases()

    def ed(model):
        return pack.score(sample_ensemble(model.eval(), one_step, cases, 1000, progress=False), cases)["energy_distance"]

    before = ed(student)
    hp = ECT(variant="cd", P_mean=0.5, c=1.0, images_per_stage=1000 * 256 // 6)
    players = hp.players(student=student.train(), teacher=teacher)
    trainer = Trainer(iterations=1000, batch_size=256, ema_halflife_images=20_000, progress_bar=False, tensorboard=False)
    trainer.fit(players, pack.dataset(), tmp_path)
    after = ed(trainer.averaged(players[0]))
    assert after < before / 10, (before, after)  # measured: 1.13 -> 0.08 here (0.003 with the CLI defaults)


def test_balanced_channels_weigh_each_variable_by_its_inverse_scale():
    from fastgen_sci.methods.ect import channel_weights
    z = torch.randn(64, 1, 8, 8, dtype=torch.float64).expand(64, 3, 8, 8)  # one field, three scales
    x = z * torch.tensor([0.25, 0.5, 0.5], dtype=torch.float64)[:, None, None]
    w = channel_weights(x)
    assert abs(w.mean().item() - 1) < 1e-12
    torch.testing.assert_close(w, torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64))  # 1/RMS, mean 1
    # the balanced distance of an error proportional to each channel's scale counts every channel alike
    hp = ECT(P_mean=math.log(0.01), P_std=1e-6, c=0.0, balance_channels=True)
    f = GaussianFamily(1e6)
    loss = ect_loss(f, x, None, StepRNG(3, 0), Progress(0, 0), hp=hp)
    rng = StepRNG(3, 0)
    rng.randn(64)
    eps = rng.randn(64, 3, 8, 8, dtype=torch.float64)
    want = (0.01 * eps * w.reshape(1, 3, 1, 1)).flatten(1).norm(dim=1) / 0.01
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
