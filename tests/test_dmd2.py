"""DMD2, f-distill, LADD: the VSD gradient against closed forms, a collapse test, the players' discipline,
discriminator heads on odd feature shapes."""
import math

import pytest
import torch
from torch import nn

from fastgen_sci.denoiser import expand_sigma
from fastgen_sci.features import Discriminator, FeatureHead, FeatureTap, logistic
from fastgen_sci.methods.dmd2 import DMD2, dmd2_student_loss, vsd_loss
from fastgen_sci.methods.f_distill import FDistill, f_weight, sigma_bin, update_running_mean
from fastgen_sci.methods.ladd import LADD
from fastgen_sci.rng import StepRNG
from fastgen_sci.train import Progress, Trainer, read_metrics

from conftest import GaussianDenoiser, GaussianGenerator

S = 0.8  # data: N(0, S^2 I)


class ExactFake(nn.Module):
    """The exact denoiser of the generator's law N(mu, a^2): mu + a^2 / (a^2 + sigma^2) (x - mu)."""

    def __init__(self, G: GaussianGenerator):
        super().__init__()
        self.G = [G]  # not a submodule: the fake score has no weights of its own here

    def forward(self, x, sigma, cond=None):
        mu, a2 = self.G[0].mu.detach(), (2 * self.G[0].log_a.detach()).exp()
        return mu + a2 / (a2 + expand_sigma(sigma, x) ** 2) * (x - mu)


def vsd_grad(mu, a, n=20000, seed=0):
    G = GaussianGenerator(mu, a)
    hp = DMD2(gan_weight=0.0, P_mean=0.0, P_std=1.0)
    x = torch.zeros(n, 4, dtype=torch.float64)
    loss = dmd2_student_loss(G, x, None, StepRNG(seed, 0), Progress(0, 0), hp=hp, teacher=GaussianDenoiser(S),
                             fake=ExactFake(G), disc=None, taps=None, sigma_max=80.0)
    loss.mean().backward()
    return G.mu.grad.item(), G.log_a.grad.item()


def test_vsd_gradient_vanishes_for_exact_samples_and_points_back_otherwise():
    g_mu, g_a = vsd_grad(0.0, S)
    assert abs(g_mu) < 1e-12 and abs(g_a) < 1e-12  # fake == real: exactly zero
    assert vsd_grad(0.3, S)[0] > 0 > vsd_grad(-0.3, S)[0]  # descent moves the mean back to 0
    assert vsd_grad(0.0, 1.3 * S)[1] > 0 > vsd_grad(0.0, 0.7 * S)[1]  # ... and the spread back to S
    # the VSD gradient is reverse KL's: d/dmu KL(q || p) = mu / S^2 > 0 has the sign checked above. fake - real
    # = mu t^2 / (S^2 + t^2) is linear in mu, and the weight 1 / mean|x_g - real| shrinks with it: x_g - real is
    # N(m, s^2) per dimension with m / s = t mu / (S sqrt(S^2 + t^2)) <= mu / S, whose mean |.| grows by
    # ~(m / s)^2 / 2. So doubling the shift from 0.2 to 0.4 scales the gradient by between 2 (small t) and
    # 2 x 1.031 / 1.125 = 1.83 (large t); measured 1.88-1.89 on three seeds. Without the weight: exactly 2.
    assert 1.8 < vsd_grad(0.4, S)[0] / vsd_grad(0.2, S)[0] < 1.97


def test_vsd_descent_converges_to_the_data_law():
    G = GaussianGenerator(0.5, 1.5 * S)
    opt = torch.optim.Adam(G.parameters(), lr=0.02)
    hp = DMD2(gan_weight=0.0, P_mean=0.0, P_std=1.0)
    x = torch.zeros(512, 4, dtype=torch.float64)
    for k in range(300):
        opt.zero_grad()
        dmd2_student_loss(G, x, None, StepRNG(k, 0), Progress(k, 0), hp=hp, teacher=GaussianDenoiser(S),
                          fake=ExactFake(G), disc=None, taps=None, sigma_max=80.0).mean().backward()
        opt.step()
    assert abs(G.mu.item()) < 0.03 and abs(G.log_a.exp().item() - S) < 0.03, (G.mu.item(), G.log_a.exp().item())


