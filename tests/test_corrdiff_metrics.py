"""Weather scores on exact Gaussian ensembles: truth and members i.i.d. N(mu_ij, s_ij^2) per pixel, so every
score has a closed form (SCIENCE.md 1-2), and students that are under-dispersed, smoothed or exact."""
import json
import math

import pytest
import torch

from fastgen_sci.domains.corrdiff.metrics import (binned_spread_skill, ensemble_scores, mean_spectra,
                                                  reference_scores, versus_teacher)
from fastgen_sci.domains.corrdiff.plots import (plot_rank_histograms, plot_sample_maps, plot_spectra,
                                                plot_spread_skill)
from fastgen_sci.metrics import crps_ensemble

VARS = ("t2m", "u10", "v10")
N, M, H = 32, 8, 16


@pytest.fixture(scope="module")
def law():
    """Per-pixel mean (t2m near 280 K, winds near 0 m/s) and sd s in [0.5, 1.5], [C, H, W]."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([280.0, 0.0, 0.0])[:, None, None] + 3 * torch.randn(3, H, H, generator=g, dtype=torch.float64)
    return mu, 0.5 + torch.rand(3, H, H, generator=g, dtype=torch.float64)


def draw(law, shape, seed, scale=1.0):
    mu, s = law
    g = torch.Generator().manual_seed(seed)
    return mu + scale * s * torch.randn(*shape, 3, H, H, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def data(law):
    return {"truth": draw(law, (N,), 1), "teacher": draw(law, (N, M), 2), "same": draw(law, (N, M), 3),
            "narrow": draw(law, (N, M), 4, scale=0.5)}


@pytest.fixture(scope="module")
def scores(data):
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    return {name: ensemble_scores(data[name], data["truth"], VARS, generator=g())
            for name in ("teacher", "narrow")}


def blur(ens, width=1.0):
    """Periodic Gaussian blur of each field, sd `width` pixels."""
    k = torch.fft.fftfreq(ens.shape[-1], dtype=torch.float64)
    kernel = torch.exp(-2 * math.pi**2 * width**2 * (k[:, None] ** 2 + k[None, :] ** 2))
    return torch.fft.ifft2(torch.fft.fft2(ens) * kernel).real


def all_cis(d):
    """Every (key, value, [lo, hi]) in a score dict, nested."""
    for key, val in d.items():
        if isinstance(val, dict):
            yield from all_cis(val)
        elif key.endswith("_ci"):
            yield key, d[key[:-3]], val


# ---------------------------------------------------------------- exact ensembles
def test_exact_ensemble_matches_closed_forms(law, data, scores):
    mu, s = law
    for c, v in enumerate(VARS):
        sc = scores["teacher"]["variables"][v]
        per_case = crps_ensemble(data["teacher"][:, :, c].transpose(0, 1), data["truth"][:, c]).mean((-2, -1))
        se = float(per_case.std() / math.sqrt(N))
        crps_star = float(s[c].mean()) / math.sqrt(math.pi)  # E[CRPS_fair] for y ~ forecast law
        assert sc["crps_fair"] == pytest.approx(crps_star, abs=4 * se)
        assert sc["crps_emp"] == pytest.approx((1 + 1 / M) * crps_star, abs=4 * se)  # biased by 1/M
        assert sc["ssr"] == pytest.approx(1.0, abs=0.03)  # uncorrected would be sqrt(8/9) = 0.943
        assert sc["spread"] == pytest.approx(float(s[c].square().mean().sqrt()), rel=0.02)
        assert sc["rank_flatness"] < 2.5  # chi2_M / M under the null
        es = 0.5 * math.sqrt(2 * float(s[c].square().sum()))  # 0.5 E||X - X'||, X - X' ~ N(0, 2 diag s^2)
        assert sc["energy_fair"] == pytest.approx(es, rel=0.03)
    top = scores["teacher"]
    assert (top["members"], top["cases"], top["crps_estimator"]) == (M, N, "fair")
    assert sum(top["all"]["rank_counts"]) == 3 * N * H * H and top["all"]["rank_flatness"] < 2.5
    json.dumps(top, allow_nan=False)  # JSON-ready: floats and lists only


def test_reference_scores_are_bayes_optimal_and_match_monte_carlo(law, scores):
    _, s = law
    ref = reference_scores(s, VARS, members=M)
    for c, v in enumerate(VARS):
        r, mc = ref["variables"][v], scores["teacher"]["variables"][v]
        assert r["crps_fair"] == pytest.approx(float(s[c].mean()) / math.sqrt(math.pi), rel=1e-12)
        assert r["mae"] == pytest.approx(math.sqrt(2 / math.pi) * float(s[c].mean()), rel=1e-12)
        assert r["rmse"] == pytest.approx(float(s[c].square().mean().sqrt()), rel=1e-12)
        assert r["ssr"] == 1.0
        for key in ("crps_fair", "crps_emp", "mae", "rmse", "spread", "skill", "ssr"):
            assert mc[key] == pytest.approx(r["at_members"][key], rel=0.03), key
    assert "at_members" not in reference_scores(s, VARS)["variables"]["t2m"]
    with pytest.raises(ValueError, match="posterior_sd"):
        reference_scores(s[:2], VARS)


def test_binned_spread_skill_is_on_the_diagonal_only_when_reliable(data, scores):
    for v in VARS:
        exact = scores["teacher"]["variables"][v]["spread_skill_bins"]
        narrow = scores["narrow"]["variables"][v]["spread_skill_bins"]
        ratios = [a / b for a, b in zip(exact["spread_corrected"], exact["rmse"])]
        assert all(abs(r - 1) < 0.12 for r in ratios), ratios  # same-member binning gives 0.6 ... 1.3
        assert all(a < 0.7 * b for a, b in zip(narrow["spread_corrected"], narrow["rmse"]))
        assert sum(exact["count"]) == N * H * H and exact["members_scored"] == M // 2
    with pytest.raises(ValueError, match="M >= 4"):
        binned_spread_skill(data["teacher"][:, :3, 0].transpose(0, 1), data["truth"][:, 0])


# ---------------------------------------------------------------- students
def test_under_dispersed_student_is_caught(data, scores):
    out = versus_teacher(data["narrow"], data["teacher"], data["truth"], VARS,
                         generator=torch.Generator().manual_seed(6))
    for v in VARS:
        sc = scores["narrow"]["variables"][v]
        want = math.sqrt((M + 1) / M) * 0.5 / math.sqrt(1 + 0.25 / M)  # spread 0.5 s, skill s sqrt(1 + 1/(4M))
        assert sc["ssr"] == pytest.approx(want, abs=0.02) and sc["ssr_ci"][1] < 0.6
        for counts in (sc["rank_counts"], out["variables"][v]["teacher_rank_counts"]):
            middle = sum(counts[1:-1]) / (len(counts) - 2)
            assert min(counts[0], counts[-1]) > 2 * middle  # U shape
        assert sc["rank_flatness"] > 50 and out["variables"][v]["teacher_rank_flatness"] > 50
        vt = out["variables"][v]
        assert vt["crps_diff_ci"][0] > 0 and vt["crps_rel_gap_ci"][0] > 0  # student worse, significantly
        assert vt["ssr_ratio"] == pytest.approx(vt["ssr_student"] / vt["ssr_teacher"]) and vt["ssr_ratio_ci"][1] < 0.6
        assert scores["narrow"]["variables"][v]["energy_fair"] > scores["teacher"]["variables"][v]["energy_fair"]


def test_same_law_student_is_indistinguishable(data):
    out = versus_teacher(data["same"], data["teacher"], data["truth"], VARS,
                         generator=torch.Generator().manual_seed(7))
    for v in VARS:
        vt = out["variables"][v]
        assert vt["teacher_rank_flatness"] < 2.5
        assert vt["crps_diff_ci"][0] < 0 < vt["crps_diff_ci"][1]
        assert vt["crps_rel_gap_ci"][0] < 0 < vt["crps_rel_gap_ci"][1]
        assert vt["ssr_ratio_ci"][0] < 1 < vt["ssr_ratio_ci"][1]
        assert vt["band_ratio"] == pytest.approx([1.0] * 4, abs=0.08) and vt["lsd_db"] < 0.3
    assert len(out["bands"]) == 4 and out["bands"][-1][1] == 0.5  # last band ends at Nyquist
    assert out["all"]["crps_rel_gap_ci"][0] < 0 < out["all"]["crps_rel_gap_ci"][1]
    json.dumps(out, allow_nan=False)


def test_teacher_rank_needs_no_truth(law, data):
    """A student matching a biased teacher is flat against the teacher, not against the truth."""
    bias = 0.8 * law[1]  # teacher and student both shifted by 0.8 sd
    student, teacher = data["same"] + bias, data["teacher"] + bias
    out = versus_teacher(student, teacher, data["truth"], VARS, generator=torch.Generator().manual_seed(3), n_boot=10)
    sc = ensemble_scores(student, data["truth"], VARS, generator=torch.Generator().manual_seed(3), n_boot=10)
    for v in VARS:
        assert out["variables"][v]["teacher_rank_flatness"] < 2.5 < 50 < sc["variables"][v]["rank_flatness"]


def test_teacher_rank_flatness_is_one_under_the_null_after_pooling():
    """Pooling M' teacher members inflates the raw flatness to (M + M' + 1)/(M + 2) ~ 1.94 at M = M' = 32."""
    g = torch.Generator().manual_seed(8)
    z = lambda m: torch.randn(8, m, 4, H, H, generator=g, dtype=torch.float64)  # noqa: E731
    out = versus_teacher(z(32), z(32), z(1)[:, 0], ("a", "b", "c", "d"), generator=g, n_boot=10)
    mean_flatness = sum(s["teacher_rank_flatness"] for s in out["variables"].values()) / 4
    assert mean_flatness == pytest.approx(1.0, abs=0.35)


