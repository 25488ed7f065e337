"""CorrDiff teacher boundary: real PhysicsNeMo networks behind the Denoiser protocol, and .mdlus IO."""
import copy
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest
import torch

from fastgen_sci.denoiser import Denoiser, edm_scalings
from fastgen_sci.domains.corrdiff import networks as N

needs_physicsnemo = pytest.mark.skipif(importlib.util.find_spec("physicsnemo") is None,
                                       reason="needs fastgen-sci[corrdiff]")

H, C_LR, C_OUT = 16, 4, 2
TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1)


def _scramble(net, seed):
    """Move weights off their init (the output conv starts at ~1e-5) so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def residual():
    return _scramble(N.build_residual(C_LR, C_OUT, H, **TINY), 1)


@pytest.fixture(scope="module")
def regression():
    return _scramble(N.build_regression(C_LR, C_OUT, H, **TINY), 2)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, C_OUT, H, H, generator=g)
    img_lr = torch.randn(3, C_LR, H, H, generator=g)
    return x, img_lr


def test_importing_networks_does_not_import_physicsnemo():
    code = ("import sys, fastgen_sci.domains.corrdiff.networks; "
            "print(sorted(m for m in ('physicsnemo', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_physicsnemo_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "physicsnemo", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'fastgen-sci\[corrdiff\]'"):
        N.import_physicsnemo()


@needs_physicsnemo
def test_import_physicsnemo_is_idempotent():
    pn = N.import_physicsnemo()
    assert N.import_physicsnemo() is pn and "physicsnemo.models.diffusion_unets" in sys.modules


@needs_physicsnemo
def test_residual_adapter_is_edm_preconditioning(residual, batch):
    x, img_lr = batch
    D = N.CorrDiffResidual(residual)
    assert isinstance(D, Denoiser) and (D.sigma_data, D.sigma_min, D.sigma_max) == (0.5, 0.002, 800.0)
    for s in (0.002, 0.3, 2.0, 80.0, 800.0):
        sigma = torch.full((3,), s)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.reshape(-1, 1, 1, 1), 0.5)  # EDM Table 1
        F = residual.model(torch.cat([c_in * x, img_lr], dim=1), c_noise.flatten(), class_labels=None)
        by_hand = c_skip * x + c_out * F  # only x scaled by c_in; the condition goes in unscaled
        out = D(x, sigma, {"img_lr": img_lr})
        torch.testing.assert_close(out, by_hand, atol=1e-6, rtol=0)
        torch.testing.assert_close(out, residual(x, img_lr, sigma), atol=0, rtol=0)
        assert F.abs().max() > 0.1  # the network part is not negligible


@needs_physicsnemo
def test_residual_adapter_mean_hr_conditioning(batch):
    x, img_lr = batch
    net = _scramble(N.build_residual(C_LR + C_OUT, C_OUT, H, **TINY), 3)  # hr_mean_conditioning
    net.sigma_max = 80.0  # the adapter's range is CorrDiff's sampler range clipped to the net's own
    mu = torch.randn(1, C_OUT, H, H)
    D, sigma = N.CorrDiffResidual(net), torch.tensor([0.5, 1.0, 5.0])
    assert (D.sigma_min, D.sigma_max) == (0.002, 80.0)
    expected = net(x, torch.cat([mu.expand(3, -1, -1, -1), img_lr], dim=1), sigma)  # stochastic_sampler order
    torch.testing.assert_close(D(x, sigma, {"img_lr": img_lr, "mean_hr": mu}), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="6-channel condition but got 4 \\(img_lr\\)"):
        D(x, sigma, {"img_lr": img_lr})
    with pytest.raises(ValueError, match="needs cond"):
        D(x, sigma)


@needs_physicsnemo
def test_residual_adapter_passes_gradients(residual, batch):
    x, img_lr = batch
    x = x.clone().requires_grad_(True)
    residual.zero_grad()
    out = N.CorrDiffResidual(residual)(x, torch.tensor(1.0), {"img_lr": img_lr})  # scalar sigma broadcasts
    assert out.requires_grad and out.shape == x.shape
    out.square().mean().backward()
    missing = [n for n, p in residual.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and x.grad.abs().sum() > 0


@needs_physicsnemo
def test_regression_adapter_matches_corrdiff_regression_step(regression, batch):
    _, img_lr = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # physicsnemo flags regression_step as legacy on import
        from physicsnemo.diffusion.generate import regression_step
    mu = N.CorrDiffRegression(regression)(img_lr)
    assert mu.shape == (3, C_OUT, H, H) and mu.requires_grad
    for i in range(3):  # regression_step takes one sample at a time (batch 1 vs 3 differs by ~1e-6)
        ref = regression_step(regression, img_lr[i:i + 1], torch.Size([1, C_OUT, H, H]))
        torch.testing.assert_close(N.CorrDiffRegression(regression)(img_lr[i:i + 1]).detach(), ref, atol=1e-6, rtol=0)
    zeros = torch.zeros(3, C_OUT, H, H)  # the convention spelled out: zero latent, noise label 0
    direct = regression.model(torch.cat([zeros, img_lr], dim=1), torch.zeros(3), class_labels=None)
    torch.testing.assert_close(mu, direct, atol=1e-6, rtol=0)


@needs_physicsnemo
def test_adapters_refuse_the_wrong_network(regression, residual):
    with pytest.raises(TypeError, match="CorrDiffResidual wraps a PhysicsNeMo EDMPrecondSuperResolution"):
        N.CorrDiffResidual(regression)
    with pytest.raises(TypeError, match="CorrDiffRegression wraps a PhysicsNeMo CorrDiffRegressionUNet"):
        N.CorrDiffRegression(residual)
    with pytest.raises(ValueError, match="expects img_lr with 4 channels, got 3"):
        N.CorrDiffRegression(regression)(torch.zeros(1, 3, H, H))


@needs_physicsnemo
def test_save_load_round_trip(tmp_path, residual, regression, batch):
    x, img_lr = batch
    sigma = torch.tensor([0.1, 1.0, 10.0])
    for net, kind in ((residual, "EDMPrecondSuperResolution"), (regression, "CorrDiffRegressionUNet")):
        path = N.save_mdlus(net, tmp_path / f"{kind}.mdlus")
        assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary file left behind
        loaded = N.load_mdlus(path, expected_class=kind)
        assert type(loaded) is type(net) and not loaded.training
        # the adapters (other tests) made the fixture's group norms infer as they train; the same for the copies
        run = (lambda m: m(x, img_lr, sigma)) if kind.startswith("EDM") else (lambda m: m(torch.zeros_like(x), img_lr))
        with torch.no_grad():
            assert torch.equal(run(N.train_mode_group_norm(loaded)), run(N.train_mode_group_norm(net)))
            import physicsnemo  # PhysicsNeMo's own loader reads the file too
            theirs = physicsnemo.Module.from_checkpoint(str(path)).eval()
            assert torch.equal(run(N.train_mode_group_norm(theirs)), run(net))


@needs_physicsnemo
def test_load_reads_module_save_files(tmp_path, monkeypatch, regression, batch):
    _, img_lr = batch
    monkeypatch.chdir(tmp_path)  # Module.save looks for a git HEAD in the working directory
    regression.save(str(tmp_path / "r.mdlus"))
    with zipfile.ZipFile(tmp_path / "r.mdlus") as z, tarfile.open(tmp_path / "legacy.mdlus", "w") as tar:
        for name in z.namelist():  # older checkpoints' tar layout (save(legacy_format=True) fails in 2.2.2)
            data = z.read(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for name in ("r.mdlus", "legacy.mdlus"):
        loaded = N.load_mdlus(tmp_path / name, expected_class="CorrDiffRegressionUNet")
        with torch.no_grad():
            assert torch.equal(N.CorrDiffRegression(loaded)(img_lr), N.CorrDiffRegression(regression)(img_lr))


@needs_physicsnemo
def test_load_names_the_file_when_the_class_is_wrong(tmp_path, regression):
    path = N.save_mdlus(regression, tmp_path / "teacher.mdlus")
    with pytest.raises(ValueError, match=r"teacher\.mdlus holds a CorrDiffRegressionUNet, but a EDMPrecond"):
        N.load_mdlus(path, expected_class="EDMPrecondSuperResolution")


def test_load_rejects_files_that_are_not_mdlus(tmp_path):
    junk = tmp_path / "junk.mdlus"
    junk.write_text("not an archive")
    with pytest.raises(ValueError, match=r"junk\.mdlus is not a \.mdlus checkpoint: not a zip"):
        N.load_mdlus(junk)
    (tmp_path / "weights.pt").write_text("x")
    with pytest.raises(ValueError, match=r"weights\.pt is not a \.mdlus checkpoint"):
        N.load_mdlus(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="missing.mdlus does not exist"):
        N.load_mdlus(tmp_path / "missing.mdlus")
    with zipfile.ZipFile(tmp_path / "partial.mdlus", "w") as z:
        z.writestr("args.json", "{}")
    with pytest.raises(ValueError, match="metadata.json, model.pt missing"):
        N.load_mdlus(tmp_path / "partial.mdlus")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _forged(path, name, module, state):
    buf = io.BytesIO()
    torch.save(state, buf)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("args.json", json.dumps({"__name__": name, "__module__": module, "__args__": {}}))
        z.writestr("metadata.json", json.dumps({"mdlus_file_version": "0.1.0"}))
        z.writestr("model.pt", buf.getvalue())
    return path


@needs_physicsnemo
def test_load_instantiates_only_corrdiff_classes_and_unpickles_only_tensors(tmp_path, regression):
    with pytest.raises(ValueError, match="holds a system \\(os\\), not a CorrDiff network"):
        N.load_mdlus(_forged(tmp_path / "a.mdlus", "system", "os", {}))
    with pytest.raises(ValueError, match="holds a FullyConnected"):
        N.load_mdlus(_forged(tmp_path / "b.mdlus", "FullyConnected", "physicsnemo.models.mlp", {}))
    path = N.save_mdlus(regression, tmp_path / "c.mdlus")
    with zipfile.ZipFile(path) as z:
        args, meta = z.read("args.json"), z.read("metadata.json")
    buf = io.BytesIO()
    torch.save({"w": _Payload()}, buf)
    with zipfile.ZipFile(tmp_path / "d.mdlus", "w") as z:
        z.writestr("args.json", args)
        z.writestr("metadata.json", meta)
        z.writestr("model.pt", buf.getvalue())
    with pytest.raises(ValueError, match="refusing to unpickle"):
        N.load_mdlus(tmp_path / "d.mdlus")


def test_save_refuses_non_corrdiff_modules(tmp_path):
    with pytest.raises(TypeError, match="got Linear"):
        N.save_mdlus(torch.nn.Linear(2, 2), tmp_path / "x.mdlus")
    with pytest.raises(ValueError, match="end in .mdlus"):
        N.save_mdlus(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


@needs_physicsnemo
def test_default_tiny_teacher_at_32x32():
    """The default architecture for a 32x32 grid, 3 outputs and 5 inputs (3 coarse + elevation + land)."""
    reg, res = N.build_regression(5, 3, 32), N.build_residual(5, 3, 32)
    assert sum(p.numel() for p in res.parameters()) == 1_211_683  # ~1.2M: trains on 2 CPU cores (physicsnemo 2.2)
    img_lr = torch.randn(16, 5, 32, 32)
    with torch.no_grad():
        mu = N.CorrDiffRegression(reg)(img_lr)
        x0 = N.CorrDiffResidual(res)(torch.randn(16, 3, 32, 32), torch.full((16,), 10.0), {"img_lr": img_lr})
    assert mu.shape == x0.shape == (16, 3, 32, 32)


@needs_physicsnemo
def test_corrdiff_embedding_path_makes_songunet_two_time_with_exact_and_fd_derivatives():
    """MeanFlow's TimeGap on the path corrdiff_meanflow.yaml names: the teacher at init, gap-dependent once its
    projection is trained, and exact and finite-difference du/dt agree on a real SongUNet."""
    from fastgen_sci.methods.meanflow import TimeGap, time_derivative

    with torch.random.fork_rng():
        torch.manual_seed(0)
        D = N.CorrDiffResidual(N.build_residual(C_LR, C_OUT, H, **TINY))
        for p in D.parameters():  # off the init: SongUNet's output conv starts near zero
            p.data.add_(0.05 * torch.randn_like(p))
    teacher = copy.deepcopy(D).eval()
    S = TimeGap(D, "net.model.map_layer0").eval()  # the path in configs/domain_method/corrdiff_meanflow.yaml
    cond = {"img_lr": torch.randn(3, 4, 16, 16)}
    x, sigma = torch.randn(3, 2, 16, 16) * 5, torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(S(x, sigma, cond, gap=0.4), teacher(x, sigma, cond), rtol=0, atol=0)
    torch.nn.init.normal_(S.proj.weight, std=0.3)
    assert not torch.allclose(S(x, sigma, cond, gap=0.4), S(x, sigma, cond, gap=0.1))
    t = torch.tensor([0.3, 0.7, 800 / 801])
    r, v = torch.tensor([0.1, 0.7, 0.0]), torch.randn_like(x)
    kw = dict(t_max=800 / 801, seed=0, step=1e-3)
    J_exact, J_fd = (time_derivative(S, x, t, r, v, cond, mode=m, **kw) for m in ("exact", "fd"))
    rel = (J_fd - J_exact).flatten(1).norm(dim=1) / J_exact.flatten(1).norm(dim=1)
    assert rel.max() < 0.03, rel  # float32, measured 2e-4 / 2e-3 / 1.4e-2: one-sided at r = t and t = t_max


@needs_physicsnemo
def test_group_norm_infers_as_it_trained_and_survives_a_copy(batch):
    x, img_lr = batch
    net = _scramble(N.build_residual(C_LR, C_OUT, H, **TINY), 3)
    sigma = torch.full((3,), 2.0)
    stock = net(x, img_lr, sigma)  # PhysicsNeMo's eval path: unbiased variance over the rearranged groups
    D = N.CorrDiffResidual(net).eval()
    ours = D(x, sigma, {"img_lr": img_lr})
    gap = (ours - stock).abs().max() / stock.abs().max()  # the same function up to the n / (n - 1) variance
    assert 0 < gap < 1e-2, gap
    norms = [m for m in net.modules() if type(m).__name__ == "GroupNorm"]
    assert norms
    for gn in norms[:3]:
        h = torch.randn(2, gn.weight.numel(), 8, 8)
        expect = torch.nn.functional.group_norm(h, gn.num_groups, gn.weight, gn.bias, gn.eps)
        expect = expect if gn.act_fn is None else gn.act_fn(expect)
        torch.testing.assert_close(gn(h), expect, rtol=0, atol=0)  # eval mode, exactly the training kernel
    twin = copy.deepcopy(D)
    gn2 = [m for m in twin.net.modules() if type(m).__name__ == "GroupNorm"][0]
    with torch.no_grad():
        gn2.bias.add_(1.0)  # the copy's layers use the copy's weights
    h = torch.randn(2, gn2.weight.numel(), 8, 8)
    expect = torch.nn.functional.group_norm(h, gn2.num_groups, gn2.weight, gn2.bias, gn2.eps)
    torch.testing.assert_close(gn2(h), expect if gn2.act_fn is None else gn2.act_fn(expect), rtol=0, atol=0)
