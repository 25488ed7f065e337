"""Metrics against closed forms and reference libraries (properscoring, scipy); CPU, seconds."""
import math

import numpy as np
import properscoring as ps
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist
from scipy.stats import norm

from fastgen_sci import metrics as fm

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_abs_normal(m: float, s: float) -> float:
    """E|Z| for Z ~ N(m, s^2)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m**2 / (2 * s**2)) + m * (1 - 2 * norm.cdf(-m / s))


# ---------------------------------------------------------------- CRPS
@pytest.mark.parametrize("M", [1, 2, 7, 33])
def test_crps_empirical_matches_properscoring(M):
    g = gen(0)
    x = torch.randn(M, 5, 11, generator=g, dtype=f64) * 2 + 0.3  # [M, *S]
    y = torch.randn(5, 11, generator=g, dtype=f64)
    ref = ps.crps_ensemble(y.numpy(), np.moveaxis(x.numpy(), 0, -1))
    got = fm.crps_ensemble(x, y, fair=False)
    assert got.shape == y.shape and got.dtype == f64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("M", [1, 4, 9])
def test_crps_empirical_matches_properscoring_with_ties(M):
    g = gen(1)
    x = torch.randint(-2, 3, (M, 400), generator=g).float()  # many ties, member-truth ties too
    y = torch.randint(-2, 3, (400,), generator=g).float()
    ref = ps.crps_ensemble(y.numpy().astype(np.float64), np.moveaxis(x.numpy(), 0, -1).astype(np.float64))
    got = fm.crps_ensemble(x, y, fair=False)  # float32 in, float64 out
    assert got.dtype == f64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-10)


def test_crps_m1_is_absolute_error_and_fair_m1_raises():
    x, y = torch.tensor([[1.5, -2.0]]), torch.tensor([0.5, 1.0])
    np.testing.assert_allclose(fm.crps_ensemble(x, y, fair=False).numpy(), [1.0, 3.0], atol=0)
    with pytest.raises(ValueError, match="M >= 2"):
        fm.crps_ensemble(x, y, fair=True)
    with pytest.raises(ValueError, match=r"\[M, \*S\]"):
        fm.crps_ensemble(x, y[:1])


def test_crps_emp_equals_fair_plus_pair_term():
    g = gen(2)
    M = 6
    x = torch.randn(M, 300, generator=g, dtype=f64)
    y = torch.randn(300, generator=g, dtype=f64)
    pair_mean = (x[:, None] - x[None]).abs().sum((0, 1)) / (M * (M - 1))  # E|X - X'|, [S]
    lhs = fm.crps_ensemble(x, y, fair=False)
    rhs = fm.crps_ensemble(x, y, fair=True) + pair_mean / (2 * M)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("M", [2, 10])
def test_fair_crps_of_exact_gaussian_draws(M):
    g, sigma, K = gen(3), 1.7, 50_000
    y = sigma * torch.randn(K, generator=g, dtype=f64)
    x = sigma * torch.randn(M, K, generator=g, dtype=f64)
    target = sigma / math.sqrt(math.pi)  # SCIENCE.md 1: E[CRPS] when y ~ N(mu, sigma^2)
    for fair, expect in [(True, target), (False, (1 + 1 / M) * target)]:
        c = fm.crps_ensemble(x, y, fair=fair)
        se = c.std().item() / math.sqrt(K)
        assert abs(c.mean().item() - expect) < 4 * se, (fair, c.mean().item(), expect, se)
    assert fm.crps_ensemble(x, y, fair=False).mean() > target + 20 * se  # emp is biased high


def test_crps_gaussian_matches_properscoring_and_huge_ensemble():
    mu, sigma = 0.3, 1.7
    y = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=f64)
    got = fm.crps_gaussian(torch.tensor(mu, dtype=f64), torch.tensor(sigma, dtype=f64), y)
    np.testing.assert_allclose(got.numpy(), ps.crps_gaussian(y.numpy(), mu, sigma), rtol=1e-12)
    M = 100_000  # quantile ensemble: deterministic, converges like 1/M
    q = torch.special.ndtri((torch.arange(M, dtype=f64) + 0.5) / M)
    x = (mu + sigma * q)[:, None].expand(M, 4)  # [M, 4]
    np.testing.assert_allclose(fm.crps_ensemble(x, y).numpy(), got.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="sigma > 0"):
        fm.crps_gaussian(torch.tensor(0.0), torch.tensor(0.0), y)


# ---------------------------------------------------------------- spread and skill
def _perfect(M, K, g, member_sd=1.0):
    c = 2 * torch.randn(K, generator=g, dtype=f64)  # per-case means
    y = c + torch.randn(K, generator=g, dtype=f64)
    x = c + member_sd * torch.randn(M, K, generator=g, dtype=f64)
    return x, y


@pytest.mark.parametrize("M", [2, 5, 50])
def test_ssr_of_perfect_ensemble_is_one(M):
    K = 20_000 if M == 50 else 100_000
    x, y = _perfect(M, K, gen(4))
    out = fm.spread_skill(x, y)
    se = 0.5 * math.sqrt(2 / K + 2 / ((M - 1) * K))  # delta method on spread^2 and skill^2
    assert abs(out["ssr"].item() - 1) < 4 * se, (out["ssr"].item(), se)
    uncorrected = (out["spread"] / out["skill"]).item()
    assert abs(uncorrected - math.sqrt(M / (M + 1))) < 4 * se
    x_half, y_half = _perfect(M, K, gen(5), member_sd=0.5)
    expect = math.sqrt((M + 1) / M) * 0.5 / math.sqrt(1 + 0.25 / M)
    ssr_half = fm.spread_skill(x_half, y_half)["ssr"].item()
    assert ssr_half < 0.75 and abs(ssr_half - expect) < 4 * se


def test_spread_skill_per_channel_dims():
    g = gen(6)
    M, N, C, H, W = 4, 8, 3, 5, 6
    scale = torch.tensor([0.1, 1.0, 10.0], dtype=f64)[:, None, None]  # [C, 1, 1]
    x = torch.randn(M, N, C, H, W, generator=g, dtype=f64) * scale
    y = torch.randn(N, C, H, W, generator=g, dtype=f64) * 3 * scale
    out = fm.spread_skill(x, y, dims=(0, 2, 3))
    xn, yn = x.numpy(), y.numpy()
    spread = np.sqrt(xn.var(axis=0, ddof=1).mean(axis=(0, 2, 3)))
    skill = np.sqrt(((xn.mean(0) - yn) ** 2).mean(axis=(0, 2, 3)))
    assert out["spread"].shape == (C,)
    np.testing.assert_allclose(out["spread"].numpy(), spread, rtol=1e-12)
    np.testing.assert_allclose(out["skill"].numpy(), skill, rtol=1e-12)
    np.testing.assert_allclose(out["ssr"].numpy(), math.sqrt(5 / 4) * spread / skill, rtol=1e-12)
    same = fm.spread_skill(x, y, dims=(-4, -2, -1))["ssr"]
    np.testing.assert_allclose(same.numpy(), out["ssr"].numpy(), rtol=0)
    with pytest.raises(ValueError, match="M >= 2"):
        fm.spread_skill(x[:1], y)
    with pytest.raises(ValueError, match="dims"):
        fm.spread_skill(x, y, dims=(4,))


# ---------------------------------------------------------------- rank histogram
def test_rank_histogram_perfect_is_flat_and_matches_counting():
    M, K = 10, 50_000
    x, y = _perfect(M, K, gen(7))
    counts = fm.rank_histogram(x, y, generator=gen(8))
    ref = np.bincount((x.numpy() < y.numpy()).sum(0), minlength=M + 1)  # no ties in continuous data
    np.testing.assert_array_equal(counts.numpy(), ref)
    assert fm.rank_flatness(counts).item() < 1 + 4 * math.sqrt(2 / M)  # delta ~ chi2_M / M


def test_rank_histogram_underdispersed_is_u_shaped_and_bias_is_skewed():
    M, K = 10, 50_000
    x, y = _perfect(M, K, gen(9), member_sd=0.5)
    counts = fm.rank_histogram(x, y, generator=gen(10)).double()
    assert min(counts[0], counts[-1]) > 2 * counts[1:-1].max()
    assert min(counts[0], counts[-1]) > 4 * counts[1:-1].min()
    assert fm.rank_flatness(counts).item() > 100
    counts_hi = fm.rank_histogram(x + 1.0, y, generator=gen(11))  # members too high: truth ranks low
    assert counts_hi[0] > 5 * counts_hi[-1]


def test_rank_histogram_ties_are_broken_uniformly():
    M, K = 6, 60_000
    y = torch.randint(0, 3, (K,), generator=gen(12)).float()
    x = y.expand(M, K).clone()  # every member equals the truth
    counts = fm.rank_histogram(x, y, generator=gen(13))
    assert counts.sum().item() == K and counts.shape == (M + 1,)
    assert fm.rank_flatness(counts).item() < 1 + 4 * math.sqrt(2 / M)
    assert fm.rank_flatness(torch.full((M + 1,), 7)).item() == 0.0


# ---------------------------------------------------------------- energy score and distance
@pytest.mark.parametrize("fair", [True, False])
def test_energy_score_1d_equals_crps(fair):
    g = gen(14)
    x = torch.randn(7, 50, 1, generator=g, dtype=f64)
    y = torch.randn(50, 1, generator=g, dtype=f64)
    np.testing.assert_allclose(fm.energy_score(x, y, fair=fair).numpy(),
                               fm.crps_ensemble(x[..., 0], y[..., 0], fair=fair).numpy(), atol=1e-12)


def test_energy_score_matches_scipy_pairwise():
    g = gen(15)
    M, N, D = 5, 20, 3
    x = torch.randn(M, N, D, generator=g, dtype=f64)
    y = torch.randn(N, D, generator=g, dtype=f64)
    xn, yn = x.numpy(), y.numpy()
    ref = [np.linalg.norm(xn[:, n] - yn[n], axis=-1).mean()
           - 0.5 * cdist(xn[:, n], xn[:, n]).sum() / (M * (M - 1)) for n in range(N)]
    np.testing.assert_allclose(fm.energy_score(x, y).numpy(), ref, atol=1e-12)


def test_energy_distance_gaussians_closed_form():
    g, n, mu = gen(16), 4000, 1.0
    a = torch.randn(n, 1, generator=g, dtype=f64)
    b = torch.randn(n, 1, generator=g, dtype=f64)
    assert abs(fm.energy_distance(a, b).item()) < 0.005  # same law: U-statistic, mean 0, sd ~1/n
    expect = 2 * mean_abs_normal(mu, math.sqrt(2)) - 2 * mean_abs_normal(0, math.sqrt(2))  # 0.542
    got = fm.energy_distance(a, b + mu).item()
    assert abs(got - expect) < 0.1, (got, expect)  # 4 MC sd (0.028 over 30 seeds at n = 3000)


def test_energy_distance_matches_scipy_u_statistic_in_blocks():
    g, n = gen(17), 600
    a = torch.randn(n, 2, generator=g, dtype=f64)
    b = torch.randn(n - 100, 2, generator=g, dtype=f64) * 1.5 + 0.5
    an, bn = a.numpy(), b.numpy()
    aa = cdist(an, an).sum() / (n * (n - 1))  # diagonal excluded
    bb = cdist(bn, bn).sum() / ((n - 100) * (n - 101))
    ref = 2 * cdist(an, bn).mean() - aa - bb
    np.testing.assert_allclose(fm.energy_distance(a, b).item(), ref, rtol=1e-10)
    np.testing.assert_allclose(fm.energy_distance(a, b, block_size=37 * n).item(), ref, rtol=1e-10)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fm.energy_distance(a[:, 0], b)


# ---------------------------------------------------------------- sliced Wasserstein
def test_sliced_wasserstein_identical_and_mean_shift():
    g, n, D = gen(18), 2000, 4
    a = torch.randn(n, D, generator=g, dtype=f64)
    assert fm.sliced_wasserstein(a, a.clone(), generator=gen(19)).item() == 0.0
    m = torch.tensor([2.0, -1.0, 0.5, 1.0], dtype=f64)
    b = torch.randn(n, D, generator=g, dtype=f64) + m
    got = fm.sliced_wasserstein(a, b, n_projections=1000, generator=gen(20)).item()
    expect = m.norm().item() / math.sqrt(D)  # sqrt(E_theta (m . theta)^2)
    assert abs(got - expect) / expect < 0.08, (got, expect)  # MC sd 2.4% (30 seeds); mean |m.theta| is -15%


def test_sliced_wasserstein_isotropic_scale():
    g, n, s = gen(21), 2000, 2.0
    a = torch.randn(n, 3, generator=g, dtype=f64)
    b = s * torch.randn(n, 3, generator=g, dtype=f64)
    got = fm.sliced_wasserstein(a, b, n_projections=64, generator=gen(22)).item()
    assert abs(got - (s - 1)) < 0.05, got  # every 1-D law is N(0, 1) vs N(0, s^2): W2 = |s - 1|


def test_sliced_wasserstein_unequal_sizes_is_exact_1d_w2():
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[0.0], [0.5], [1.0]])
    got = fm.sliced_wasserstein(a, b, n_projections=3, generator=gen(23)).item()
    assert abs(got - math.sqrt(1 / 12)) < 1e-12  # integral of (Q_a - Q_b)^2 by hand
    s = torch.randn(101, 1, generator=gen(24), dtype=f64)
    assert fm.sliced_wasserstein(s, s.repeat(3, 1), generator=gen(25)).item() < 1e-12  # same measure


# ---------------------------------------------------------------- spectra
@pytest.mark.parametrize("H, W", [(32, 32), (32, 48)])
def test_white_noise_spectrum_is_flat_at_variance(H, W):
    s, B = 1.5, 256
    x = s * torch.randn(B, H, W, generator=gen(23), dtype=f64)
    k, P = fm.radial_power_spectrum(x)
    K = min(H, W) // 2 + 1
    assert k.shape == (K,) and P.shape == (B, K)
    np.testing.assert_allclose(k.numpy(), np.arange(K) / min(H, W))
    P_mean = P.mean(0) / s**2  # [K]
    assert abs(P_mean.mean().item() - 1) < 0.03
    assert (P_mean[1:] - 1).abs().max().item() < 0.2
    assert abs(P_mean[0].item() - 1) < 0.4  # one real mode: relative sd sqrt(2/B)


@pytest.mark.parametrize("H, W, cy, cx, shell", [(32, 32, 4, 3, 5), (32, 48, 2, 3, 3)])
def test_plane_wave_lands_in_its_shell(H, W, cy, cx, shell):
    r, c = torch.meshgrid(torch.arange(H, dtype=f64), torch.arange(W, dtype=f64), indexing="ij")
    x = torch.cos(2 * math.pi * (cy * r / H + cx * c / W))  # |k| = sqrt((cy/H)^2 + (cx/W)^2)
    k, P = fm.radial_power_spectrum(x)
    assert int(P.argmax()) == shell
    assert P[torch.arange(len(k)) != shell].abs().max().item() < 1e-20
    n_modes = int(((torch.fft.fftfreq(H)[:, None] ** 2 + torch.fft.fftfreq(W) ** 2).sqrt()
                   * min(H, W) + 0.5).floor().eq(shell).sum())
    np.testing.assert_allclose(P[shell].item() * n_modes, H * W / 2, rtol=1e-12)  # Parseval


def test_mean_member_spectrum_and_log_spectral_distance():
    x = torch.randn(5, 2, 16, 16, generator=gen(24), dtype=f64)
    k, P = fm.mean_member_spectrum(x)
    _, P_each = fm.radial_power_spectrum(x)
    np.testing.assert_allclose(P.numpy(), P_each.mean(0).numpy(), rtol=1e-12)
    _, P_of_mean = fm.radial_power_spectrum(x.mean(0))
    assert (P_of_mean[..., 1:].mean() < 0.5 * P[..., 1:].mean()).item()  # not the mean's spectrum
    assert fm.log_spectral_distance(P, P).abs().max().item() == 0.0
    np.testing.assert_allclose(fm.log_spectral_distance(10 * P, P).numpy(), 10.0, rtol=1e-12)
    np.testing.assert_allclose(fm.log_spectral_distance(P, P / 100, dim=0).numpy(), 20.0, rtol=1e-12)
    half = torch.tensor([10.0, 1.0, 10.0, 1.0], dtype=f64)  # 10 dB in half the shells: rms, not mean
    np.testing.assert_allclose(fm.log_spectral_distance(half, torch.ones(4)).item(), 10 / math.sqrt(2))
    with pytest.raises(ValueError, match="positive"):
        fm.log_spectral_distance(P * 0, P)


# ---------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_scipy_sqrtm():
    g, D = gen(25), 6
    L = torch.randn(D, D, generator=g, dtype=f64)
    a = torch.randn(2000, D, generator=g, dtype=f64) @ L
    b = torch.randn(1500, D, generator=g, dtype=f64) * 1.3 + 0.4
    an, bn = a.numpy(), b.numpy()
    Sa, Sb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = scipy.linalg.sqrtm(Sa @ Sb).real
    ref = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(Sa + Sb - 2 * covmean)
    np.testing.assert_allclose(fm.frechet_distance(a, b).item(), ref, rtol=1e-9)
    assert fm.frechet_distance(a, a.clone()).item() < 1e-9 * np.trace(Sa)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_width_and_coverage():
    N, mu, sd = 10_000, 3.0, 2.0
    v = mu + sd * torch.randn(N, generator=gen(26), dtype=f64)
    mean, lo, hi = fm.bootstrap_ci(v, n_boot=1000, generator=gen(27))
    assert mean.item() == pytest.approx(v.mean().item(), abs=1e-14)
    assert lo < mu < hi
    assert abs((hi - lo).item() / (2 * 1.96 * sd / math.sqrt(N)) - 1) < 0.12
    R, n = 400, 40  # coverage over R independent data sets (columns), same resampled cases
    data = torch.randn(n, R, generator=gen(28), dtype=f64)
    _, lo, hi = fm.bootstrap_ci(data, n_boot=1000, generator=gen(29))
    coverage = ((lo < 0) & (0 < hi)).double().mean().item()
    assert 0.87 < coverage < 0.99, coverage  # percentile bootstrap undercovers slightly at n = 40


def test_paired_bootstrap_uses_same_cases():
    g, N = gen(30), 2000
    base = 5 * torch.randn(N, generator=g, dtype=f64)
    a = base + 0.1 + 0.2 * torch.randn(N, generator=g, dtype=f64)
    mean, lo, hi = fm.paired_bootstrap_ci(a, base, generator=gen(31))
    ref = fm.bootstrap_ci(a - base, generator=gen(31))
    for got, want in zip((mean, lo, hi), ref):
        assert got.item() == want.item()
    assert lo < 0.1 < hi and lo > 0  # detects the 0.1 offset that the case spread (5) hides
    _, lo_a, hi_a = fm.bootstrap_ci(a, generator=gen(31))
    assert (hi - lo) < 0.1 * (hi_a - lo_a)
    with pytest.raises(ValueError, match="same cases"):
        fm.paired_bootstrap_ci(a, base[:-1])


# ---------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = torch.randn(8, 4, 16, 16, generator=gen(40))  # float32 in, float64 out on the same device
    y = torch.randn(4, 16, 16, generator=gen(41))
    xc, yc = x.cuda(), y.cuda()
    pairs = [(fm.crps_ensemble(x, y), fm.crps_ensemble(xc, yc)),
             (fm.spread_skill(x, y)["ssr"], fm.spread_skill(xc, yc)["ssr"]),
             (fm.rank_histogram(x, y, generator=gen(42)), fm.rank_histogram(xc, yc, generator=gen(42))),
             (fm.mean_member_spectrum(x)[1], fm.mean_member_spectrum(xc)[1]),
             (fm.energy_distance(x[0, 0], x[1, 0]), fm.energy_distance(xc[0, 0], xc[1, 0])),
             (fm.sliced_wasserstein(x[0, 0], x[1, 0], generator=gen(43)),
              fm.sliced_wasserstein(xc[0, 0], xc[1, 0], generator=gen(43))),
             (fm.bootstrap_ci(y[:, 0, 0], generator=gen(44))[1], fm.bootstrap_ci(yc[:, 0, 0], generator=gen(44))[1])]
    for cpu, cuda in pairs:
        assert cuda.device.type == "cuda" and cuda.dtype in (f64, torch.int64)
        np.testing.assert_allclose(cuda.cpu().numpy(), cpu.numpy(), rtol=1e-9, atol=1e-12)
