"""The exact downscaling benchmark: numbers from SCIENCE.md section 2, Monte Carlo against the analytic posterior."""
import numpy as np
import pytest

from fastgen_sci.domains.corrdiff.benchmark import VARIABLES, DownscalingBenchmark, transfer_functions
from fastgen_sci.domains.corrdiff.terrain import TERRAIN_FILE, load_terrain, terrain_names


@pytest.fixture(scope="module")
def bench():
    return DownscalingBenchmark()


@pytest.fixture(scope="module")
def cases(bench):
    x = bench.sample_truth(200, seed=1)  # [200, 3, 32, 32]
    return x, bench.coarse(x, seed=2)


def fair_crps(ens, y):
    """Fair CRPS per point (SCIENCE.md section 1, sorted pair sum): ens [M, ...], y [...]."""
    M = ens.shape[0]
    skill = np.abs(ens - y).mean(0)
    w = (2 * np.arange(1, M + 1) - M - 1).reshape(-1, *([1] * y.ndim))
    pair_sum = 2 * (w * np.sort(ens, axis=0)).sum(0)  # sum_m sum_j |x_m - x_j|
    return skill - pair_sum / (2 * M * (M - 1)), pair_sum


def test_crps_star_reproduces_science_md():
    b = DownscalingBenchmark(N=32, b=4, beta=3.0, k0=2.0, t_sd=1.0, terrain=None)
    s = b.optimal_scores()["t2m"]
    assert s["crps"] == pytest.approx(0.3365, abs=2e-4)  # k integer cycles per domain, k0 in the same unit
    assert s["mae"] == pytest.approx(np.sqrt(2) * s["crps"]) and s["rmse"] >= s["mae"] * np.sqrt(np.pi / 2)


