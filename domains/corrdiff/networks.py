"""CorrDiff teachers from PhysicsNeMo: lazy import, tiny builders, Denoiser adapters and safe .mdlus IO.

CorrDiff (Mardani et al. 2023) predicts y = mu + r: a regression U-Net gives mu = R(img_lr), and an EDM
diffusion model samples the residual r = y - mu given the condition img_lr (coarse input upsampled to
the fine grid, plus invariants such as elevation and land mask). Conventions follow PhysicsNeMo 2.2:
  regression: net(x=zeros[B, C_out, H, W], img_lr), noise label 0 inside (diffusion_unets/unet.py);
  residual:   net(x, img_lr, sigma) = c_skip x + c_out F(cat(c_in x, img_lr), c_noise), the condition
              unscaled (diffusion/preconditioners/legacy.py, EDMPrecondSuperResolution).
PhysicsNeMo is imported only when a network is built or loaded (its import takes several seconds).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
import warnings
import zipfile
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fastgen_sci.denoiser import Cond

# Class name in a checkpoint's args.json -> the PhysicsNeMo module that defines it. Nothing else is
# instantiated from a checkpoint. UNet and EDMPrecondSR are the deprecated names of older checkpoints.
CORRDIFF_CLASSES = {
    "CorrDiffRegressionUNet": "physicsnemo.models.diffusion_unets",
    "UNet": "physicsnemo.models.diffusion_unets",
    "EDMPrecondSuperResolution": "physicsnemo.diffusion.preconditioners",
    "EDMPrecondSR": "physicsnemo.diffusion.preconditioners",
}
_CKPT_FILES = ("args.json", "metadata.json", "model.pt")


# ----------------------------------------------------------------------------------------------
# Lazy import


def import_physicsnemo():
    """Import physicsnemo and its CorrDiff networks once; returns the physicsnemo package."""
    _import_torchvision()
    try:
        import physicsnemo
        import physicsnemo.diffusion.preconditioners  # noqa: F401
        import physicsnemo.models.diffusion_unets  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "physicsnemo":
            raise
        raise ImportError("CorrDiff teachers need NVIDIA PhysicsNeMo: pip install 'fastgen-sci[corrdiff]'") from e
    return physicsnemo


def _import_torchvision() -> None:
    """Import torchvision (timm, and so physicsnemo.models, need it), repairing the CPU-torch failure.

    The PyPI torchvision wheel is CUDA-linked; next to a CPU torch its C extension does not load and the
    import stops at `operator torchvision::nms does not exist`. Defining the two missing operator schemas
    (nms, qnms) lets the pure-Python part import; the C kernels stay unavailable (CorrDiff needs none).
    """
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return  # physicsnemo's own import will say what is missing
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop the half-imported package before importing it again
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                torch.library.define(f"torchvision::{op}", schema)
        import torchvision  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Builders (the real PhysicsNeMo classes at CPU sizes)


def _song_unet_kwargs(*, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
                      attn_resolutions: Sequence[int], bottleneck_attention: bool, dropout: float,
                      N_grid_channels: int) -> dict:
    """SongUNet constructor arguments; positional-embedding channels switch to SongUNetPosEmbd."""
    kwargs = dict(model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
                  attn_resolutions=list(attn_resolutions), bottleneck_attention=bottleneck_attention,
                  dropout=dropout, model_type="SongUNet")
    if N_grid_channels:
        kwargs.update(model_type="SongUNetPosEmbd", gridtype="sinusoidal_octave", N_grid_channels=N_grid_channels)
    return kwargs


def build_regression(img_in_channels: int, img_out_channels: int, img_resolution: int | tuple[int, int], *,
                     model_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 1,
                     attn_resolutions: Sequence[int] = (), bottleneck_attention: bool = False,
                     dropout: float = 0.0, N_grid_channels: int = 0, seed: int = 0) -> nn.Module:
    """CorrDiff's regression net R (CorrDiffRegressionUNet around a SongUNet), tiny by default.

    Args:
        img_in_channels: channels of img_lr as fed (positional-embedding channels are added here).
        N_grid_channels: SongUNetPosEmbd grid channels (CorrDiff's full-size default is 4; 0 = plain SongUNet).
    """
    import_physicsnemo()
    from physicsnemo.models.diffusion_unets import CorrDiffRegressionUNet

    arch = _song_unet_kwargs(model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                             attn_resolutions=attn_resolutions, bottleneck_attention=bottleneck_attention,
                             dropout=dropout, N_grid_channels=N_grid_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CorrDiffRegressionUNet(img_resolution=img_resolution, img_in_channels=img_in_channels + N_grid_channels,
                                      img_out_channels=img_out_channels, **arch)


def build_residual(img_in_channels: int, img_out_channels: int, img_resolution: int | tuple[int, int], *,
                   sigma_data: float = 0.5, model_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 2),
                   num_blocks: int = 1, attn_resolutions: Sequence[int] = (), bottleneck_attention: bool = False,
                   dropout: float = 0.0, N_grid_channels: int = 0, seed: int = 0) -> nn.Module:
    """CorrDiff's residual diffusion net (EDMPrecondSuperResolution around a SongUNet), tiny by default.

    Args:
        img_in_channels: channels of the condition as fed: img_lr, plus img_out_channels when the net
            is conditioned on mu as well (CorrDiff's hr_mean_conditioning); grid channels are added here.
    """
    import_physicsnemo()
    from physicsnemo.diffusion.preconditioners import EDMPrecondSuperResolution

    arch = _song_unet_kwargs(model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                             attn_resolutions=attn_resolutions, bottleneck_attention=bottleneck_attention,
                             dropout=dropout, N_grid_channels=N_grid_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return EDMPrecondSuperResolution(img_resolution=img_resolution,
                                         img_in_channels=img_in_channels + N_grid_channels,
                                         img_out_channels=img_out_channels, sigma_data=sigma_data, **arch)


def _check_kind(net: nn.Module, kind: str, adapter: str) -> None:
    """Refuse a net that is not (a subclass of) the PhysicsNeMo class `kind`, by name: no import needed."""
    if not any(c.__name__ == kind for c in type(net).__mro__):
        raise TypeError(f"{adapter} wraps a PhysicsNeMo {kind}, got a {type(net).__name__}")


def condition_channels(net: nn.Module) -> int:
    """Channels of the condition a CorrDiff net expects from the caller (its grid channels excluded)."""
    unet = net.model
    grid = unet.N_grid_channels if getattr(unet, "pos_embd", None) is not None else 0
    return net.img_in_channels - grid


# ----------------------------------------------------------------------------------------------
# Adapters


def corrdiff_condition(cond: Cond, channels: int) -> Tensor:
    """The condition tensor CorrDiff feeds: cat(mean_hr, img_lr) when cond has "mean_hr", else img_lr."""
    if cond is None or "img_lr" not in cond:
        raise ValueError("a CorrDiff network needs cond={'img_lr': [B, C, H, W]} (upsampled input + invariants)")
    img_lr = cond["img_lr"]  # [B, C_lr, H, W]
    if "mean_hr" in cond:  # hr_mean_conditioning: mu first (physicsnemo legacy_stochastic_sampler)
        img_lr = torch.cat([cond["mean_hr"].expand(img_lr.shape[0], -1, -1, -1), img_lr], dim=1)
    if img_lr.shape[1] != channels:
        given = "img_lr + mean_hr" if "mean_hr" in cond else "img_lr"
        raise ValueError(f"the CorrDiff residual net expects a {channels}-channel condition but got "
                         f"{img_lr.shape[1]} ({given}); cond['mean_hr'] is for nets trained with mu as input")
    return img_lr


def train_mode_group_norm(net: nn.Module) -> nn.Module:
    """Make PhysicsNeMo's GroupNorm layers in `net` normalise with F.group_norm in eval mode too.

    physicsnemo.nn.GroupNorm trains with F.group_norm but infers with its own channels-last code (an unbiased
    variance over rearranged groups): 3x slower forwards on a CPU SongUNet, and a normalisation that differs
    from the one the weights were trained with (variance n / (n - 1) larger, n = group size). Each layer's
    `forward` is replaced on the instance (class, weights and .mdlus files untouched).
    """
    for m in net.modules():
        if type(m).__name__ == "GroupNorm" and type(m).__module__.startswith("physicsnemo") and hasattr(m, "act_fn"):
            m.forward = _group_norm_forward.__get__(m)
    return net


def _group_norm_forward(self, x: Tensor) -> Tensor:
    """physicsnemo.nn.GroupNorm.forward's training branch, in both modes."""
    weight, bias = self.weight, self.bias
    if not self.amp_mode and weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    x = torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)
    return x if self.act_fn is None else self.act_fn(x)


class CorrDiffResidual(nn.Module):
    """PhysicsNeMo's EDMPrecondSuperResolution as a Denoiser of the residual r = y - mu.

    sigma_min/max default to CorrDiff's sampler range, clipped to the net's own (stochastic_sampler).
    The net's group norms infer as they train, in place (`train_mode_group_norm`).
    """

    def __init__(self, net: nn.Module, sigma_min: float = 0.002, sigma_max: float = 800.0):
        super().__init__()
        _check_kind(net, "EDMPrecondSuperResolution", "CorrDiffResidual")
        self.net = train_mode_group_norm(net)
        self.sigma_data = float(net.sigma_data)
        self.sigma_min = max(float(sigma_min), float(net.sigma_min))
        self.sigma_max = min(float(sigma_max), float(net.sigma_max))
        self.cond_channels = condition_channels(net)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        img_lr = corrdiff_condition(cond, self.cond_channels)  # [B, C_cond, H, W]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
        return self.net(x, img_lr, sigma).to(x.dtype)  # c_skip x + c_out F inside (EDM Eq. 7)


class CorrDiffRegression(nn.Module):
    """mu = R(img_lr) as CorrDiff computes it: zeros as the latent x, noise label 0 (regression_step).

    Unlike physicsnemo's regression_step this keeps gradients and takes any batch size. The net's group norms
    infer as they train, in place (`train_mode_group_norm`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        _check_kind(net, "CorrDiffRegressionUNet", "CorrDiffRegression")
        self.net = train_mode_group_norm(net)
        self.cond_channels = condition_channels(net)

    def forward(self, img_lr: Tensor) -> Tensor:
        B, C, H, W = img_lr.shape
        if C != self.cond_channels:
            raise ValueError(f"the CorrDiff regression net expects img_lr with {self.cond_channels} channels, got {C}")
        x = torch.zeros(B, self.net.img_out_channels, H, W, dtype=img_lr.dtype, device=img_lr.device)
        return self.net(x, img_lr).to(img_lr.dtype)  # [B, C_out, H, W]


# ----------------------------------------------------------------------------------------------
# Checkpoints (.mdlus: a zip of model.pt, args.json and metadata.json)


def save_mdlus(net: nn.Module, path: str | os.PathLike) -> Path:
    """Write a CorrDiff net as a .mdlus that physicsnemo.Module.from_checkpoint reads, atomically.

    Written here rather than by Module.save, which reads the git HEAD of the working directory and
    fails in a repository without commits.
    """
    path = Path(path)
    if path.suffix != ".mdlus":
        raise ValueError(f"CorrDiff checkpoints end in .mdlus, got {path}")
    name = type(net).__name__
    if name not in CORRDIFF_CLASSES or not hasattr(net, "_args"):
        raise TypeError(f"save_mdlus writes PhysicsNeMo CorrDiff networks ({', '.join(CORRDIFF_CLASSES)}), got {name}")
    try:
        pn_version = version("nvidia-physicsnemo")
    except PackageNotFoundError:
        pn_version = None
    metadata = {"physicsnemo_version": pn_version, "mdlus_file_version": net.__model_checkpoint_version__}
    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("model.pt", state.getvalue())
            archive.writestr("args.json", json.dumps(net._args))
            archive.writestr("metadata.json", json.dumps(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_mdlus(path: str | os.PathLike, expected_class: str | type | None = None) -> nn.Module:
    """Rebuild a CorrDiff net from a .mdlus, in eval mode, without unpickling code (weights_only=True).

    Safer than physicsnemo.Module.from_checkpoint, which imports whatever module args.json names and
    leaves weights_only to torch's default (off under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1).

    Args:
        expected_class: "CorrDiffRegressionUNet" or "EDMPrecondSuperResolution" (or the class): the file
            must hold it or a deprecated alias of it.
    """
    path = Path(path)
    files = _read_mdlus(path)
    args, metadata = json.loads(files["args.json"]), json.loads(files["metadata.json"])
    name = args.get("__name__")
    module = CORRDIFF_CLASSES.get(name)
    if module is None or (name == "UNet" and "diffusion" not in args.get("__module__", "")):
        raise ValueError(f"{path} holds a {name} ({args.get('__module__')}), not a CorrDiff network "
                         f"(one of {', '.join(CORRDIFF_CLASSES)})")
    import_physicsnemo()
    cls = getattr(import_module(module), name)
    expected = _corrdiff_class(expected_class)
    if expected is not None and not issubclass(cls, expected):
        raise ValueError(f"{path} holds a {name}, but a {expected.__name__} was expected here "
                         f"(a regression net given as the residual, or the other way round?)")
    kwargs = _upgrade_args(cls, args["__args__"], metadata, path)
    net = cls(**kwargs)
    try:
        state = torch.load(io.BytesIO(files["model.pt"]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: model.pt holds more than tensors; refusing to unpickle it ({e})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit its own args.json ({e})") from None
    return net.eval()  # a teacher; SongUNetPosEmbd's default dropout is 0.13


def _read_mdlus(path: Path) -> dict[str, bytes]:
    """The three members of a .mdlus (zip, or the legacy tar format), checked, as bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"CorrDiff checkpoint {path} does not exist")
    if path.suffix != ".mdlus":
        raise ValueError(f"{path} is not a .mdlus checkpoint (PhysicsNeMo's Module.save format)")
    if tarfile.is_tarfile(path):  # tar first, as physicsnemo does: old checkpoints pass both tests
        with tarfile.open(path) as archive:
            members = {m.name.removeprefix("./"): m for m in archive.getmembers() if m.isfile()}
            files = {k: archive.extractfile(members[k]).read() for k in _CKPT_FILES if k in members}
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            files = {k: archive.read(k) for k in _CKPT_FILES if k in archive.namelist()}
    else:
        raise ValueError(f"{path} is not a .mdlus checkpoint: not a zip (or legacy tar) archive")
    missing = [k for k in _CKPT_FILES if k not in files]
    if missing:
        raise ValueError(f"{path} is not a complete .mdlus checkpoint: {', '.join(missing)} missing")
    return files


def _upgrade_args(cls: type, args: dict, metadata: Mapping, path: Path) -> dict:
    """Constructor arguments of an older checkpoint version mapped by the class's own rules."""
    saved = metadata.get("mdlus_file_version", cls.__model_checkpoint_version__)
    if saved == cls.__model_checkpoint_version__:
        return args
    if saved not in cls.__supported_model_checkpoint_version__:
        raise ValueError(f"{path}: checkpoint version {saved} of {cls.__name__} is not supported by the "
                         f"installed PhysicsNeMo (reads {cls.__model_checkpoint_version__})")
    warnings.warn(cls.__supported_model_checkpoint_version__[saved])
    return cls._backward_compat_arg_mapper(saved, dict(args))


def _corrdiff_class(expected: str | type | None) -> type | None:
    """A CorrDiff class given by name or as the class itself."""
    if expected is None or isinstance(expected, type):
        return expected
    if expected not in CORRDIFF_CLASSES:
        raise ValueError(f"expected_class must be one of {', '.join(CORRDIFF_CLASSES)}, got {expected!r}")
    return getattr(import_module(CORRDIFF_CLASSES[expected]), expected)
