"""The exact downscaling benchmark (SCIENCE.md section 2): linear-Gaussian fields over real terrain.

Fine state x = (t2m, u10, v10) on an N x N periodic grid, coarse input y = A x + e with A the b x b block
average and e ~ N(0, r^2 I). Prior: t2m = mu0 - Gamma h + z_T; (u10, v10) = (-d psi/dy, d psi/dx) for an
independent streamfunction psi. z_T has the 2-D spectrum P(k) = (k0^2 + |k|^2)^(-beta/2) and psi has
P(k) / |k|^2, so that |u_k|^2 + |v_k|^2 is proportional to P(k): wind and temperature share the slope.
Wavenumbers k are integers in cycles per domain and k0 is in the same unit (this convention gives
SCIENCE.md's CRPS* = 0.3365 for N = 32, b = 4, beta = 3, k0 = 2, prior sd 1). Spectral derivatives
drop the Nyquist mode; the grid is treated as square and periodic (terrain need not be).
Exact posterior: K = Sigma A^T (A Sigma A^T + R)^-1, m(y) = mu + K (y - A mu), Sigma_post = Sigma - K A Sigma,
for t2m alone and for (u10, v10) jointly. Sigma A^T is built column by column with FFTs (Sigma is never
formed), so only the (N/b)^2 (t2m) or 2 (N/b)^2 (wind) coarse system is solved densely.
Arrays are numpy float64 in physical units (K, m/s), axis -2 is y (south to north), -1 is x (west to east).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.linalg

from .terrain import block_mean, load_terrain

VARIABLES = ("t2m", "u10", "v10")
GROUPS = ((0,), (1, 2))  # variables observed together: t2m alone, the wind pair jointly
_TRUTH, _COARSE, _POST_PRIOR, _POST_NOISE = 0, 1, 2, 3  # stream tags: one seed, independent streams


def wavenumbers(N: int) -> tuple[np.ndarray, np.ndarray]:
    """ky, kx [N, N] in integer cycles per domain."""
    k = np.fft.fftfreq(N, d=1.0 / N)
    return np.meshgrid(k, k, indexing="ij")


def derivative_symbols(N: int) -> tuple[np.ndarray, np.ndarray]:
    """i ky, i kx [N, N]: spectral d/dy, d/dx for a domain 2 pi long (psi is rescaled), Nyquist zeroed."""
    ky, kx = wavenumbers(N)
    if N % 2 == 0:
        ky, kx = np.where(ky == -N // 2, 0.0, ky), np.where(kx == -N // 2, 0.0, kx)
    return 1j * ky, 1j * kx


def power_spectrum(N: int, beta: float, k0: float) -> np.ndarray:
    """P(k) = (k0^2 + |k|^2)^(-beta/2), unnormalised [N, N]."""
    ky, kx = wavenumbers(N)
    return (k0**2 + kx**2 + ky**2) ** (-beta / 2)


def transfer_functions(*, N: int, beta: float, k0: float, t_sd: float, wind_sd: float) -> np.ndarray:
    """H [3, N, N]: variable v = ifft2(H_v fft2(w_src(v))), w white; sources (T, psi, psi)."""
    P = power_spectrum(N, beta, k0)
    ky, kx = wavenumbers(N)
    P_psi = np.divide(P, kx**2 + ky**2, out=np.zeros_like(P), where=(kx**2 + ky**2) > 0)
    Dy, Dx = derivative_symbols(N)
    H_T = np.sqrt(P / P.mean()) * t_sd  # pointwise variance mean|H|^2 = t_sd^2
    H_psi = np.sqrt(P_psi / np.mean(np.abs(Dy) ** 2 * P_psi)) * wind_sd
    return np.stack([H_T + 0j, -Dy * H_psi, Dx * H_psi])  # u = -d psi/dy, v = d psi/dx


def block_indicators(N: int, b: int) -> np.ndarray:
    """Columns of A^T: [(N/b)^2, N, N], column j is 1/b^2 on coarse cell j (row-major)."""
    n_c = N // b
    cell = (np.arange(N)[:, None] // b) * n_c + np.arange(N)[None, :] // b  # [N, N]
    return (cell[None] == np.arange(n_c * n_c)[:, None, None]) / b**2


def sigma_At(H: np.ndarray, group: tuple[int, ...], b: int) -> np.ndarray:
    """Sigma A^T [V n, V m] for the variables of one group (cross-spectra H_a conj(H_c))."""
    N = H.shape[-1]
    B_hat = np.fft.fft2(block_indicators(N, b))  # [m, N, N]
    rows = [np.concatenate([np.fft.ifft2(H[a] * np.conj(H[c]) * B_hat).real.reshape(len(B_hat), -1).T
                            for c in group], axis=1) for a in group]
    return np.concatenate(rows, axis=0)


@dataclasses.dataclass(frozen=True)
class GroupPosterior:
    """What the exact posterior of one variable group needs, independent of y."""

    K: np.ndarray  # [V n, V m] gain
    sd: np.ndarray  # [V, N, N] posterior sd per pixel


def group_posterior(*, H: np.ndarray, group: tuple[int, ...], b: int, r: np.ndarray) -> GroupPosterior:
    """K = Sigma A^T (A Sigma A^T + R)^-1 and sqrt(diag(Sigma - K A Sigma)) for one group."""
    N, V = H.shape[-1], len(group)
    SAt = sigma_At(H, group, b)  # [V n, V m]
    ASAt = block_mean(SAt.T.reshape(SAt.shape[1], V, N, N), b).reshape(SAt.shape[1], -1).T  # [V m, V m]
    R = np.repeat(np.asarray(r, dtype=np.float64) ** 2, ASAt.shape[0] // V)  # [V m]
    G = 0.5 * (ASAt + ASAt.T) + np.diag(R)
    K = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G), SAt.T).T  # G symmetric
    prior_var = np.repeat(np.mean(np.abs(H[list(group)]) ** 2, axis=(-2, -1)), N * N)  # diag Sigma
    post_var = prior_var - np.einsum("ij,ij->i", K, SAt)
    return GroupPosterior(K=K, sd=np.sqrt(np.maximum(post_var, 0.0)).reshape(V, N, N))


def bayes_scores(s: np.ndarray) -> dict[str, float]:
    """Scores of the exact posterior given per-pixel sd s: CRPS*, MAE and RMSE of the mean m(y)."""
    return {"crps": float(s.mean() / np.sqrt(np.pi)), "mae": float(np.sqrt(2 / np.pi) * s.mean()),
            "rmse": float(np.sqrt(np.mean(s**2)))}


def _white(seed: int, tag: int, keys: list[tuple[int, ...]], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normals [len(keys), *shape], row i from its own stream (seed, tag, *keys[i])."""
    return np.stack([np.random.default_rng([seed, tag, *k]).standard_normal(shape) for k in keys])


