"""Where domains and methods are found: Python entry points, so an outside package plugs in unedited.

A package adds a pack or a method by declaring, in its pyproject.toml,

    [project.entry-points."fastgen_sci.domains"]
    mypack = "mypackage.pack:MyPack"          # a class satisfying DomainPack
    [project.entry-points."fastgen_sci.methods"]
    mymethod = "mypackage.method:MyMethod"    # a dataclass with .players(student=, teacher=)

and ships Hydra configs `domain/mypack.yaml` / `method/mymethod.yaml` in a package named by the
entry point group "fastgen_sci.configs" (e.g. `mypackage = "mypackage.configs"`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser


@dataclass
class EvalCases:
    """The evaluation cases of a pack: one condition per case (batched over cases), and truth if any.

    Args:
        cond: condition tensors with a leading case dimension [N, ...], or None (unconditional).
        shape: shape of one member sample in model space, e.g. (3, 32, 32).
        truth: observed outcome per case [N, *shape] in model space, or None.
        extra: anything else the pack needs to score or decode the cases (e.g. a regression mean).
    """

    n: int
    shape: tuple[int, ...]
    cond: Cond = None
    truth: Tensor | None = None
    extra: dict = field(default_factory=dict)

    def cond_rows(self, case_ids: Tensor) -> Cond:
        """Condition of each row of a batch made of members of cases `case_ids` [B]."""
        return None if self.cond is None else {k: v[case_ids] for k, v in self.cond.items()}


@runtime_checkable
class DomainPack(Protocol):
    """What the CLI needs from a domain pack; each method is a few lines over the pack's own modules."""

    description: ClassVar[str]

    def dataset(self) -> torch.utils.data.Dataset: ...  # items {'x': Tensor, 'cond': {name: Tensor}}

    def teacher(self) -> Denoiser: ...  # frozen, in model space

    def student(self, teacher: Denoiser) -> nn.Module: ...  # trainable Denoiser, initialised for distillation

    def teacher_network(self) -> nn.Module: ...  # untrained Denoiser for `train-teacher`

    def eval_cases(self) -> EvalCases: ...

    def score(self, samples: Tensor, cases: EvalCases) -> dict[str, float]: ...  # samples [N, M, *shape]

    def reference(self, cases: EvalCases, members: int) -> dict[str, float] | None: ...

    def save_student(self, student: nn.Module, run_dir: Path, name: str = "student") -> Path: ...

    def load_student(self, path: str | Path) -> nn.Module: ...

    def plots(self, samples: Mapping[str, Tensor], cases: EvalCases, out_dir: Path) -> list[Path]: ...

    # Optional: cross_scores(student, teacher, cases) -> dict (scores needing both ensembles);
    # validation_cases(n) -> EvalCases disjoint from eval_cases (the guard scores and selects on them);
    # train_teacher(make_trainer=, method=, run_dir=) -> Denoiser (multi-stage teachers, e.g. CorrDiff);
    # ensemble_dataset(denoiser, sampler, members=, seed=, batch_size=, device=) -> lazy xarray.Dataset and
    # to_netcdf(ds, path) for `generate` in the domain's own units and layout.


@runtime_checkable
class Method(Protocol):
    """A method: a dataclass of hyperparameters whose `players` the trainer runs."""

    def players(self, *, student: nn.Module, teacher: Denoiser | None) -> list: ...  # list[train.Player]

    # Optional: sampleable(trained) -> the model to sample and save, when the first player trains more
    # than the student (sCM's log-variance head, TCM's frozen stage-1 copy, MeanFlow's time-gap embedding).


def sampleable(method, trained: nn.Module) -> nn.Module:
    """The model to sample from after training: `method.sampleable(trained)` if it has one, else `trained`."""
    unwrap = getattr(method, "sampleable", None)
    return unwrap(trained) if unwrap is not None else trained


def _group(name: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=name)}


def domains() -> dict[str, Any]:
    """Registered domain packs: name -> entry point (loaded lazily)."""
    return _group("fastgen_sci.domains")


def methods() -> dict[str, Any]:
    """Registered methods: name -> entry point (loaded lazily)."""
    return _group("fastgen_sci.methods")


def config_packages() -> list[str]:
    """Extra Hydra config packages declared by outside packs."""
    return [ep.value for ep in entry_points(group="fastgen_sci.configs")]


def _load(kind: str, table: dict[str, Any], name: str):
    if not table:
        raise LookupError(f"no {kind}s are registered: install fastgen-sci (pip install -e .) so its entry points exist")
    if name not in table:
        raise LookupError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(table))}")
    return table[name].load()


def load_domain(name: str):
    """The DomainPack class registered under `name`."""
    return _load("domain", domains(), name)


def load_method(name: str):
    """The method dataclass registered under `name`."""
    return _load("method", methods(), name)


def describe(obj) -> str:
    """First line of an object's docstring."""
    return (getattr(obj, "description", None) or obj.__doc__ or "").strip().splitlines()[0] if obj else ""


def frozen(denoiser: nn.Module) -> nn.Module:
    """A teacher that neither trains nor keeps gradients for its parameters."""
    return denoiser.eval().requires_grad_(False)