def test_vsd_weight_scales_each_samples_gradient():
    x_g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.ones(3, dtype=torch.float64)
    x_t = x_g.detach() + torch.randn(3, 5, dtype=torch.float64)
    teacher, fake = GaussianDenoiser(S), GaussianDenoiser(1.2 * S)
    vsd_loss(x_g, x_t, t, None, teacher=teacher, fake=fake).sum().backward()
    plain = x_g.grad.clone()
    x_g.grad = None
    vsd_loss(x_g, x_t, t, None, teacher=teacher, fake=fake, weight=torch.tensor([2.0, 0.0, 1.0])).sum().backward()
    torch.testing.assert_close(x_g.grad, plain * torch.tensor([[2.0], [0.0], [1.0]], dtype=torch.float64))
    w = 1 / ((x_g.detach() - teacher(x_t, t)).abs().mean(dim=1) + 1e-6)  # closed form of the plain gradient
    torch.testing.assert_close(plain, w[:, None] * (fake(x_t, t) - teacher(x_t, t)) / 5)


def test_multi_step_students_start_from_noise_or_from_noised_data():
    """Level 0 (sigma_max): pure noise, as one-step sampling; lower levels: real data noised to the level."""
    from fastgen_sci.methods.dmd2 import generate
    seen = {}

    def G(x_in, s, cond):
        seen["x"], seen["s"] = x_in, s
        return x_in

    x = torch.full((4000, 2), 5.0, dtype=torch.float64)
    generate(x, None, StepRNG(0, 0), G=G, hp=DMD2(sigmas=(2.0, 0.5)), sigma_max=80.0)
    s, x_in = seen["s"], seen["x"]
    assert set(s.tolist()) == {80.0, 2.0, 0.5} and all(abs((s == v).double().mean() - 1 / 3) < 0.03 for v in (80.0, 2.0, 0.5))
    for v, offset in ((80.0, 0.0), (2.0, 5.0), (0.5, 5.0)):
        rows = x_in[s == v]
        assert abs(rows.mean() - offset) < 4 * v / math.sqrt(rows.numel()) and abs(rows.std() / v - 1) < 0.05
    generate(x, None, StepRNG(0, 0), G=G, hp=DMD2(), sigma_max=80.0)
    assert (seen["s"] == 80.0).all() and abs(seen["x"].mean()) < 4 * 80 / math.sqrt(8000)


def test_balanced_vsd_normalises_each_channel():
    """balance_channels: w per (sample, channel) = 1 / mean over the channel's positions of |x_g - real|."""
    g = torch.Generator().manual_seed(0)
    x_g = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0]).reshape(1, 3, 1, 1).double())
    x_g.requires_grad_(True)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    x_t = x_g.detach() + 0.5 * torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    teacher, fake = GaussianDenoiser(S), GaussianDenoiser(1.2 * S)
    vsd_loss(x_g, x_t, t, None, teacher=teacher, fake=fake, balance_channels=True).sum().backward()
    w = 1 / ((x_g.detach() - teacher(x_t, t)).abs().flatten(2).mean(dim=2) + 1e-6)  # [B, C]
    torch.testing.assert_close(x_g.grad, w[..., None, None] * (fake(x_t, t) - teacher(x_t, t)) / 60)


# ------------------------------------------------------------------ collapse test on a two-mode mixture
def two_mode_setup(dim=1):
    from fastgen_sci.domains.toy.data import GaussianMixture
    from fastgen_sci.domains.toy.networks import build_network, exact_teacher
    mix = GaussianMixture(means=torch.tensor([[-2.0] * dim, [2.0] * dim]), stds=torch.tensor([0.3, 0.3]),
                          weights=torch.tensor([0.5, 0.5]), labels=torch.tensor([0, 0]))
    teacher = exact_teacher(mix, sigma_max=80.0)
    student = build_network(dim=dim, sigma_data=mix.sigma_data, hidden=64, depth=2, sigma_max=80.0, seed=0)
    data = [{"x": x} for x in torch.randn(4096, dim) * 0.3 + 2.0 * torch.where(torch.rand(4096, 1) < 0.5, -1.0, 1.0)]
    return teacher, student, data


