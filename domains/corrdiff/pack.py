"""The CorrDiff pack: PhysicsNeMo's regression mean + residual diffusion, distilled on the residual.

Model space: outputs normalised per variable (stats.json); the regression net R gives mu = R(img_lr) and
the residual model is a Denoiser over x = y_norm - mu with cond {'img_lr'}. The regression stays frozen;
the student starts from the residual teacher. Samples are decoded to physical units for every score.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fastgen_sci.registry import EvalCases, frozen

from . import conditioning
from . import metrics as M
from . import plots as P
from .benchmark import DownscalingBenchmark
from .codec import ResidualCodec
from .data import DownscalingData
from .readers import open_dataset
from .writers import default_dataset

DEFAULT_TEACHER = Path(__file__).parent / "data" / "teacher"
RESIDUAL_CLASS = "EDMPrecondSuperResolution"
REGRESSION_CLASS = "CorrDiffRegressionUNet"


def cache_root() -> Path:
    """Where the embedded benchmark data is written once ($FASTGEN_SCI_CACHE or ~/.cache/fastgen-sci)."""
    return Path(os.environ.get("FASTGEN_SCI_CACHE", Path.home() / ".cache" / "fastgen-sci")) / "corrdiff"


class ResidualDataset(torch.utils.data.Dataset):
    """Training items {'x': y_norm - mu [C, H, W], 'cond': {'img_lr': [C_in, H, W]}} held in memory."""

    def __init__(self, residual: Tensor, img_lr: Tensor):
        self.residual, self.img_lr = residual, img_lr

    def __len__(self) -> int:
        return len(self.residual)

    def __getitems__(self, idx: list[int]) -> dict:
        return {"x": self.residual[idx], "cond": {"img_lr": self.img_lr[idx]}}


class CorrDiffPack:
    """CorrDiff weather downscaling (PhysicsNeMo regression + residual diffusion); exact-posterior benchmark."""

    description = "CorrDiff downscaling (PhysicsNeMo); default data: exact Gaussian posterior over real terrain"

    def __init__(self, *, data: Mapping, teacher: Mapping, network: Mapping | None = None,
                 training: Mapping | None = None, batch_size: int = 64):
        self.data_cfg, self.teacher_cfg = dict(data), dict(teacher)
        self.network_cfg, self.training_cfg = dict(network or {}), dict(training or {})
        self.batch_size = batch_size

    # --- data ---------------------------------------------------------------------------------------

    @functools.cached_property
    def benchmark(self) -> DownscalingBenchmark | None:
        """The exact benchmark behind the default data (None for a user's data)."""
        return None if self.data_cfg.get("path") else DownscalingBenchmark(**self.data_cfg.get("benchmark", {}))

    @functools.cached_property
    def data(self) -> DownscalingData:
        cfg = self.data_cfg
        names = {k: cfg.get(k) for k in ("input_vars", "output_vars", "invariant_vars")}
        if self.benchmark is not None:
            return default_dataset(cache_root(), benchmark=self.benchmark, n_times=cfg["n_times"], seed=cfg["seed"],
                                   upsample=cfg.get("upsample", "nearest"), **names)
        return open_dataset(cfg["path"], format=cfg.get("format", "auto"), upsample=cfg.get("upsample", "nearest"),
                            **names)

    def split(self, part: str) -> np.ndarray:
        """Time indices of 'train' or 'eval': the last `eval_times` valid times are held out."""
        n, n_eval = len(self.data), int(self.data_cfg["eval_times"])
        if not 0 < n_eval < n:
            raise ValueError(f"data.eval_times={n_eval} must be between 1 and the {n - 1} usable times of {self.data.source}")
        return np.arange(n - n_eval) if part == "train" else np.arange(n - n_eval, n)

    @functools.cached_property
    def codec(self) -> ResidualCodec:
        return ResidualCodec.of(self.data)

    def target(self, idx: np.ndarray) -> Tensor:
        """Normalised outputs [B, C_out, H, W]."""
        return self.codec.normalize(torch.from_numpy(np.ascontiguousarray(self.data.outputs(idx))))

    @torch.no_grad()
    def mean_of(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """(img_lr, mu = R(img_lr)) for times idx, in batches."""
        R = self.regression()
        img_lr = conditioning.img_lr(self.data, idx)
        mu = torch.cat([R(img_lr[i:i + self.batch_size]) for i in range(0, len(img_lr), self.batch_size)])
        return img_lr, mu

    def dataset(self) -> ResidualDataset:
        idx = self.split("train")
        img_lr, mu = self.mean_of(idx)
        return ResidualDataset(self.target(idx) - mu, img_lr)

    # --- networks -------------------------------------------------------------------------------------

    def _teacher_file(self, kind: str) -> Path:
        path = self.teacher_cfg.get(kind)
        if path:
            return Path(path)
        if self.benchmark is None:
            raise ValueError(f"teacher.{kind}=PATH.mdlus is required for your data (the shipped default teacher "
                             f"only fits the embedded benchmark); train one with `fastgen-sci train-teacher domain=corrdiff "
                             f"data.path=...`")
        return DEFAULT_TEACHER / f"{kind}.mdlus"

    def regression(self) -> nn.Module:
        """The frozen regression mean R(img_lr) (loaded once)."""
        return self._regression

    @functools.cached_property
    def _regression(self) -> nn.Module:
        from .networks import CorrDiffRegression, load_mdlus
        path = self._teacher_file("regression")
        R = CorrDiffRegression(load_mdlus(path, REGRESSION_CLASS))
        self._check_fits(R.net, f"regression model {path}")
        return frozen(R)

    def teacher(self) -> nn.Module:
        return frozen(self.load_student(self._teacher_file("residual")))

    def load_student(self, path: str | Path) -> nn.Module:
        """A residual Denoiser from an .mdlus file (teacher or distilled student)."""
        from .networks import CorrDiffResidual, load_mdlus
        D = CorrDiffResidual(load_mdlus(path, RESIDUAL_CLASS), sigma_max=float(self.teacher_cfg.get("sigma_max", 800.0)))
        self._check_fits(D.net, f"residual model {path}")
        return D

    def student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the residual teacher (the regression mean stays the teacher's)."""
        return copy.deepcopy(teacher).train().requires_grad_(True)

    def teacher_network(self) -> nn.Module:
        """A fresh residual model for `train-teacher` (SongUNet sized by `network`)."""
        from .networks import CorrDiffResidual, build_residual
        c_in, c_out, res = self._shapes()
        net = build_residual(c_in, c_out, res, **self.network_cfg)
        return CorrDiffResidual(net, sigma_max=float(self.teacher_cfg.get("sigma_max", 800.0)))

    def regression_network(self) -> nn.Module:
        from .networks import CorrDiffRegression, build_regression
        c_in, c_out, res = self._shapes()
        return CorrDiffRegression(build_regression(c_in, c_out, res, **self.network_cfg))

    def _shapes(self) -> tuple[int, int, tuple[int, int]]:
        return conditioning.condition_channels(self.data), len(self.data.output_vars), self.data.grid

    def _check_fits(self, net: nn.Module, what: str) -> None:
        """Teacher and data must agree on channels and grid: say which and how."""
        from .networks import condition_channels
        c_in, c_out, res = self._shapes()
        want = (c_in, c_out, tuple(res))
        res_args = net._args["__args__"]["img_resolution"]  # PhysicsNeMo keeps its constructor arguments
        got = (condition_channels(net), int(net.img_out_channels), tuple(int(r) for r in np.broadcast_to(res_args, 2)))
        if got != want:
            raise ValueError(f"{what} expects (condition channels, output channels, grid) = {got} but the data "
                             f"{self.data.source} gives {want} (inputs {list(self.data.input_vars)} + invariants "
                             f"{list(self.data.invariant_vars)} -> outputs {list(self.data.output_vars)})")

    def save_student(self, student: nn.Module, run_dir: Path, name: str = "student") -> Path:
        from .networks import save_mdlus
        return save_mdlus(student.net, Path(run_dir) / f"{name}.mdlus")

    def train_teacher(self, *, make_trainer, method, run_dir: Path) -> nn.Module:
        """CorrDiff's two stages: the regression mean by MSE, then the residual model by `method` (SFT)."""
        from fastgen_sci.train import Player
        from .networks import save_mdlus

        run_dir, cfg = Path(run_dir), self.training_cfg
        idx = self.split("train")
        img_lr, y = conditioning.img_lr(self.data, idx), self.target(idx)
        print(f"[1/2] regression mean: {cfg['regression_iterations']} iterations")
        R = self.regression_network()
        trainer = make_trainer(iterations=cfg["regression_iterations"])
        trainer.fit([Player("regression", R, regression_loss, optimizer="adam", lr=cfg["regression_lr"])],
                    ResidualDataset(y, img_lr), run_dir / "regression")
        R = frozen(trainer.emas["regression"])
        self.teacher_cfg["regression"] = str(save_mdlus(R.net, run_dir / "regression.mdlus"))
        self.__dict__.pop("_regression", None)
        print(f"[2/2] residual diffusion model: {cfg['residual_iterations']} iterations")
        players = method.players(student=self.teacher_network(), teacher=None)
        trainer = make_trainer(iterations=cfg["residual_iterations"])
        trainer.fit(players, self.dataset(), run_dir / "residual")
        D = frozen(trainer.averaged(players[0]))
        self.teacher_cfg["residual"] = str(self.save_student(D, run_dir, name="residual"))
        print(f"teacher saved: teacher.regression={self.teacher_cfg['regression']} "
              f"teacher.residual={self.teacher_cfg['residual']}")
        return D

    # --- evaluation -----------------------------------------------------------------------------------

    def eval_cases(self) -> EvalCases:
        return self._eval_cases

    @functools.cached_property
    def _eval_cases(self) -> EvalCases:
        return self._cases(self.split("eval"))

    def validation_cases(self, n: int) -> EvalCases:
        """The last n training times: disjoint from the evaluation cases (for the guard's model selection).
        They are among the training times (each drawn about three times in 900 x 32 images, with fresh noise):
        not enough for a one-step generator to memorise their residuals."""
        return self._cases(self.split("train")[-n:])

    def _cases(self, idx: np.ndarray) -> EvalCases:
        img_lr, mu = self.mean_of(idx)
        y = self.target(idx)
        return EvalCases(n=len(idx), shape=tuple(y.shape[1:]), cond={"img_lr": img_lr}, truth=y - mu,
                         extra={"mu": mu, "truth": self.codec.denormalize(y), "time": self.data.time[idx]})

    def physical(self, samples: Tensor, cases: EvalCases) -> Tensor:
        """Residual samples [N, M, C, H, W] -> physical fields mu + r, denormalised."""
        return self.codec.decode(samples, cases.extra["mu"][:, None])

    def score(self, samples: Tensor, cases: EvalCases) -> dict:
        """Per-variable skill and spread in physical units; with the benchmark, the gap to CRPS* too."""
        scores = M.ensemble_scores(self.physical(samples, cases), cases.extra["truth"], list(self.data.output_vars))
        flat = _flat(scores["variables"], SUMMARY_KEYS)
        for v, ref in (self._optimal() or {}).items():
            flat[f"crps_gap:{v}"] = flat[f"crps_fair:{v}"] - ref["crps_fair"]
            flat[f"crps_gap_rel:{v}"] = flat[f"crps_gap:{v}"] / ref["crps_fair"]
        return {**flat, "ssr:all": scores["all"]["ssr"], "detail": scores}

    def _optimal(self) -> dict | None:
        """Bayes-optimal scores per variable (benchmark data only)."""
        if self.benchmark is None:
            return None
        return M.reference_scores(self.benchmark.posterior_sd(), list(self.data.output_vars))["variables"]

    def cross_scores(self, student: Tensor, teacher: Tensor, cases: EvalCases) -> dict:
        out = M.versus_teacher(self.physical(student, cases), self.physical(teacher, cases), cases.extra["truth"],
                               list(self.data.output_vars))
        keys = ("crps_rel_gap", "teacher_rank_flatness", "lsd_db", "ssr_ratio")
        return {**_flat(out["variables"], keys), "crps_rel_gap:all": out["all"]["crps_rel_gap"], "detail": out}

    def reference(self, cases: EvalCases, members: int) -> dict | None:
        if self.benchmark is None:
            return None
        ref = M.reference_scores(self.benchmark.posterior_sd(), list(self.data.output_vars), members=members)
        return {**_flat(ref["variables"], ("crps_fair", "mae", "rmse", "ssr")), "source": ref["source"]}

    def optimal_samples(self, cases: EvalCases, members: int, seed: int = 0) -> Tensor | None:
        """Exact posterior draws in physical units [N, M, C, H, W] (benchmark data only)."""
        if self.benchmark is None:
            return None
        idx = self.split("eval")
        y = self.data.read("input", idx).astype(np.float64)  # coarse physical inputs
        draws = self.benchmark.sample_posterior(y, members=members, seed=seed)
        return torch.from_numpy(draws).float()

    def ensemble_dataset(self, denoiser: nn.Module, sampler, *, members: int, seed: int, batch_size: int, device):
        """The student ensemble over the evaluation times as a lazy xarray Dataset in physical units."""
        from fastgen_sci.ensemble import MemberSampler, generate_ensemble

        cases = self.eval_cases()
        mu = cases.extra["mu"].to(device)
        block = MemberSampler(denoiser, sampler, cases, seed=seed, batch_size=batch_size, device=device,
                              decode=lambda r, case_ids: self.codec.decode(r, mu[case_ids]))
        H, W = self.data.grid
        return generate_ensemble(block, cases=cases.n, members=members, variables=list(self.data.output_vars),
                                 shape=(H, W), coords=self._coords(cases), attrs=self._attrs(),
                                 attrs_global={**block.attrs, "source": str(self.data.source)}, chunks=(1, members))

    def to_netcdf(self, ds, path) -> Path:
        """CorrDiff's generate layout: root lat/lon/time; groups input, truth, prediction (physical units)."""
        import xarray as xr
        from .writers import write_generate_netcdf

        cases, dims = self.eval_cases(), ("time", "y", "x")
        inputs = self.data.inputs(self.split("eval"))
        inp = xr.Dataset({v: (dims, inputs[:, i]) for i, v in enumerate(self.data.input_vars)})
        truth = xr.Dataset({v: (dims, cases.extra["truth"][:, i].numpy()) for i, v in enumerate(self.data.output_vars)})
        return write_generate_netcdf(path, prediction=ds.drop_vars(["lat", "lon"]), input=inp, truth=truth,
                                     lat=self.data.lat, lon=self.data.lon, time=ds.time.values)

    def _coords(self, cases: EvalCases) -> dict:
        return {"time": cases.extra["time"], "lat": (("y", "x"), self.data.lat), "lon": (("y", "x"), self.data.lon)}

    def _attrs(self) -> dict:
        """CF attributes of the output variables (units from the pack's table; standard names where known)."""
        return {v: {"units": M.UNITS.get(v, "").replace("m/s", "m s-1"), "long_name": v,
                    **({"standard_name": CF_NAMES[v]} if v in CF_NAMES else {})} for v in self.data.output_vars}

    def plots(self, samples: Mapping[str, Tensor], cases: EvalCases, out_dir: Path) -> list[Path]:
        variables, truth = list(self.data.output_vars), cases.extra["truth"]
        phys = {name: self.physical(s, cases) for name, s in samples.items()}
        optimum = self.optimal_samples(cases, next(iter(phys.values())).shape[1])
        if optimum is not None:
            phys = {"optimum": optimum, **phys}
        scores = {name: M.ensemble_scores(p, truth, variables, n_boot=50) for name, p in phys.items()}
        versus = M.versus_teacher(phys["student"], phys["teacher"], truth, variables, n_boot=50) \
            if "student" in phys and "teacher" in phys else None
        spectra = {name: M.mean_spectra(p, variables) for name, p in {"truth": truth, **phys}.items()}
        return [P.plot_rank_histograms(scores, out_dir, versus=versus), P.plot_spectra(spectra, out_dir),
                P.plot_spread_skill(scores, out_dir),
                P.plot_sample_maps(truth, phys, variables, self.data.lat, self.data.lon, out_dir)]


CF_NAMES = {"t2m": "air_temperature", "u10": "eastward_wind", "v10": "northward_wind"}
SUMMARY_KEYS = ("crps_fair", "crps_emp", "ssr", "spread", "rmse", "mae", "rank_flatness", "energy_fair")


def regression_loss(R: nn.Module, x: Tensor, cond, rng, progress) -> Tensor:
    """CorrDiff's regression stage: mean-squared error of mu = R(img_lr) against the normalised output [B]."""
    return ((R(cond["img_lr"]) - x) ** 2).flatten(1).mean(dim=1)


def _flat(per_variable: Mapping[str, Mapping], keys) -> dict[str, float]:
    """{'crps_fair:t2m': ..., 'ssr:u10': ...} for the markdown table."""
    return {f"{k}:{v}": s[k] for v, s in per_variable.items() for k in keys if isinstance(s.get(k), (int, float))}