def test_smoothed_student_loses_small_scales(data):
    blurred = versus_teacher(blur(data["same"]), data["teacher"], data["truth"], VARS,
                             generator=torch.Generator().manual_seed(9), n_boot=10)
    for v in VARS:
        vt = blurred["variables"][v]
        assert vt["band_ratio"][-1] < 0.1 and vt["band_ratio"][0] > 0.6  # Gaussian transfer exp(-4 pi^2 k^2)
        assert vt["band_ratio"] == sorted(vt["band_ratio"], reverse=True)
        assert vt["lsd_db"] > 3 and vt["lsd_student_truth_db"] > 3 > vt["lsd_teacher_truth_db"]


# ---------------------------------------------------------------- uncertainty over cases
def constant_fields(n_cases, size, seed):
    """Each case and member is one constant field: all pixels of a case share their randomness."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n_cases, 1, 1, 1, generator=g, dtype=torch.float64).expand(-1, 1, size, size)
    ens = torch.randn(n_cases, M, 1, 1, 1, generator=g, dtype=torch.float64).expand(-1, -1, 1, size, size)
    return ens, truth


def test_intervals_are_well_formed_and_resample_cases(scores, data):
    for sc in scores.values():
        for key, val, (lo, hi) in all_cis(sc):
            assert lo <= val <= hi, key
    out = versus_teacher(data["same"], data["teacher"], data["truth"], VARS, generator=torch.Generator().manual_seed(1))
    assert all(lo <= val <= hi for _, val, (lo, hi) in all_cis(out))

    def width(n_cases, size, key="crps_fair_ci"):
        ens, truth = constant_fields(n_cases, size, seed=n_cases)
        lo, hi = ensemble_scores(ens, truth, ("x",), generator=torch.Generator().manual_seed(0))["variables"]["x"][key]
        return hi - lo
    for key in ("crps_fair_ci", "rmse_ci", "ssr_ci"):  # more pixels of a case add no information
        assert width(32, 4, key) == pytest.approx(width(32, 32, key), rel=1e-9)
    for n_cases in (32, 512):  # 2 x 1.96 sd / sqrt(N cases); over pixels it would be 4x narrower
        ens, truth = constant_fields(n_cases, 4, seed=n_cases)
        per_case = crps_ensemble(ens[:, :, 0, 0, 0].T, truth[:, 0, 0, 0])
        assert width(n_cases, 4) == pytest.approx(3.92 * float(per_case.std()) / math.sqrt(n_cases), rel=0.2)


def test_bad_inputs_say_what_was_expected(data):
    with pytest.raises(ValueError, match="variable names"):
        ensemble_scores(data["teacher"], data["truth"], ("t2m", "u10"))
    with pytest.raises(ValueError, match=r"\[N, M, C, H, W\]"):
        ensemble_scores(data["teacher"][:, 0], data["truth"], VARS)
    with pytest.raises(ValueError, match="M >= 2"):
        versus_teacher(data["teacher"][:, :1], data["teacher"], data["truth"], VARS)
    with pytest.raises(ValueError, match="fields must be"):
        mean_spectra(data["truth"], ("t2m",))


# ---------------------------------------------------------------- plots
def test_plots_write_png_files(tmp_path, data, scores):
    vt = versus_teacher(data["narrow"], data["teacher"], data["truth"], VARS, n_boot=10)
    spectra = {"truth": mean_spectra(data["truth"], VARS), "teacher": mean_spectra(data["teacher"], VARS),
               "student": mean_spectra(data["narrow"], VARS)}
    lat, lon = torch.meshgrid(torch.linspace(45, 47, H), torch.linspace(7, 10, H), indexing="ij")
    paths = [plot_rank_histograms({"teacher": scores["teacher"], "student": scores["narrow"]}, tmp_path, versus=vt),
             plot_spectra(spectra, tmp_path),
             plot_spread_skill({"teacher": scores["teacher"], "student": scores["narrow"]}, tmp_path),
             plot_sample_maps(data["truth"], {"teacher": data["teacher"], "student": data["narrow"]}, VARS,
                              lat, lon, tmp_path / "maps")]
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000, p
    assert len({p.name for p in paths}) == 4