def test_dmd2_keeps_both_modes(tmp_path):
    """Mode weights 0.5 / 0.5; measured: 0.455 right after 2000 iterations (means -2.02 / 1.90, std 0.59)."""
    teacher, student, data = two_mode_setup()
    hp = DMD2(gan_weight=0.0, student_every=4, P_mean=0.0, P_std=1.2, lr=1e-3, fake_lr=2e-3, weight_decay=0.0)
    players = hp.players(student=student, teacher=teacher)
    Trainer(iterations=2000, batch_size=128, progress_bar=False, tensorboard=False, log_every=500).fit(players, data, tmp_path)
    with torch.no_grad():
        z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
        x = student.eval()(80.0 * z, torch.full((4000,), 80.0))
    right = (x > 0).double().mean().item()
    assert 0.35 < right < 0.65, right  # a collapsed student puts (almost) everything in one mode
    for mode in (x[x > 0], x[x < 0]):  # and each half sits on its mode
        assert abs(mode.abs().mean() - 2) < 0.4 and mode.std() < 1.0, (mode.mean(), mode.std())


# ------------------------------------------------------------------ players: teacher frozen, alternation, resume
def toy_teacher(dim=3):
    from fastgen_sci.domains.toy.networks import build_network
    return build_network(dim=dim, sigma_data=1.0, hidden=32, depth=2, sigma_max=80.0, seed=3)


def run_players(method_cls, run_dir, iterations, **kw):
    from fastgen_sci.domains.toy.networks import build_network
    teacher = toy_teacher().eval().requires_grad_(False)
    student = build_network(dim=3, sigma_data=1.0, hidden=32, depth=2, sigma_max=80.0, seed=3)
    hp = method_cls(features=("net.blocks.1",), **kw)
    players = hp.players(student=student, teacher=teacher)
    data = [{"x": x} for x in torch.randn(256, 3, generator=torch.Generator().manual_seed(0))]
    Trainer(iterations=iterations, batch_size=16, checkpoint_every=1, keep_checkpoints=1, log_every=1,
            progress_bar=False, tensorboard=False).fit(players, data, run_dir)
    return teacher, players


@pytest.mark.parametrize("method_cls, kw", [(DMD2, {"gan_weight": 0.1}), (FDistill, {"gan_weight": 0.1}), (LADD, {})])
def test_teacher_gets_no_gradient_or_optimizer_state_and_alternation_survives_resume(tmp_path, method_cls, kw):
    teacher, players = run_players(method_cls, tmp_path / "full", 12, **kw)
    every = players[0].every
    assert every == (5 if method_cls is not LADD else 2)
    assert all(p.grad is None for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    for p in players:
        assert not teacher_ids & {id(q) for q in p.module.parameters()}, p.name
    state = torch.load(next((tmp_path / "full" / "checkpoints").iterdir()) / "state.pt", weights_only=True)
    for p in players:  # optimizer state only for the player's own parameters
        assert len(state["optimizers"][p.name]["state"]) == len(list(p.module.parameters())), p.name
    rows = read_metrics(tmp_path / "full")
    student_its = [r["iteration"] for r in rows if r.get("loss/student") not in (None, "")]
    assert student_its == [i for i in range(12) if i % every == every - 1]
    assert all(r.get("loss/discriminator") not in (None, "") for r in rows)
    # interrupted at 7 and resumed: the same losses as the uninterrupted run
    run_players(method_cls, tmp_path / "split", 7, **kw)
    run_players(method_cls, tmp_path / "split", 12, **kw)
    split = read_metrics(tmp_path / "split")
    for key in [k for k in rows[0] if k.startswith("loss/")]:
        assert [r[key] for r in split] == [r[key] for r in rows], key


def test_gan_gradient_reaches_the_student_through_the_frozen_teacher():
    from fastgen_sci.domains.toy.networks import build_network
    teacher = toy_teacher().eval().requires_grad_(False)
    student = build_network(dim=3, sigma_data=1.0, hidden=32, depth=2, sigma_max=80.0, seed=4)
    players = LADD(features=("net.blocks.0", "net.blocks.1")).players(student=student, teacher=teacher)
    x = torch.randn(8, 3)
    players[1].prepare(x, None)
    players[0].loss(student, x, None, StepRNG(0, 0), Progress(0, 0)).mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0


# ------------------------------------------------------------------ feature heads and taps
@pytest.mark.parametrize("shape", [(3, 16, 36, 58), (3, 8, 100), (3, 32), (2, 4, 5, 6, 7)])
def test_discriminator_heads_run_forward_and_backward_on_odd_shapes(shape):
    f = torch.randn(*shape, requires_grad=True)
    D = Discriminator(hidden=16).build([f])
    logit = D([f])
    assert logit.shape == (shape[0],)
    logit.sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())
    with pytest.raises(ValueError, match="built for"):
        D([torch.randn(shape[0], shape[1] + 1, *shape[2:])])


