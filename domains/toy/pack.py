"""The toy pack: n-D Gaussian mixtures whose exact denoiser is the teacher, so every score has a floor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from fastgen_sci.checkpoint import load_weights, save_weights
from fastgen_sci.registry import EvalCases

from .conditioning import class_cond
from .data import MixtureDataset, make_mixture
from .metrics import toy_scores
from .networks import build_network, exact_teacher


class ToyPack:
    """n-D Gaussian mixtures (optionally class-conditional) with the closed-form exact denoiser as teacher."""

    description = "n-D Gaussian mixtures, exact closed-form teacher; energy distance and sliced W2 to exact samples"

    def __init__(self, *, dim: int = 2, modes: int = 8, radius: float = 2.0, mode_std: float = 0.15,
                 classes: int = 0, n_train: int = 50_000, hidden: int = 256, depth: int = 3, dropout: float = 0.0,
                 sigma_max: float = 80.0, teacher: str = "exact", seed: int = 0):
        self.mixture = make_mixture(dim=dim, modes=modes, radius=radius, mode_std=mode_std, classes=classes, seed=seed)
        self.net_kwargs = dict(dim=dim, sigma_data=self.mixture.sigma_data, hidden=hidden, depth=depth,
                               classes=classes, dropout=dropout, sigma_max=sigma_max)
        self.classes, self.n_train, self.teacher_source, self.seed = classes, n_train, teacher, seed
        self.sigma_max = sigma_max

    def dataset(self) -> MixtureDataset:
        return MixtureDataset(self.mixture, self.n_train, classes=self.classes, seed=self.seed)

    def teacher(self) -> nn.Module:
        """'exact' (closed form) or the path of a teacher trained by `fastgen-sci train-teacher domain=toy`."""
        if self.teacher_source == "exact":
            return exact_teacher(self.mixture, sigma_max=self.sigma_max)
        return self.load_student(self.teacher_source)

    def teacher_network(self) -> nn.Module:
        return build_network(**self.net_kwargs, seed=self.seed)

    def student(self, teacher: nn.Module) -> nn.Module:
        """A copy of a trained teacher network; a fresh network when the teacher is the exact formula."""
        student = self.teacher_network()
        if any(True for _ in teacher.parameters()):
            student.load_state_dict(teacher.state_dict())
        return student

    def eval_cases(self) -> EvalCases:
        """One case per class (a single unconditional case when classes = 0)."""
        if not self.classes:
            return EvalCases(n=1, shape=(self.mixture.dim,))
        return EvalCases(n=self.classes, shape=(self.mixture.dim,), cond=class_cond(torch.arange(self.classes), self.classes))

    def exact_samples(self, cases: EvalCases, members: int, seed: int) -> Tensor:
        """Exact draws [N, M, D] for each case."""
        g = torch.Generator().manual_seed(seed)
        labels = [None] if not self.classes else range(self.classes)
        return torch.stack([self.mixture.sample(members, g, label)[0].float() for label in labels])

    def score(self, samples: Tensor, cases: EvalCases) -> dict[str, float]:
        """Scores against a fixed exact sample set per case, averaged over cases."""
        exact = self.exact_samples(cases, max(samples.shape[1], 2000), seed=10_000 + self.seed)
        labels = [None] if not self.classes else range(self.classes)
        per_case = [toy_scores(s, e, self.mixture.restricted(lab)) for s, e, lab in zip(samples, exact, labels)]
        return {k: sum(d[k] for d in per_case) / len(per_case) for k in per_case[0]}

    def reference(self, cases: EvalCases, members: int) -> dict[str, float]:
        """Scores of fresh exact samples: the Monte-Carlo floor of each score at this ensemble size."""
        return self.score(self.exact_samples(cases, members, seed=20_000 + self.seed), cases)

    def save_student(self, student: nn.Module, run_dir: Path, name: str = "student") -> Path:
        return save_weights(student, Path(run_dir) / f"{name}.safetensors",
                            metadata={"domain": "toy", "network": json.dumps(self.net_kwargs)})

    def load_student(self, path: str | Path) -> nn.Module:
        return load_weights(self.teacher_network(), path)

    def plots(self, samples: Mapping[str, Tensor], cases: EvalCases, out_dir: Path) -> list[Path]:
        """Scatter of the first two coordinates: exact | teacher | student (first case)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        panels = {"exact": self.exact_samples(cases, samples["teacher"].shape[1], seed=30_000)[0], **{k: v[0] for k, v in samples.items()}}
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharex=True, sharey=True)
        for ax, (name, s) in zip(axes, panels.items()):
            ax.scatter(s[:, 0], s[:, 1 % s.shape[1]], s=1, alpha=0.4)
            ax.set_title(name)
        fig.tight_layout()
        path = Path(out_dir) / "samples.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]
