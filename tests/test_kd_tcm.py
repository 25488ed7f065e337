"""KD and TCM against Gaussian closed forms, KD's pair cache, TCM's frozen copy across a resume, and both
end to end on the toy pack.

For data N(0, S^2 I) the probability-flow ODE from x_T at sigma T reaches x_s = x_T sqrt(S^2 + s^2) /
sqrt(S^2 + T^2) at sigma s, so f_c(x, sigma) = c x / sqrt(S^2 + sigma^2) is the exact consistency function
at c = S (and the endpoint of the teacher's ODE from sigma_max eps, at every sigma).
"""
import json
import math
import shutil

import pytest
import torch
from conftest import GaussianDenoiser
from scipy import stats
from torch import nn

from fastgen_sci import checkpoint
from fastgen_sci.methods.kd import KD, PairBank, kd_loss
from fastgen_sci.methods.tcm import TCM, TCMStudent, stage2_t, tcm_loss
from fastgen_sci.rng import StepRNG, derive_seed
from fastgen_sci.samplers import SamplerSpec
from fastgen_sci.train import Progress, Trainer, read_metrics

S, T = 0.7, 80.0


class ConsistencyFamily(nn.Module):
    """f_c(x, sigma) = c x / sqrt(S^2 + sigma^2), one parameter ln c; exact at c = S."""

    def __init__(self, c: float):
        super().__init__()
        self.log_c = nn.Parameter(torch.tensor(math.log(c), dtype=torch.float64))
        self.sigma_data, self.sigma_min, self.sigma_max = S, 0.002, T

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.log_c.exp() * x / (S**2 + sigma**2).sqrt()


class CountingTeacher(GaussianDenoiser):
    """The exact Gaussian denoiser with its variance as a buffer (its 'weights'), counting its calls."""

    def __init__(self, s: float = S):
        super().__init__(s)
        self.register_buffer("s2", torch.tensor(s**2))
        self.calls = 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        return super().forward(x, sigma, cond)


def on_ode(x_T, s):
    """The exact ODE point at sigma s of the trajectory through x_T at sigma_max."""
    return x_T * math.sqrt(S**2 + s**2) / math.sqrt(S**2 + T**2)


# --- KD -----------------------------------------------------------------------------------------------

def test_kd_pairs_are_the_teacher_sampler_from_seeded_noise_and_near_the_closed_form():
    x = torch.zeros(256, 3, dtype=torch.float64)
    bank = PairBank(GaussianDenoiser(S), hp=KD(pairs=256, seed=5))
    bank.draw(x, None, StepRNG(0, 0), 0)
    paths = bank.bank["paths"]  # [n, 2, 3]: sigma_max eps, endpoint
    eps = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(derive_seed(5, k))) for k in range(256)])
    torch.testing.assert_close(paths[:, 0], T * eps.double())
    torch.testing.assert_close(paths[:, 1], SamplerSpec("heun", steps=18)(GaussianDenoiser(S), eps.double()))
    # 18 Heun steps miss this Gaussian's endpoint by 5.0% (measured), 144 by 0.06%: second order
    for steps, tol in ((18, 0.055), (144, 8e-4)):
        for sigmas in ((), (1.0,), (2.0, 0.5)):
            bank = PairBank(GaussianDenoiser(S), hp=KD(pairs=64, steps=steps, sigmas=sigmas))
            bank.draw(x[:64], None, StepRNG(0, 0), 0)
            paths = bank.bank["paths"]
            for i, s in enumerate([*sigmas, 0.0]):
                exact = on_ode(paths[:, 0], s)
                err = ((paths[:, i + 1] - exact).abs().max() / exact.abs().max()).item()
                assert err < tol, (steps, sigmas, s, err)


def kd_grad(c, hp, teacher, repeats=4):
    model, bank = ConsistencyFamily(c), PairBank(teacher, hp=hp)
    grads = []
    for k in range(repeats):
        model.zero_grad()
        kd_loss(model, torch.zeros(256, 4, dtype=torch.float64), None, StepRNG(k, 0), Progress(0, 0),
                bank=bank).mean().backward()
        grads.append(model.log_c.grad.item())
    return sum(grads) / repeats