def test_discriminator_init_is_a_function_of_its_seed_alone():
    feats = [torch.randn(2, 8, 36, 58), torch.randn(2, 16, 100)]
    torch.manual_seed(1)
    a = Discriminator(hidden=8).build(feats).state_dict()
    torch.rand(7)  # another global RNG state: `compare` draws more before building than `distill`
    b = Discriminator(hidden=8).build(feats).state_dict()
    c = Discriminator(hidden=8, seed=1).build(feats).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_patch_logistic_loss_judges_each_position():
    """patch=False: softplus of the summed position-mean logits; patch=True: softplus per position, averaged per
    head and summed over heads. Their gap is Jensen's: zero for constant logits, positive otherwise."""
    torch.manual_seed(0)
    feats = [torch.randn(4, 8, 36, 58), torch.randn(4, 16, 100)]
    D = Discriminator(hidden=8).build(feats)
    per_position = [h.logits(f) for h, f in zip(D.heads, feats)]
    assert [l.shape for l in per_position] == [(4, 36 * 58), (4, 100)]
    mean_logit = sum(l.mean(dim=1) for l in per_position)
    torch.testing.assert_close(logistic(D, feats, real=True), torch.nn.functional.softplus(-mean_logit))
    torch.testing.assert_close(logistic(D, feats, real=False), torch.nn.functional.softplus(mean_logit))
    patch = sum(torch.nn.functional.softplus(l).mean(dim=1) for l in per_position)
    torch.testing.assert_close(logistic(D, feats, real=False, patch=True), patch)
    one = Discriminator(hidden=8).build(feats[:1])
    assert (logistic(one, feats[:1], real=True, patch=True) > logistic(one, feats[:1], real=True)).all()


def test_approximate_r1_adds_a_nonnegative_penalty_linear_in_its_weight():
    """discriminator_loss with r1_weight adds r1_weight (D(feat(x_t + r1_sigma n)) - D(feat(x_t)))^2 to the same
    logistic terms (its perturbation is drawn after them): >= 0, > 0 for a non-constant D, and linear in the weight."""
    from functools import partial
    from fastgen_sci.methods.dmd2 import discriminator_loss, generate
    torch.manual_seed(0)
    x = torch.randn(64, 1) * S
    D = Discriminator(hidden=4).build([x])

    def loss(hp):
        gen = partial(generate, G=GaussianGenerator(0.0, S).float(), hp=hp, sigma_max=80.0)
        return discriminator_loss(D, x, None, StepRNG(1, 0), Progress(0, 0), generate=gen, hp=hp,
                                  taps=FeatureTap(GaussianDenoiser(S)), sigma_max=80.0).detach()
    base, r1, r1x2 = loss(DMD2()), loss(DMD2(r1_weight=10.0, r1_sigma=0.1)), loss(DMD2(r1_weight=20.0, r1_sigma=0.1))
    assert (r1 >= base).all() and (r1 - base).mean() > 0
    torch.testing.assert_close(r1x2 - base, 2 * (r1 - base))
    with pytest.raises(ValueError, match="r1_weight"):
        DMD2(r1_weight=-1.0)


