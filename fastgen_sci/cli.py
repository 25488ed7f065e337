"""`fastgen-sci <command> key=value ...`: Hydra entry points, the only place a config object lives."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import registry
from .evaluate import compare, write_report
from .registry import frozen
from .samplers import SamplerSpec
from .train import Trainer, resolve_device

USAGE = """usage: fastgen-sci <command> [key=value ...] [-m for a multirun sweep]

commands:
  distill        distil the domain's teacher into a few-step student and write the skill/spread report
  train-teacher  train a teacher network by denoising score matching (method=sft)
  evaluate       score a student checkpoint (student=PATH) against the teacher
  generate       write a student ensemble (student=PATH members=M out=FILE.zarr|.nc)
  list           registered domains and methods

examples:
  fastgen-sci distill domain=toy method=ect
  fastgen-sci distill -m domain=toy method=ect,sft trainer.iterations=500
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command '{command}'; valid: {', '.join(COMMANDS)}")
    if command == "list":
        return list_registered()
    if command == "train-teacher" and not any(o.startswith("method=") for o in overrides):
        overrides.append("method=sft")
    try:
        from .config import check_overrides
        check_overrides(overrides)
    except UserError as e:
        return _fail(str(e))
    return _run_hydra(command, overrides)


def _run_hydra(command: str, overrides: list[str]) -> int:
    import hydra

    extra = registry.config_packages()
    if extra:
        overrides = [*overrides, "hydra.searchpath=[" + ",".join(f"pkg://{p}" for p in extra) + "]"]
    sys.argv = [f"fastgen-sci {command}", *overrides]
    task = hydra.main(version_base="1.3", config_path="pkg://fastgen_sci.configs", config_name="config")(
        lambda cfg: _guarded(COMMANDS[command], cfg))
    task()
    return 0


