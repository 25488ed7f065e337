"""The CorrDiff pack end to end on real PhysicsNeMo networks: small grids, tiny SongUNets, real files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastgen_sci.domains.corrdiff import CorrDiffPack
from fastgen_sci.domains.corrdiff import networks as nw

DATA = {"path": None, "n_times": 72, "eval_times": 8, "seed": 0, "benchmark": {"N": 16, "b": 4, "terrain": "alps"}}
NET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Untrained tiny regression + residual .mdlus files fitting the 16 x 16 benchmark (5 -> 3 channels)."""
    root = tmp_path_factory.mktemp("teacher")
    reg = nw.save_mdlus(nw.build_regression(5, 3, 16, **NET), root / "regression.mdlus")
    res = nw.save_mdlus(nw.build_residual(5, 3, 16, **NET), root / "residual.mdlus")
    return {"regression": str(reg), "residual": str(res)}


def pack(teacher, **data):
    return CorrDiffPack(data={**DATA, **data}, teacher={**teacher, "sigma_max": 800.0}, network=NET, batch_size=16)


def test_residual_dataset_and_cases_decode_back_to_the_truth(tiny_teacher):
    p = pack(tiny_teacher)
    ds = p.dataset()
    assert len(ds) == 64 and ds.__getitems__([0, 1])["cond"]["img_lr"].shape == (2, 5, 16, 16)
    cases = p.eval_cases()
    # residual truth + regression mean, denormalised, is the physical truth of the held-out times
    torch.testing.assert_close(p.physical(cases.truth[:, None], cases)[:, 0], cases.extra["truth"], rtol=1e-5, atol=1e-4)
    # the codec round-trips and its normalised outputs have the data's per-variable moments
    y = cases.extra["truth"]
    torch.testing.assert_close(p.codec.decode(p.codec.encode(y, cases.extra["mu"]), cases.extra["mu"]), y, rtol=1e-5, atol=1e-4)
    train = p.target(p.split("train"))
    assert train.mean(dim=(0, 2, 3)).abs().max() < 0.1 and (train.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    truth = p.data.outputs(p.split("eval"))
    torch.testing.assert_close(cases.extra["truth"], torch.from_numpy(truth), rtol=1e-5, atol=1e-4)
    # the guard's validation cases: the last training times, disjoint from the evaluation times
    val = p.validation_cases(5)
    assert val.n == 5 and val.cond["img_lr"].shape == (5, 5, 16, 16)
    assert list(val.extra["time"]) == list(p.data.time[p.split("train")[-5:]])
    assert not set(val.extra["time"]) & set(cases.extra["time"])
    torch.testing.assert_close(val.truth, ds.residual[-5:], rtol=1e-5, atol=1e-5)  # what the student trains on


def test_exact_posterior_draws_score_like_the_optimum(tiny_teacher):
    """The pack's scores on exact posterior draws recover CRPS* and SSR 1: the scoring path is right."""
    p = pack(tiny_teacher, n_times=264, eval_times=200)
    cases = p.eval_cases()
    draws = p.optimal_samples(cases, members=8)  # physical [N, M, C, H, W]
    residual = p.codec.encode(draws, cases.extra["mu"][:, None])
    scores, ref = p.score(residual, cases), p.reference(cases, 8)
    for v in ("t2m", "u10", "v10"):
        assert abs(scores[f"crps_fair:{v}"] / ref[f"crps_fair:{v}"] - 1) < 0.04, (v, scores[f"crps_fair:{v}"])
        assert abs(scores[f"crps_gap_rel:{v}"]) < 0.04
        assert 0.93 < scores[f"ssr:{v}"] < 1.07, (v, scores[f"ssr:{v}"])


def test_teacher_and_data_that_disagree_say_how(tiny_teacher, tmp_path):
    p = pack(tiny_teacher, invariant_vars=["elevation"])  # 4 condition channels, teacher wants 5
    with pytest.raises(ValueError, match=r"expects .*\(5, 3, \(16, 16\)\).*gives \(4, 3, \(16, 16\)\)"):
        p.teacher()
    wrong_class = pack({**tiny_teacher, "residual": tiny_teacher["regression"]})
    with pytest.raises(Exception, match="CorrDiffRegressionUNet.*EDMPrecondSuperResolution"):
        wrong_class.teacher()
    junk = tmp_path / "junk.mdlus"
    junk.write_bytes(b"not a zip")
    with pytest.raises(Exception, match="junk.mdlus"):
        pack({**tiny_teacher, "residual": str(junk)}).teacher()
    with pytest.raises(Exception, match="precip.*available|available.*precip"):
        _ = pack(tiny_teacher, output_vars=["t2m", "precip"]).data


def test_user_data_needs_an_explicit_teacher(tiny_teacher, tmp_path):
    src = pack(tiny_teacher).data.source
    p = CorrDiffPack(data={**DATA, "path": str(src)}, teacher={"regression": None, "residual": None})
    with pytest.raises(ValueError, match="teacher.regression=PATH.mdlus is required"):
        p.regression()


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastgen_sci.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_distill_evaluate_generate_on_the_cli(tiny_teacher, tmp_path):
    common = ["domain=corrdiff", "data.n_times=40", "data.eval_times=4", "data.benchmark.N=16",
              f"teacher.regression={tiny_teacher['regression']}", f"teacher.residual={tiny_teacher['residual']}",
              "eval.members=3", "teacher_sampler.steps=3"]
    run = tmp_path / "run"
    proc = run_cli("distill", *common, "method=ect", "trainer.iterations=3", "trainer.batch_size=4",
                   f"run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["teacher"]["nfe"] == 5 and report["student"]["nfe"] == 1
    assert {"crps_fair:t2m", "ssr:u10", "crps_gap:v10"} <= set(report["student"])
    assert report["reference"]["crps_fair:t2m"] > 0 and "crps_rel_gap:all" in report["student_vs_teacher"]
    for name in ("rank_histograms.png", "spectra.png", "spread_skill.png", "sample_maps.png", "report.md"):
        assert (run / name).stat().st_size > 0, name
    # the student is a PhysicsNeMo checkpoint that PhysicsNeMo itself loads, and it samples in one step
    nw.import_physicsnemo()
    import physicsnemo
    net = physicsnemo.Module.from_checkpoint(str(run / "student.mdlus"))
    assert type(net).__name__ == "EDMPrecondSuperResolution"

    out = tmp_path / "ens.zarr"
    proc = run_cli("generate", *common, f"student={run / 'student.mdlus'}", "members=5", f"out={out}",
                   f"run_dir={tmp_path / 'gen'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import xarray as xr
    from fastgen_sci.store import open_ensemble
    ds = open_ensemble(out)
    assert ds["t2m"].dims == ("member", "time", "y", "x") and ds["t2m"].shape == (5, 4, 16, 16)
    assert ds["t2m"].attrs["units"] == "K" and ds["u10"].attrs["standard_name"] == "eastward_wind"
    assert 200 < float(ds["t2m"].mean()) < 320  # physical units, not normalised
    assert np.isfinite(ds["lat"].values).all()


def test_bad_teacher_on_the_cli_is_one_line(tiny_teacher, tmp_path):
    proc = run_cli("distill", "domain=corrdiff", "data.n_times=40", "data.eval_times=4", "data.benchmark.N=16",
                   f"teacher.regression={tiny_teacher['regression']}", f"teacher.residual={tiny_teacher['regression']}",
                   f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastgen-sci: error:") and "CorrDiffRegressionUNet" in last


@pytest.mark.slow
def test_shipped_default_teacher_is_close_to_the_bayes_optimum():
    """The default teacher's fair CRPS on held-out times stays within 15% of CRPS* (a worse one cannot land)."""
    from fastgen_sci.ensemble import sample_ensemble
    from fastgen_sci.samplers import SamplerSpec

    p = CorrDiffPack(data={"path": None, "n_times": 10032, "eval_times": 32, "seed": 0,
                           "benchmark": {"N": 32, "b": 4, "terrain": "alps"}},
                     teacher={"regression": None, "residual": None}, batch_size=128)
    cases = p.eval_cases()
    samples = sample_ensemble(p.teacher(), SamplerSpec("heun", steps=18), cases, 8, seed=0, batch_size=128,
                              progress=False)
    scores = p.score(samples, cases)
    for v in ("t2m", "u10", "v10"):
        assert scores[f"crps_gap_rel:{v}"] < 0.15, (v, scores[f"crps_gap_rel:{v}"])
        assert 0.8 < scores[f"ssr:{v}"] < 1.2, (v, scores[f"ssr:{v}"])  # measured 1.10-1.12 with 16 members