def test_feature_tap_collects_named_outputs_and_leaves_no_hooks():
    teacher = toy_teacher()
    tap = FeatureTap(teacher, ["net.blocks.0", "net.inp"])
    x, t = torch.randn(5, 3), torch.ones(5)
    feats = tap(x, t)
    assert [f.shape for f in feats] == [(5, 32), (5, 32)]
    assert all(not m._forward_hooks for m in teacher.modules())
    torch.testing.assert_close(FeatureTap(teacher)(x, t)[0], teacher(x, t))  # no names: the output
    with pytest.raises(ValueError, match="net.blocks.9"):
        FeatureTap(teacher, ["net.blocks.9"])
    with pytest.raises(ValueError, match="spatial"):
        FeatureHead(4, 4)


# ------------------------------------------------------------------ f-distill weighting
def test_f_divergence_weights_closed_forms():
    r = torch.tensor([0.05, 0.5, 1.0, 4.0, 50.0], dtype=torch.float64)
    clipped = r.clamp(0.1, 20.0)
    js = clipped / (1 + clipped)
    torch.testing.assert_close(f_weight(r, "js"), js / js.mean())
    torch.testing.assert_close(f_weight(r, "kl"), clipped / clipped.mean())
    torch.testing.assert_close(f_weight(r, "reverse_kl"), torch.ones_like(r))
    torch.testing.assert_close(f_weight(r, "jeffreys"), (clipped + 1) / (clipped + 1).mean())
    with pytest.raises(ValueError, match="divergence"):
        FDistill(divergence="wasserstein")
    with pytest.raises(ValueError, match="gan_weight"):
        FDistill(gan_weight=0.0)


def test_ratio_normalisation_bins_and_running_mean():
    t = torch.tensor([math.exp(-1.2 - 3.6 - 1), math.exp(-1.2), math.exp(-1.2 + 3.6 + 1)], dtype=torch.float64)
    assert sigma_bin(t, P_mean=-1.2, P_std=1.2, bins=10).tolist() == [0, 5, 9]
    mean = torch.ones(3, dtype=torch.float64)
    update_running_mean(mean, torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64), torch.tensor([0, 0, 2]), 0.9)
    torch.testing.assert_close(mean, torch.tensor([0.9 + 0.1 * 4.0, 1.0, 0.9 + 0.1 * 2.0], dtype=torch.float64))


def _ddp_players_worker(rank, world, port, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _, players = run_players(DMD2, out, 6, gan_weight=0.1, patch=True)
    if rank == 0:
        torch.save({f"{p.name}/{k}": v.clone() for p in players for k, v in p.module.state_dict().items()},
                   os.path.join(out, "params.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_ddp_runs_every_player_as_one_process(tmp_path, free_port):
    """DMD2's three players under DDP (gloo, 2 processes; per-position GAN logits) give the single process's weights
    and losses."""
    import torch.multiprocessing as mp
    # the student updates at iteration 4
    _, players = run_players(DMD2, tmp_path / "single", 6, gan_weight=0.1, patch=True)
    single = {f"{p.name}/{k}": v for p in players for k, v in p.module.state_dict().items()}
    mp.start_processes(_ddp_players_worker, args=(2, free_port, str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp" / "params.pt", weights_only=True)
    assert set(ddp) == set(single) and any(k.startswith("discriminator/") for k in single)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = {d: read_metrics(tmp_path / d) for d in ("single", "ddp")}
    for key in [k for k in rows["single"][0] if k.startswith("loss/")]:
        a = [float(r[key]) for r in rows["single"] if r.get(key) not in (None, "")]
        b = [float(r[key]) for r in rows["ddp"] if r.get(key) not in (None, "")]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-4), key