@pytest.mark.parametrize("sigmas", [(), (1.0,)])
def test_kd_gradient_vanishes_at_the_exact_consistency_function_only(sigmas):
    hp, teacher = KD(pairs=256, steps=256, sigmas=sigmas), GaussianDenoiser(S)  # Heun error ~3e-5
    g_exact, g_small, g_large = (kd_grad(c, hp, teacher) for c in (S, 0.9 * S, 1.1 * S))
    assert g_small < -1e-3 and g_large > 1e-3  # descent moves c back towards S
    assert abs(g_exact) < 0.01 * min(-g_small, g_large), (g_exact, g_small, g_large)


def test_kd_training_finds_the_exact_consistency_function():
    model, hp = ConsistencyFamily(0.5 * S), KD(pairs=512, steps=256, sigmas=(1.0,))
    bank = PairBank(GaussianDenoiser(S), hp=hp)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for it in range(300):
        opt.zero_grad()
        kd_loss(model, torch.zeros(128, 4, dtype=torch.float64), None, StepRNG(0, it), Progress(it, 0),
                bank=bank).mean().backward()
        opt.step()
    assert abs(model.log_c.exp().item() / S - 1) < 0.01, model.log_c.exp().item()


def test_kd_bank_is_cached_and_reloaded_without_the_teacher(tmp_path):
    hp = KD(pairs=80, cache_dir=str(tmp_path))
    x = torch.zeros(32, 2, dtype=torch.float64)
    batch = lambda it: {"c": torch.arange(32, dtype=torch.float64)[:, None] + 100 * it}  # noqa: E731
    first = CountingTeacher()
    bank = PairBank(first, hp=hp)
    for it in range(4):  # 80 pairs fill batches 0, 1 and half of 2; later batches add nothing
        bank.draw(x, batch(it), StepRNG(0, it), it)
    assert first.calls == 3 * 35 and len(bank.bank["paths"]) == 80
    rows = torch.cat([batch(0)["c"], batch(1)["c"], batch(2)["c"][:16]])  # the first 80 rows of the run
    assert torch.equal(bank.bank["cond.c"], rows)
    paths, cond = bank.draw(x, batch(4), StepRNG(0, 4), 4)
    assert paths.shape == (32, 2, 2) and set(cond["c"][:, 0].tolist()) <= set(bank.bank["cond.c"][:, 0].tolist())

    again = CountingTeacher()  # a rerun loads each batch's part as it arrives; a resume loads all at once
    rerun = PairBank(again, hp=hp)
    for it in range(3):
        rerun.draw(x, batch(it), StepRNG(0, it), it)
    resumed = PairBank(again, hp=hp)
    resumed.draw(x, batch(7), StepRNG(0, 7), 7)
    assert again.calls == 0
    for b in (rerun, resumed):
        for k, v in bank.bank.items():
            assert torch.equal(b.bank[k], v), k

    stale = CountingTeacher()  # other conditions in batch 0: recomputed, not taken from the cache
    PairBank(stale, hp=hp).draw(x, {"c": batch(0)["c"] + 0.5}, StepRNG(0, 0), 0)
    assert stale.calls == 35
    other = CountingTeacher(0.8)  # another teacher: another key
    PairBank(other, hp=hp).draw(x, batch(0), StepRNG(0, 0), 0)
    assert other.calls == 35
    with pytest.raises(ValueError, match="resuming needs the teacher pairs of batch 0"):
        PairBank(CountingTeacher(), hp=KD(pairs=80)).draw(x, batch(5), StepRNG(0, 5), 5)
    unconditional = CountingTeacher()  # noise alone fixes these pairs: recomputed exactly without a cache
    PairBank(unconditional, hp=KD(pairs=80)).draw(x, None, StepRNG(0, 5), 5)
    assert unconditional.calls == 3 * 35


def kd_toy_run(run_dir, iterations, classes, cache_dir):
    from fastgen_sci.domains.toy import ToyPack
    pack = ToyPack(hidden=32, depth=2, n_train=512, classes=classes)
    teacher = pack.teacher()
    players = KD(pairs=320, cache_dir=cache_dir).players(student=pack.student(teacher), teacher=teacher)
    Trainer(iterations=iterations, batch_size=32, checkpoint_every=5, progress_bar=False,
            tensorboard=False).fit(players, pack.dataset(), run_dir)


