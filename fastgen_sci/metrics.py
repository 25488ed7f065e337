"""Skill and spread scores for ensembles and sample sets (SCIENCE.md section 1).

Conventions:
* An ensemble x has the member dimension first, [M, *S]; the truth y has shape [*S].
* Per-element scores keep shape S; the caller reduces (and bootstraps over cases, not pixels).
* Every score is computed and returned in float64 on the inputs' device, whatever their dtype.
* Random draws (tie breaking, projections, resampling) come from `generator` on its own device and are
  then moved to the inputs' device: a seeded CPU generator gives the same numbers for CPU and GPU inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

f64 = torch.float64
_BLOCK = 2**22  # pairwise distances or resampled values held at once (32 MiB of float64)


# ---------------------------------------------------------------- helpers
def _check_ensemble(x: Tensor, y: Tensor) -> None:
    """Raise unless x is [M, *S] with S = y.shape and M >= 1."""
    if x.ndim != y.ndim + 1 or tuple(x.shape[1:]) != tuple(y.shape) or x.shape[0] < 1:
        raise ValueError(f"ensemble x must have shape [M, *S] with S = y.shape = {tuple(y.shape)} "
                         f"and members first; got x.shape = {tuple(x.shape)}")


def _check_samples(name: str, a: Tensor, *, min_n: int = 1) -> None:
    """Raise unless a is a [N, D] sample set with N >= min_n."""
    if a.ndim != 2 or a.shape[0] < min_n:
        raise ValueError(f"{name} must be a sample set of shape [N, D] with N >= {min_n} "
                         f"(use a[:, None] for 1-D samples); got shape {tuple(a.shape)}")


def _draw_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    """Device on which random numbers are drawn: the generator's, else the inputs'."""
    return generator.device if generator is not None else fallback


def _pair_distance_sum(a: Tensor, b: Tensor, *, block_size: int = _BLOCK) -> Tensor:
    """sum_ij ||a_i - b_j|| in row blocks of at most block_size distances (exact, no Gram trick)."""
    rows = max(1, block_size // b.shape[0])
    total = torch.zeros((), dtype=f64, device=a.device)
    for start in range(0, a.shape[0], rows):
        d = torch.cdist(a[start:start + rows], b, compute_mode="donot_use_mm_for_euclid_dist")
        total = total + d.sum()
    return total


# ---------------------------------------------------------------- CRPS
def _ensemble_pair_sum(x: Tensor) -> Tensor:
    """sum_m sum_j |x_m - x_j| = 2 sum_i (2i - M - 1) x_(i), sorted form O(M log M)."""
    M = x.shape[0]
    x_sorted = x.sort(dim=0).values  # [M, *S]
    i = torch.arange(1, M + 1, dtype=f64, device=x.device)
    w = (2 * i - M - 1).reshape(M, *([1] * (x.ndim - 1)))  # [M, 1, ...]
    return 2 * (w * x_sorted).sum(0)  # [*S]


def crps_ensemble(x: Tensor, y: Tensor, *, fair: bool = True) -> Tensor:
    """Ensemble CRPS per element, fair (default, needs M >= 2) or empirical (as properscoring)."""
    _check_ensemble(x, y)
    M = x.shape[0]
    if fair and M < 2:
        raise ValueError("the fair CRPS needs M >= 2 members (its pair term divides by M(M-1)); "
                         "got M = 1: pass fair=False for the empirical CRPS, which is |x - y|")
    x, y = x.to(f64), y.to(f64)
    skill = (x - y).abs().mean(0)  # [*S]
    pairs = _ensemble_pair_sum(x)  # [*S]
    return skill - pairs / (2 * M * (M - 1) if fair else 2 * M**2)


def crps_gaussian(mu: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
    """CRPS of N(mu, sigma^2) at y: sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], broadcast."""
    mu, sigma, y = (torch.as_tensor(v, dtype=f64) for v in (mu, sigma, y))
    if bool((sigma <= 0).any()):
        raise ValueError("crps_gaussian needs sigma > 0 everywhere; got a non-positive sigma")
    z = (y - mu) / sigma
    phi = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return sigma * (z * (2 * torch.special.ndtr(z) - 1) + 2 * phi - 1 / math.sqrt(math.pi))


# ---------------------------------------------------------------- spread and skill
def _reduce_dims(dims: Optional[Sequence[int]], n: int) -> tuple[int, ...]:
    """Dims of S to reduce, as non-negative indices into S; None means all of them."""
    if dims is None:
        return tuple(range(n))
    out = tuple(int(d) for d in dims)
    if any(not -n <= d < n for d in out) or len({d % n for d in out}) != len(out):
        raise ValueError(f"dims must be distinct dims of S (S has {n} dims, members excluded); "
                         f"got dims = {tuple(dims)}")
    return tuple(d % n for d in out)


def spread_skill(x: Tensor, y: Tensor, *, dims: Optional[Sequence[int]] = None) -> dict[str, Tensor]:
    """spread = sqrt(mean s^2), skill = RMSE of the ensemble mean, ssr = sqrt((M+1)/M) spread / skill.

    Args:
        dims: dims of S (not of x) to average over before the square roots; None = all (scalars).
    """
    _check_ensemble(x, y)
    M = x.shape[0]
    if M < 2:
        raise ValueError("spread_skill needs M >= 2 members (ddof-1 variance); got M = 1")
    reduce = _reduce_dims(dims, y.ndim)
    x, y = x.to(f64), y.to(f64)
    var = x.var(dim=0, correction=1)  # [*S]
    err2 = (x.mean(0) - y) ** 2  # [*S]
    spread = var.mean(dim=reduce).sqrt() if reduce else var.sqrt()
    skill = err2.mean(dim=reduce).sqrt() if reduce else err2.sqrt()
    ssr = math.sqrt((M + 1) / M) * spread / skill  # SCIENCE.md 1: ~1 for a reliable ensemble
    return {"spread": spread, "skill": skill, "ssr": ssr}


# ---------------------------------------------------------------- rank histogram
def rank_histogram(x: Tensor, y: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Counts [M+1] (int64) of the rank of y among the members, over all of S; ties broken at random."""
    _check_ensemble(x, y)
    M = x.shape[0]
    x, y = x.to(f64), y.to(f64)
    below = (x < y).sum(0)  # [*S]
    ties = (x == y).sum(0)  # [*S]
    u = torch.rand(y.shape, generator=generator, dtype=f64,
                   device=_draw_device(generator, y.device)).to(y.device)
    rank = below + torch.floor(u * (ties + 1)).long()  # uniform over {below, ..., below + ties}
    return torch.bincount(rank.flatten(), minlength=M + 1)