@dataclasses.dataclass(frozen=True)
class DownscalingBenchmark:
    """The exact linear-Gaussian downscaling benchmark: truth, coarse input and exact posterior."""

    N: int = 32
    b: int = 4
    beta: float = 3.0
    k0: float = 2.0  # cycles per domain
    t_sd: float = 2.0  # K, prior sd of t2m about the lapse-rate mean
    wind_sd: float = 3.0  # m/s, prior sd of each wind component
    Gamma: float = 6.5e-3  # K/m lapse rate
    mu0: float = 288.0  # K at sea level
    noise_rel: float = 1e-3  # r = noise_rel * prior sd, per variable
    terrain: str | None = "alps"  # a shipped patch name (terrain.terrain_names()), or None for flat

    def __post_init__(self):
        if self.b < 1 or self.N % self.b:
            raise ValueError(f"DownscalingBenchmark: N={self.N} must be a multiple of b={self.b}")
        if not self.noise_rel > 0:
            raise ValueError("DownscalingBenchmark: noise_rel must be > 0 (a tiny jitter keeps A Sigma A^T + R "
                             "invertible; the periodic wind has no domain mean)")
        _ = self.elevation  # an unknown patch or an N that does not divide 64 fails here, not later

    @functools.cached_property
    def elevation(self) -> np.ndarray:
        """Terrain height h [N, N] in metres (0 over the sea)."""
        if self.terrain is None:
            return np.zeros((self.N, self.N))
        return load_terrain(self.terrain, N=self.N).elevation.astype(np.float64)

    @functools.cached_property
    def prior_mean(self) -> np.ndarray:
        """mu [3, N, N]: mu0 - Gamma h for t2m, zero wind."""
        mu = np.zeros((3, self.N, self.N))
        mu[0] = self.mu0 - self.Gamma * self.elevation
        return mu

    @functools.cached_property
    def H(self) -> np.ndarray:
        """Transfer functions [3, N, N] (complex) from white noise to the zero-mean prior fields."""
        return transfer_functions(N=self.N, beta=self.beta, k0=self.k0, t_sd=self.t_sd, wind_sd=self.wind_sd)

    @functools.cached_property
    def noise_sd(self) -> np.ndarray:
        """r [3] per variable, in physical units."""
        return self.noise_rel * np.array([self.t_sd, self.wind_sd, self.wind_sd])

    @functools.cached_property
    def posteriors(self) -> tuple[GroupPosterior, ...]:
        """Gain and posterior sd per group in GROUPS; built once (depends only on the covariance)."""
        return tuple(group_posterior(H=self.H, group=g, b=self.b, r=self.noise_sd[list(g)]) for g in GROUPS)

    def prior_draw(self, white: np.ndarray) -> np.ndarray:
        """Zero-mean prior fields [..., 3, N, N] from white noise [..., 2, N, N] (sources T, psi)."""
        w_hat = np.fft.rfft2(white)[..., [0, 1, 1], :, :]  # [..., 3, N, N/2 + 1]; H is Hermitian
        return np.fft.irfft2(self.H[..., : self.N // 2 + 1] * w_hat, s=(self.N, self.N))

    def sample_truth(self, n_cases: int, *, seed: int) -> np.ndarray:
        """Fine truth x [n, 3, N, N]; case i depends only on (seed, i)."""
        white = _white(seed, _TRUTH, [(i,) for i in range(n_cases)], (2, self.N, self.N))
        return self.prior_mean + self.prior_draw(white)

    def A(self, x: np.ndarray) -> np.ndarray:
        """Block average [..., N, N] -> [..., N/b, N/b]."""
        return block_mean(x, self.b)

    def coarse(self, x: np.ndarray, *, seed: int) -> np.ndarray:
        """y = A x + e [n, 3, N/b, N/b]; noise of case i depends only on (seed, i)."""
        e = _white(seed, _COARSE, [(i,) for i in range(len(x))], (3, self.N // self.b, self.N // self.b))
        return self.A(x) + self.noise_sd[:, None, None] * e

    def _correct(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x + K (y - A x), group by group: [n, 3, N, N] from y [n, 3, N/b, N/b], x [n, 3, N, N]."""
        out = x.copy()
        for g, post in zip(GROUPS, self.posteriors):
            d = (y[:, list(g)] - self.A(x[:, list(g)])).reshape(len(y), -1)  # [n, V m]
            out[:, list(g)] += (d @ post.K.T).reshape(len(y), len(g), self.N, self.N)
        return out

    def posterior_mean(self, y: np.ndarray) -> np.ndarray:
        """m(y) = mu + K (y - A mu) [n, 3, N, N]."""
        y = self._check_coarse(y)
        return self._correct(y, np.broadcast_to(self.prior_mean, (len(y), 3, self.N, self.N)))

    def posterior_sd(self) -> np.ndarray:
        """Per-pixel posterior sd s [3, N, N] (the same for every y)."""
        return np.concatenate([post.sd for post in self.posteriors])

    def sample_posterior(self, y: np.ndarray, *, members: int, seed: int) -> np.ndarray:
        """Exact draws [n, M, 3, N, N]: x' + K (y - A x' - e') with (x', e') ~ prior, keyed (seed, case, member)."""
        y = self._check_coarse(y)
        n, M, n_c = len(y), members, self.N // self.b
        keys = [(i, j) for i in range(n) for j in range(M)]
        x_p = self.prior_mean + self.prior_draw(_white(seed, _POST_PRIOR, keys, (2, self.N, self.N)))
        e_p = self.noise_sd[:, None, None] * _white(seed, _POST_NOISE, keys, (3, n_c, n_c))
        y_rep = np.repeat(y, M, axis=0) - e_p  # [n M, 3, n_c, n_c]
        return self._correct(y_rep, x_p).reshape(n, M, 3, self.N, self.N)

    def optimal_scores(self) -> dict[str, dict[str, float]]:
        """Bayes-optimal CRPS*, MAE* and RMSE* per variable (SCIENCE.md section 2)."""
        return {v: bayes_scores(s) for v, s in zip(VARIABLES, self.posterior_sd())}

    def _check_coarse(self, y: np.ndarray) -> np.ndarray:
        """y as float64 [n, 3, N/b, N/b], or one clear error."""
        y = np.asarray(y, dtype=np.float64)
        want = (3, self.N // self.b, self.N // self.b)
        if y.ndim != 4 or y.shape[1:] != want:
            raise ValueError(f"coarse input y has shape {y.shape}; expected [n_cases, {', '.join(map(str, want))}] "
                             f"for variables {VARIABLES} (use benchmark.coarse(x, seed=...))")
        return y