def test_prior_marginal_sd_is_the_configured_sd(bench):
    z = bench.sample_truth(400, seed=3) - bench.prior_mean  # [400, 3, N, N]
    sd = np.sqrt((z**2).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(sd, [bench.t_sd, bench.wind_sd, bench.wind_sd], rtol=0.04)


def test_kinetic_energy_spectrum_has_the_temperature_slope():
    N = 32
    H = transfer_functions(N=N, beta=3.0, k0=2.0, t_sd=1.0, wind_sd=1.0)
    ratio = (np.abs(H[1]) ** 2 + np.abs(H[2]) ** 2) / np.abs(H[0]) ** 2  # [N, N]
    inner = ratio[1:N // 2, 1:N // 2]  # away from k = 0 and the Nyquist lines
    np.testing.assert_allclose(inner, inner[0, 0], rtol=1e-10)


def dense_posterior(bench, y):
    """Brute force over all three variables jointly: Sigma = L L^T, K = Sigma A^T (A Sigma A^T + R)^-1."""
    N, b, n = bench.N, bench.b, bench.N**2
    H = transfer_functions(N=N, beta=bench.beta, k0=bench.k0, t_sd=bench.t_sd, wind_sd=bench.wind_sd)
    E = np.eye(n).reshape(n, N, N)
    L = np.zeros((3 * n, 2 * n))
    for v, src in enumerate((0, 1, 1)):
        L[v * n:(v + 1) * n, src * n:(src + 1) * n] = np.fft.ifft2(H[v] * np.fft.fft2(E)).real.reshape(n, n).T
    A1 = bench.A(E).reshape(n, -1).T  # [m, n]
    A = np.kron(np.eye(3), A1)
    Sigma = L @ L.T
    R = np.diag(np.repeat(bench.noise_sd**2, A1.shape[0]))
    K = Sigma @ A.T @ np.linalg.inv(A @ Sigma @ A.T + R)
    mu = bench.prior_mean.reshape(-1)
    m = mu + (y.reshape(len(y), -1) - A @ mu) @ K.T
    sd = np.sqrt(np.diag(Sigma - K @ A @ Sigma))
    return m.reshape(y.shape[0], 3, N, N), sd.reshape(3, N, N)


@pytest.mark.parametrize("noise_rel", [1e-3, 0.5])
def test_matches_dense_solve_on_a_small_grid(noise_rel):
    b = DownscalingBenchmark(N=16, b=4, noise_rel=noise_rel)
    y = b.coarse(b.sample_truth(3, seed=4), seed=5)
    m, sd = dense_posterior(b, y)
    np.testing.assert_allclose(b.posterior_sd(), sd, rtol=1e-6)
    np.testing.assert_allclose(b.posterior_mean(y), m, atol=1e-6)


@pytest.mark.parametrize("N, noise_rel", [(32, 1e-3), (16, 0.5)])
def test_posterior_draws_have_the_analytic_mean_and_sd(N, noise_rel):
    bench, M = DownscalingBenchmark(N=N, noise_rel=noise_rel), 40
    y = bench.coarse(bench.sample_truth(25, seed=1), seed=2)
    draws = bench.sample_posterior(y, members=M, seed=6)  # [25, M, 3, N, N]
    m, s = bench.posterior_mean(y), bench.posterior_sd()
    z_mean = (draws.mean(1) - m) / (s / np.sqrt(M))  # ~ N(0, 1) per pixel
    assert np.mean(z_mean**2) == pytest.approx(1.0, abs=0.05)
    var = ((draws - m[:, None]) ** 2).mean(axis=(0, 1))  # [3, N, N], 1000 draws per pixel
    assert np.abs(var / s**2 - 1).max() < 0.3
    nb, b = N // bench.b, bench.b
    pattern = var.reshape(3, nb, b, nb, b).mean(axis=(1, 3))  # position within a block
    s2 = (s**2).reshape(3, nb, b, nb, b).mean(axis=(1, 3))
    np.testing.assert_allclose(pattern, s2, rtol=0.04 * np.sqrt(64 / nb**2))


def test_truth_is_calibrated_against_the_posterior(bench, cases):
    x, y = cases
    z = (x - bench.posterior_mean(y)) / bench.posterior_sd()  # [200, 3, N, N]
    np.testing.assert_allclose((z**2).mean(axis=(0, 2, 3)), 1.0, atol=0.04)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=0.05)


def test_block_average_of_posterior_mean_is_y(bench, cases):
    _, y = cases
    err = np.abs(bench.A(bench.posterior_mean(y)) - y).max(axis=(0, 2, 3))  # [3]
    assert np.all(err < 5 * bench.noise_sd)


def test_fair_crps_of_exact_draws_is_crps_star(bench, cases):
    x, y = cases
    M = 8
    ens = np.moveaxis(bench.sample_posterior(y, members=M, seed=7), 1, 0)  # [M, n, 3, N, N]
    fair, pair_sum = fair_crps(ens, x)
    emp = fair + pair_sum / (2 * M * (M - 1)) - pair_sum / (2 * M**2)
    for v, name in enumerate(VARIABLES):
        star = bench.optimal_scores()[name]["crps"]
        per_case = fair[:, v].mean(axis=(-2, -1))  # cases are independent
        se = per_case.std(ddof=1) / np.sqrt(len(per_case))
        assert abs(per_case.mean() - star) < 4 * se + 1e-12, (name, per_case.mean(), star, se)
        assert emp[:, v].mean() == pytest.approx((1 + 1 / M) * star, rel=0.03)


def divergence(u, v):
    """Spectral du/dx + dv/dy on the periodic grid, Nyquist mode dropped."""
    N = u.shape[-1]
    k = np.fft.fftfreq(N, d=1.0 / N)
    k[N // 2] = 0.0
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return np.fft.ifft2(1j * kx * np.fft.fft2(u) + 1j * ky * np.fft.fft2(v)).real


def test_wind_is_divergence_free(bench, cases):
    x, y = cases
    draws = bench.sample_posterior(y[:4], members=3, seed=8)
    for w in (x[:4], bench.posterior_mean(y[:4]), draws[:, 0]):
        assert np.abs(divergence(w[:, 1], w[:, 2])).max() < 1e-9 * bench.wind_sd
    assert np.abs(divergence(x[:4, 1], -x[:4, 2])).max() > 0.1  # the check can see a divergent field


def test_lapse_rate_over_terrain(bench):
    h = bench.elevation
    assert h.max() > 1500
    mean_t = bench.sample_truth(300, seed=9)[:, 0].mean(0)  # [N, N]
    assert np.abs(mean_t - (bench.mu0 - bench.Gamma * h)).mean() < 0.15
    slope = np.polyfit(h.ravel(), mean_t.ravel(), 1)[0]
    assert slope == pytest.approx(-bench.Gamma, rel=0.05)


def test_same_seed_same_data_and_prefix_stable(bench):
    x = bench.sample_truth(6, seed=11)
    np.testing.assert_array_equal(x, bench.sample_truth(6, seed=11))
    np.testing.assert_array_equal(x[:3], bench.sample_truth(3, seed=11))
    assert not np.allclose(x, bench.sample_truth(6, seed=12))
    y = bench.coarse(x, seed=11)
    np.testing.assert_array_equal(y, bench.coarse(x, seed=11))
    d = bench.sample_posterior(y, members=2, seed=11)
    np.testing.assert_array_equal(d, bench.sample_posterior(y, members=2, seed=11))


def test_shipped_terrain_file():
    assert TERRAIN_FILE.stat().st_size < 300_000
    names = terrain_names()
    assert {"alps", "himalaya", "taiwan"} <= set(names)
    alps = load_terrain("alps")
    assert alps.elevation.shape == (64, 64) and alps.elevation.max() > 1500
    assert 43 < alps.lat.min() < alps.lat.max() < 49 and 6 < alps.lon.min() < alps.lon.max() < 12
    assert load_terrain("himalaya").elevation.max() > 6000
    for i in range(len(names)):
        p = load_terrain(i)
        assert p.elevation.min() >= 0 and np.all(p.elevation[p.land_mask == 0] == 0)
    small = load_terrain("alps", N=32)
    np.testing.assert_allclose(small.elevation, alps.elevation.reshape(32, 2, 32, 2).mean((1, 3)), rtol=1e-6)


def test_errors_speak_to_the_user(bench):
    with pytest.raises(ValueError, match="must be a multiple"):
        DownscalingBenchmark(N=30, b=4)
    with pytest.raises(ValueError, match="unknown patch"):
        load_terrain("atlantis")
    with pytest.raises(ValueError, match="must divide 64"):
        load_terrain("alps", N=48)
    with pytest.raises(ValueError, match="unknown patch"):
        DownscalingBenchmark(terrain="atlantis")
    with pytest.raises(ValueError, match="expected"):
        bench.posterior_mean(np.zeros((2, 3, 32, 32)))