def rank_flatness(counts: Tensor) -> Tensor:
    """delta = sum_k (N_k - N/(M+1))^2 / (N M/(M+1)) over the last dim; ~1 when flat."""
    counts = counts.to(f64)  # [..., M+1]
    K = counts.shape[-1]
    if K < 2:
        raise ValueError(f"counts must have M+1 >= 2 bins in its last dim; got {K}")
    N = counts.sum(-1, keepdim=True)  # [..., 1]
    delta = ((counts - N / K) ** 2).sum(-1, keepdim=True) / (N * (K - 1) / K)
    return delta.squeeze(-1)


# ---------------------------------------------------------------- energy score and distance
def energy_score(x: Tensor, y: Tensor, *, fair: bool = True) -> Tensor:
    """E||X - y|| - 0.5 E||X - X'|| per case [N], for x [M, N, D] and y [N, D]; fair needs M >= 2."""
    if x.ndim != 3 or y.ndim != 2 or tuple(x.shape[1:]) != tuple(y.shape):
        raise ValueError(f"energy_score needs x [M, N, D] and y [N, D] (flatten event dims first); "
                         f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
    M = x.shape[0]
    if fair and M < 2:
        raise ValueError("the fair energy score needs M >= 2 members; got M = 1 (use fair=False)")
    x, y = x.to(f64), y.to(f64)
    skill = torch.linalg.vector_norm(x - y, dim=-1).mean(0)  # [N]
    half = torch.zeros_like(skill)  # [N], sum over pairs i < j
    for i in range(M - 1):
        half = half + torch.linalg.vector_norm(x[i + 1:] - x[i], dim=-1).sum(0)
    return skill - 0.5 * (2 * half) / (M * (M - 1) if fair else M**2)


def energy_distance(a: Tensor, b: Tensor, *, block_size: int = _BLOCK) -> Tensor:
    """2E||A - B|| - E||A - A'|| - E||B - B'|| with U-statistics (diagonals excluded), scalar.

    Args:
        block_size: most pairwise distances held in memory at once (row blocks of torch.cdist).
    """
    _check_samples("a", a, min_n=2)
    _check_samples("b", b, min_n=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same D; got {a.shape[1]} and {b.shape[1]}")
    a, b = a.to(f64), b.to(f64)
    Na, Nb = a.shape[0], b.shape[0]
    ab = _pair_distance_sum(a, b, block_size=block_size) / (Na * Nb)
    aa = _pair_distance_sum(a, a, block_size=block_size) / (Na * (Na - 1))  # zero diagonal
    bb = _pair_distance_sum(b, b, block_size=block_size) / (Nb * (Nb - 1))
    return 2 * ab - aa - bb


# ---------------------------------------------------------------- sliced Wasserstein
def _w2_squared_1d(qa: Tensor, qb: Tensor) -> Tensor:
    """Exact W2^2 between empirical 1-D measures from sorted samples qa [P, Na], qb [P, Nb] -> [P]."""
    Na, Nb = qa.shape[-1], qb.shape[-1]
    ta = torch.arange(1, Na + 1, dtype=f64, device=qa.device) / Na
    tb = torch.arange(1, Nb + 1, dtype=f64, device=qa.device) / Nb
    t = torch.cat([ta, tb]).sort().values  # breakpoints of both quantile functions
    w = torch.diff(t, prepend=t.new_zeros(1))  # [Na + Nb] widths in probability
    mid = t - w / 2
    ia = torch.floor(mid * Na).long().clamp(max=Na - 1)
    ib = torch.floor(mid * Nb).long().clamp(max=Nb - 1)
    return (w * (qa[:, ia] - qb[:, ib]) ** 2).sum(-1)  # integral of (F_a^-1 - F_b^-1)^2


def sliced_wasserstein(a: Tensor, b: Tensor, *, n_projections: int = 128,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Sliced W2: sqrt(mean over random unit directions of the exact 1-D W2^2), scalar.

    Na != Nb is allowed: the 1-D W2 integrates the step quantile functions exactly (no interpolation).
    """
    _check_samples("a", a)
    _check_samples("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same D; got {a.shape[1]} and {b.shape[1]}")
    theta = torch.randn(a.shape[1], n_projections, generator=generator, dtype=f64,
                        device=_draw_device(generator, a.device)).to(a.device)
    theta = theta / torch.linalg.vector_norm(theta, dim=0, keepdim=True)  # [D, P] unit columns
    qa = (a.to(f64) @ theta).T.sort(dim=-1).values  # [P, Na]
    qb = (b.to(f64) @ theta).T.sort(dim=-1).values  # [P, Nb]
    return _w2_squared_1d(qa, qb).mean().sqrt()


# ---------------------------------------------------------------- spectra
def _radial_bins(H: int, W: int, *, device: torch.device) -> tuple[Tensor, Tensor]:
    """Shell index [H*W] of each FFT mode (nearest multiple of 1/min(H, W)) and shell centres k [K]."""
    n = min(H, W)
    ky = torch.fft.fftfreq(H, dtype=f64, device=device)
    kx = torch.fft.fftfreq(W, dtype=f64, device=device)
    kr = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt()  # [H, W] cycles per pixel
    shell = torch.floor(kr * n + 0.5).long().flatten()  # [H*W]
    k = torch.arange(n // 2 + 1, dtype=f64, device=device) / n  # [K], 0 ... Nyquist
    return shell, k


def radial_power_spectrum(x: Tensor) -> tuple[Tensor, Tensor]:
    """Radially averaged power |F|^2 / (H W) of fields [..., H, W]: k [K], P [..., K].

    Shells of width 1/min(H, W) centred on k = j/min(H, W) up to Nyquist 0.5; corner modes beyond are
    dropped. No detrending: the k = 0 shell holds the squared mean times H W. White noise of variance
    s^2 gives P = s^2 in every shell (Parseval).
    """
    if x.ndim < 2:
        raise ValueError(f"radial_power_spectrum needs fields [..., H, W]; got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x.to(f64)).abs() ** 2 / (H * W)  # [..., H, W]
    shell, k = _radial_bins(H, W, device=x.device)
    keep = shell < k.numel()
    flat = power.reshape(-1, H * W)[:, keep]  # [B, modes kept]
    sums = flat.new_zeros(flat.shape[0], k.numel()).index_add_(1, shell[keep], flat)  # [B, K]
    counts = torch.bincount(shell[keep], minlength=k.numel())  # [K], all >= 1
    return k, (sums / counts).reshape(*x.shape[:-2], k.numel())


def mean_member_spectrum(x: Tensor) -> tuple[Tensor, Tensor]:
    """Spectrum of each member of x [M, ..., H, W], averaged over members: k [K], P [..., K]."""
    if x.ndim < 3:
        raise ValueError(f"mean_member_spectrum needs an ensemble [M, ..., H, W]; got {tuple(x.shape)}")
    k, P = radial_power_spectrum(x)  # never the spectrum of the ensemble mean
    return k, P.mean(0)


def log_spectral_distance(P_a: Tensor, P_b: Tensor, *, dim: int = -1) -> Tensor:
    """10 sqrt(mean_k (log10 P_a / P_b)^2) in dB along dim."""
    P_a, P_b = P_a.to(f64), P_b.to(f64)
    if bool((P_a <= 0).any()) or bool((P_b <= 0).any()):
        raise ValueError("log_spectral_distance needs positive spectra; drop empty shells "
                         "(e.g. k = 0 of zero-mean fields: P[..., 1:])")
    return 10 * torch.log10(P_a / P_b).square().mean(dim=dim).sqrt()


# ---------------------------------------------------------------- Frechet distance
def _sqrtm_psd(S: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix via eigh, tiny negative eigenvalues clamped to 0."""
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp(min=0).sqrt()) @ V.T


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> Tensor:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of [N, D] features, >= 0."""
    _check_samples("feat_a", feat_a, min_n=2)
    _check_samples("feat_b", feat_b, min_n=2)
    if feat_a.shape[1] != feat_b.shape[1]:
        raise ValueError(f"features must have the same D; got {feat_a.shape[1]} and {feat_b.shape[1]}")
    a, b = feat_a.to(f64), feat_b.to(f64)
    mu_a, mu_b = a.mean(0), b.mean(0)  # [D]
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)  # [D, D], ddof 1
    root_a = _sqrtm_psd(S_a)
    inner = root_a @ S_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + S_a.trace() + S_b.trace() - 2 * tr_covmean
    return fd.clamp(min=0)


# ---------------------------------------------------------------- bootstrap over cases
def bootstrap_ci(values: Tensor, *, n_boot: int = 1000, alpha: float = 0.05,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and percentile (1 - alpha) interval of per-case values [N, *T], resampling cases."""
    if values.ndim < 1 or values.shape[0] < 1:
        raise ValueError(f"values must be per-case scores [N, ...] with N >= 1; got {tuple(values.shape)}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1; got alpha = {alpha}, n_boot = {n_boot}")
    values = values.to(f64)
    N = values.shape[0]
    per_block = max(1, _BLOCK // N)
    means = []
    for start in range(0, n_boot, per_block):
        idx = torch.randint(N, (min(per_block, n_boot - start), N), generator=generator,
                            device=_draw_device(generator, values.device)).to(values.device)
        means.append(values[idx].mean(1))  # [B, *T]
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=f64, device=values.device)
    lo, hi = torch.quantile(torch.cat(means), q, dim=0)
    return values.mean(0), lo, hi


def paired_bootstrap_ci(a: Tensor, b: Tensor, *, n_boot: int = 1000, alpha: float = 0.05,
                        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and interval of mean(a - b), resampling the same cases for both (teacher vs student)."""
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same cases and shape; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return bootstrap_ci(a.to(f64) - b.to(f64), n_boot=n_boot, alpha=alpha, generator=generator)