@pytest.mark.parametrize("classes, cached", [(0, False), (4, True)])
def test_kd_resume_repeats_the_uninterrupted_run(tmp_path, classes, cached):
    """The bank fills over batches 0-9; a resume from 5 recomputes (unconditional) or loads (cached) 0-4."""
    cache = str(tmp_path / "cache") if cached else None
    kd_toy_run(tmp_path / "straight", 20, classes, cache)
    kd_toy_run(tmp_path / "resumed", 8, classes, cache)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "iter-00000008")
    kd_toy_run(tmp_path / "resumed", 20, classes, cache)
    losses = lambda run: [r["loss/student"] for r in read_metrics(run)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 20


# --- TCM ----------------------------------------------------------------------------------------------

def test_tcm_stage2_draws_t_from_transition_up_and_a_quarter_exactly_on_it():
    hp = TCM()
    t, boundary = stage2_t(4000, hp=hp, rng=StepRNG(3, 0))
    assert boundary.sum() == 1000 and (t[boundary] == 1.0).all()
    assert (t[~boundary] > 1.0).all() and (t <= 80.0).all()
    a, b = stats.t.cdf([0.0, math.log(80.0) / 0.2], 0.01)  # ln t ~ Student-t(0.01, 0, 0.2) on [0, ln 80]
    for q in (1.05, 1.22, 2.5, 10.0):
        want = (stats.t.cdf(math.log(q) / 0.2, 0.01) - a) / (b - a)
        assert abs((t[~boundary] <= q).double().mean().item() - want) < 0.03, q
    halves = [stage2_t(2000, hp=hp, rng=StepRNG(3, 0, rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), t)  # two processes: slices of the same batch
    assert torch.equal(torch.cat([h[1] for h in halves]), boundary)


class Spy(ConsistencyFamily):
    """Records the noise levels of the calls that carry gradient (the student's f(y_t, t))."""

    def forward(self, x, sigma, cond=None):
        if torch.is_grad_enabled():
            self.seen = sigma.detach().clone()
        return super().forward(x, sigma, cond)


def stage2(model, hp, k=0, n=4096, teacher=GaussianDenoiser(S)):
    x = StepRNG(k, 1).randn(n, 4, dtype=torch.float64) * S
    return tcm_loss(model, x, None, StepRNG(k, 0), Progress(hp.stage1_iterations, 10**9), hp=hp, teacher=teacher)  # images_seen 1e9: ratio at its limit, t - r small


def test_tcm_stage2_trains_the_student_only_from_transition_t_up():
    model = TCMStudent(Spy(S))
    stage2(model, TCM(c=1.0, stage1_iterations=7), n=400)
    assert bool(model.frozen_ready)  # the first stage-2 call froze the copy
    assert (model.student.seen >= 1.0).all() and (model.student.seen == 1.0).sum() == 100


def frozen_at(c, c_frozen):
    model = TCMStudent(ConsistencyFamily(c))
    model.frozen.log_c.data.fill_(math.log(c_frozen))
    model.frozen_ready.fill_(True)
    return model


def tcm_grad(c, c_frozen, hp, repeats=3, teacher=GaussianDenoiser(S)):
    model, grads = frozen_at(c, c_frozen), []
    for k in range(repeats):
        model.zero_grad()
        stage2(model, hp, k, teacher=teacher).mean().backward()
        grads.append(model.student.log_c.grad.item())
    return sum(grads) / repeats


def test_tcm_stage2_gradient_vanishes_at_the_exact_function_and_follows_the_frozen_one():
    """Along a trajectory any c is self-consistent; the frozen model below t' pins c to its own value."""
    hp = TCM(c=1.0, stage1_iterations=0)  # c = 1: pseudo-Huber ~ squared distance, the gradient shrinks to 0
    g = {(a, b): tcm_grad(a * S, b * S, hp) for a, b in ((1, 1), (0.9, 1), (1.1, 1), (1, 0.9), (1, 1.1))}
    scale = min(abs(v) for key, v in g.items() if key != (1, 1))
    assert scale > 1e-4 and abs(g[1, 1]) < 0.01 * scale, g
    assert g[0.9, 1] < 0 < g[1.1, 1]  # descent moves the student to the exact c
    assert g[1, 1.1] < 0 < g[1, 0.9]  # ... and, when the frozen model is off, towards the frozen model
    wrong_ode = tcm_grad(S, S, hp, teacher=GaussianDenoiser(0.8 * S))  # cd: y_r is the teacher's Euler step
    assert abs(wrong_ode) > 100 * abs(g[1, 1]), (wrong_ode, g[1, 1])
    with pytest.raises(ValueError, match="teacher"):
        TCM().players(student=ConsistencyFamily(S), teacher=None)
    assert TCM(variant="ct").players(student=ConsistencyFamily(S), teacher=None)[0].module.frozen is not None


def test_tcm_loss_is_consistency_mean_plus_weighted_boundary_mean():
    """Rebuild the unweighted per-sample loss by hand: the frozen model's target below t', the student's above."""
    from fastgen_sci.methods.ect import ect_r, euler_step
    hp, n, teacher = TCM(c=1.0, w_boundary=0.1), 64, GaussianDenoiser(S)
    model = frozen_at(1.05 * S, 0.9 * S)
    with torch.no_grad():
        loss = stage2(model, hp, n=n)
        x, rng = StepRNG(0, 1).randn(n, 4, dtype=torch.float64) * S, StepRNG(0, 0)
        t, boundary = stage2_t(n, hp=hp, rng=rng)
        t = t.double()
        r = ect_r(t, 0.999)
        y_t = x + t[:, None] * rng.randn_like(x)
        y_r = euler_step(teacher, y_t, t, r, None)
        target = torch.where((r < 1.0)[:, None], model.frozen(y_r, r), model.student(y_r, r))
        d = (model.student(y_t, t) - target).norm(dim=1)
        plain = ((d**2 + 1).sqrt() - 1) / (t - r)
    assert boundary.sum() == 16 and plain[boundary].min() > 0
    torch.testing.assert_close(loss.mean(), plain[~boundary].mean() + 0.1 * plain[boundary].mean())
    torch.testing.assert_close(loss[boundary], plain[boundary] * 0.1 * 4)


def tcm_toy_run(run_dir, iterations):
    from fastgen_sci.domains.toy import ToyPack
    pack = ToyPack(hidden=32, depth=2, n_train=512, dropout=0.1)
    teacher = pack.teacher()
    hp = TCM(stage1_iterations=6, images_per_stage=96, P_mean=0.5, c=1.0)
    players = hp.players(student=pack.student(teacher), teacher=teacher)
    Trainer(iterations=iterations, batch_size=32, checkpoint_every=10, progress_bar=False,
            tensorboard=False).fit(players, pack.dataset(), run_dir)
    return players[0].module


def test_tcm_frozen_copy_survives_checkpoint_and_resume(tmp_path):
    straight = tcm_toy_run(tmp_path / "straight", 30)
    tcm_toy_run(tmp_path / "resumed", 17)  # stage 2 from iteration 6; checkpoints at 10 and 17
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "iter-00000017")
    resumed = tcm_toy_run(tmp_path / "resumed", 30)  # from 10: the frozen copy must come from the checkpoint
    losses = lambda run: [r["loss/student"] for r in read_metrics(run)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 30
    for name, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], v), name
    moved = [n for n, v in straight.frozen.state_dict().items() if not torch.equal(straight.student.state_dict()[n], v)]
    assert moved and bool(straight.frozen_ready)
    assert TCM().sampleable(straight) is straight.student
    assert checkpoint.complete(tmp_path / "resumed" / "checkpoints")[-1].name == "iter-00000030"


# --- end to end -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method, overrides, factor", [
    ("kd", ["method.pairs=8192"], 10),  # measured: 0.71 -> 0.027
    # short runs favour ECT's paper settings in stage 1 (0.10 here; the toy tuning: 0.32 at 400 iterations)
    ("tcm", ["method.stage1_iterations=200", "method.images_per_stage=12800", "method.c=1e-8",
             "method.P_mean=-1.1"], 5),
])
def test_distill_toy_end_to_end(tmp_path, method, overrides, factor):
    from test_cli import run_cli

    from fastgen_sci.domains.toy import ToyPack
    from fastgen_sci.ensemble import sample_ensemble

    pack = ToyPack(hidden=64)
    cases = pack.eval_cases()
    untrained = pack.score(sample_ensemble(pack.student(pack.teacher()).eval(), SamplerSpec("few_step"), cases, 1000,
                                           progress=False), cases)["energy_distance"]
    run = tmp_path / "run"
    proc = run_cli("distill", "domain=toy", f"method={method}", "trainer.iterations=400", "eval.members=1000",
                   "domain.hidden=64", f"run_dir={run}", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["student"]["nfe"] == 1
    assert report["student"]["energy_distance"] < untrained / factor, (report["student"]["energy_distance"], untrained)