def _guarded(fn, cfg: DictConfig) -> None:
    try:
        fn(cfg)
    except (UserError, LookupError, ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(_fail(str(e).splitlines()[0] if str(e) else type(e).__name__))


def _fail(message: str) -> int:
    print(f"fastgen-sci: error: {message}", file=sys.stderr)
    return 2


# --- building blocks from the config ---------------------------------------------------------------

def build_pack(cfg: DictConfig):
    kwargs = OmegaConf.to_container(cfg.domain, resolve=True)
    cls = registry.load_domain(kwargs.pop("name"))
    return _construct(cls, kwargs, "domain")


def build_method(cfg: DictConfig):
    kwargs = OmegaConf.to_container(cfg.method, resolve=True)
    cls = registry.load_method(kwargs.pop("name"))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return _construct(cls, kwargs, "method")


def build_trainer(cfg: DictConfig) -> Trainer:
    return _construct(Trainer, {**OmegaConf.to_container(cfg.trainer, resolve=True), "seed": cfg.seed,
                                "device": cfg.device}, "trainer")


def sampler_spec(node: DictConfig) -> SamplerSpec:
    return _construct(SamplerSpec, OmegaConf.to_container(node, resolve=True), "sampler")


def _construct(cls, kwargs: dict, where: str):
    from .config import check_types

    check_types(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a key the class does not take
        raise UserError(f"{where}: {e}") from None


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


# --- commands ----------------------------------------------------------------------------------------

def distill(cfg: DictConfig) -> None:
    """Train the student with the chosen method, save it, and write the skill/spread report."""
    run_dir, device = _run_dir(), resolve_device(cfg.device)
    pack, method, trainer = build_pack(cfg), build_method(cfg), build_trainer(cfg)
    print(f"[1/3] distilling {cfg.domain.name} with {cfg.method.name} into {run_dir}")
    teacher = frozen(pack.teacher()).to(device)
    players = method.players(student=pack.student(teacher), teacher=teacher)
    summary = trainer.fit(players, pack.dataset(), run_dir)
    student = frozen(trainer.averaged(players[0]))
    path = pack.save_student(student, run_dir)
    print(f"[2/3] sampling teacher and student ensembles ({cfg.eval.members} members per case)")
    report, samples, cases = compare(pack=pack, teacher=teacher, student=student,
                                     teacher_sampler=sampler_spec(cfg.teacher_sampler),
                                     student_sampler=sampler_spec(cfg.student_sampler), members=cfg.eval.members,
                                     seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device)
    report = {"domain": cfg.domain.name, "method": cfg.method.name, **report, "training": summary,
              "student_checkpoint": path.name}
    print("[3/3] writing report")
    write_report(report, run_dir, pack=pack, samples=samples, cases=cases)
    _print_summary(report, run_dir)


def train_teacher(cfg: DictConfig) -> None:
    """Train the pack's teacher network from scratch and save it next to its training log."""
    run_dir = _run_dir()
    pack, method, trainer = build_pack(cfg), build_method(cfg), build_trainer(cfg)
    print(f"training a {cfg.domain.name} teacher with {cfg.method.name} into {run_dir}")
    players = method.players(student=pack.teacher_network(), teacher=None)
    trainer.fit(players, pack.dataset(), run_dir)
    path = pack.save_student(frozen(trainer.averaged(players[0])), run_dir)
    print(f"teacher saved to {path}; use it with domain.teacher={path}")


def evaluate(cfg: DictConfig) -> None:
    """Score a saved student against the teacher (student=PATH)."""
    if not cfg.student:
        raise UserError("evaluate needs student=PATH (a student checkpoint from `fastgen-sci distill`)")
    run_dir, device = _run_dir(), resolve_device(cfg.device)
    pack = build_pack(cfg)
    teacher = frozen(pack.teacher()).to(device)
    student = frozen(pack.load_student(cfg.student)).to(device)
    members = cfg.members or cfg.eval.members
    report, samples, cases = compare(pack=pack, teacher=teacher, student=student,
                                     teacher_sampler=sampler_spec(cfg.teacher_sampler),
                                     student_sampler=sampler_spec(cfg.student_sampler), members=members,
                                     seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device)
    report = {"domain": cfg.domain.name, "method": "evaluate", **report, "student_checkpoint": str(cfg.student)}
    write_report(report, run_dir, pack=pack, samples=samples, cases=cases)
    _print_summary(report, run_dir)


def generate(cfg: DictConfig) -> None:
    """Write a student ensemble for the pack's cases to a .zarr or .nc file (student=PATH out=FILE)."""
    from .ensemble import sample_ensemble, write_dataset
    if not cfg.student or not cfg.out:
        raise UserError("generate needs student=PATH and out=FILE.zarr|FILE.nc")
    device = resolve_device(cfg.device)
    pack = build_pack(cfg)
    student = frozen(pack.load_student(cfg.student)).to(device)
    cases = pack.eval_cases()
    samples = sample_ensemble(student, sampler_spec(cfg.student_sampler), cases, cfg.members or cfg.eval.members,
                              seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device, desc="generate")
    print(f"wrote {write_dataset(samples, cfg.out)}")


def list_registered() -> int:
    for kind, table in (("domains", registry.domains()), ("methods", registry.methods())):
        print(f"{kind}:")
        for name, ep in sorted(table.items()):
            try:
                line = registry.describe(ep.load())
            except Exception as e:  # a broken plug-in must not hide the others
                line = f"(cannot load: {e})"
            print(f"  {name:<14} {line}")
    return 0


def _print_summary(report: dict, run_dir: Path) -> None:
    from .evaluate import markdown
    print(markdown({**report, "plots": []}))
    print(f"report: {run_dir / 'report.md'}")


COMMANDS = {"distill": distill, "train-teacher": train_teacher, "evaluate": evaluate, "generate": generate,
            "list": list_registered}

if __name__ == "__main__":
    sys.exit(main())
