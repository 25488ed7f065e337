"""`fastgen-sci <command> key=value ...`: Hydra entry points, the only place a config object lives."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import registry
from .evaluate import compare, write_report
from .registry import frozen
from .samplers import STEP_LISTS, SamplerSpec
from .train import Trainer, resolve_device

USAGE = """usage: fastgen-sci <command> [key=value ...] [-m for a multirun sweep]

commands:
  distill        distil the domain's teacher into a few-step student and write the skill/spread report
  train-teacher  train a teacher network by denoising score matching (method=sft)
  evaluate       score a student checkpoint (student=PATH) against the teacher
  generate       write a student ensemble (student=PATH members=M out=FILE.zarr|.nc)
  compare        distil with each of methods=[...] on one budget and tabulate skill/spread at steps=[...]
  list           registered domains and methods

examples:
  fastgen-sci distill domain=toy method=ect
  fastgen-sci distill -m domain=toy method=ect,sft trainer.iterations=500
  fastgen-sci compare domain=corrdiff methods=[ect,scd,meanflow] steps=[1,2]
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


def _trainer_kwargs(cfg: DictConfig) -> dict:
    return {**OmegaConf.to_container(cfg.trainer, resolve=True), "seed": cfg.seed, "device": cfg.device}


def build_trainer(cfg: DictConfig) -> Trainer:
    return _construct(Trainer, _trainer_kwargs(cfg), "trainer")


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
    pack = build_pack(cfg)
    print(f"[1/4] loading {cfg.domain.name} data and teacher")
    teacher = frozen(pack.teacher()).to(device)
    dataset = pack.dataset()
    print(f"[2/4] distilling with {cfg.method.name} into {run_dir}")
    student, summary, path = _train_student(cfg, pack, teacher, dataset, run_dir)
    print(f"[3/4] sampling teacher and student ensembles ({cfg.eval.members} members per case)")
    models = {"teacher": (teacher, sampler_spec(cfg.teacher_sampler)), "student": (student, sampler_spec(cfg.student_sampler))}
    report, samples, cases = compare(pack=pack, models=models, members=cfg.eval.members, seed=cfg.seed,
                                     batch_size=cfg.eval.batch_size, device=device)
    report = {"domain": cfg.domain.name, "method": cfg.method.name, **report, "training": summary,
              "student_checkpoint": path.name}
    print("[4/4] writing report and plots")
    write_report(report, run_dir, pack=pack, samples=samples, cases=cases)
    _print_summary(report, run_dir)


def _train_student(cfg: DictConfig, pack, teacher, dataset, run_dir: Path, guard_cfg: DictConfig | None = None):
    """Distil `teacher` with cfg.method into run_dir: (frozen student, training summary, saved checkpoint).
    guard_cfg: the config whose guard and student sampler score the student while training (default cfg)."""
    method, trainer = build_method(cfg), build_trainer(cfg)
    players = method.players(student=pack.student(teacher), teacher=teacher)
    summary = trainer.fit(players, dataset, run_dir, guard=_guard(guard_cfg or cfg, pack, teacher, method))
    student = frozen(registry.sampleable(method, trainer.averaged(players[0])))
    return student, summary, save_student(pack, student, run_dir)


def _guard(cfg: DictConfig, pack, teacher, method):
    """The spread guard rail of cfg.guard (None when guard.every is 0)."""
    from .guard import SpreadGuard
    g = cfg.get("guard")
    if not g or not g.every:
        return None
    keep_best = bool(g.get("keep_best", False))
    if hasattr(pack, "validation_cases"):  # optional pack method: cases disjoint from the evaluation cases
        cases = pack.validation_cases(g.cases)
    else:
        cases = pack.eval_cases()
        if keep_best and cases.truth is not None:  # never select on the evaluation truth
            cases = dataclasses.replace(cases, truth=None)
    return SpreadGuard(cases, teacher, sampler_spec(cfg.teacher_sampler), sampler_spec(cfg.student_sampler),
                       every=g.every, members=g.members, n_cases=g.cases, ssr_floor=g.ssr_floor, seed=cfg.seed,
                       keep_best=keep_best, select=g.get("select", "crps"), device=resolve_device(cfg.device),
                       unwrap=lambda m: registry.sampleable(method, m))


def save_student(pack, student, run_dir: Path) -> Path:
    """The pack saves the Denoiser; a two-time student (MeanFlow's TimeGap) adds its gap embedding's weights
    in a sidecar `<checkpoint>.timegap.safetensors`, which `load_student` puts back."""
    from . import checkpoint
    from .methods.meanflow import TimeGap
    if not isinstance(student, TimeGap):
        return pack.save_student(student, run_dir)
    path = pack.save_student(student.denoiser, run_dir)
    own = {k: v for k, v in student.state_dict().items() if not k.startswith("denoiser.")}
    checkpoint.save_state(own, _timegap_file(path), metadata={"embedding": student.embedding})
    return path


def load_student(pack, path: str) -> torch.nn.Module:
    """A saved student: the pack's Denoiser, wrapped back into its TimeGap when a sidecar sits next to it."""
    from . import checkpoint
    from .methods.meanflow import TimeGap
    student, side = pack.load_student(path), _timegap_file(Path(path))
    if not side.exists():
        return student
    state, meta = checkpoint.load_state(side)
    model = TimeGap(student, meta.get("embedding"))
    missing = set(k for k in model.state_dict() if not k.startswith("denoiser.")) ^ set(state)
    if missing:
        raise checkpoint.CheckpointError(f"{side}: time-gap weights do not match the student (keys {sorted(missing)})")
    model.load_state_dict({**model.state_dict(), **state})
    return model


def _timegap_file(path: Path) -> Path:
    return path.with_name(path.name + ".timegap.safetensors")


def compare_methods(cfg: DictConfig) -> None:
    """Distil the teacher with each of `methods` on the same budget and seeds; score each at each of `steps`."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from .evaluate import write_method_table
    run_dir, device = _run_dir(), resolve_device(cfg.device)
    methods, steps = [str(m) for m in cfg.methods], [int(k) for k in cfg.steps]
    known = registry.methods()
    if unknown := [m for m in methods if m not in known]:
        raise UserError(f"compare: unknown method(s) {unknown}; valid: {', '.join(sorted(known))}")
    if bad := [k for k in steps if k != 1 and str(k) not in cfg.few_step_sigmas]:
        raise UserError(f"compare: no intermediate sigmas for {bad} steps; set few_step_sigmas.'K'=[...] "
                        f"(configured: {sorted(cfg.few_step_sigmas)})")
    budget = {"trainer.iterations": cfg.trainer.iterations, "trainer.batch_size": cfg.trainer.batch_size}
    keep = [o for o in HydraConfig.get().overrides.task
            if not o.split("=")[0].lstrip("+~").startswith(("method", "methods", "steps", "run_dir", "hydra."))]
    pack = build_pack(cfg)
    print(f"[1/3] loading {cfg.domain.name} data and teacher; {len(methods)} methods x "
          f"{budget['trainer.iterations']} iterations x {budget['trainer.batch_size']} images each")
    teacher = frozen(pack.teacher()).to(device)
    dataset = pack.dataset()
    models, training = {"teacher": (teacher, sampler_spec(cfg.teacher_sampler))}, {}
    levels = sorted({float(v) for k in steps if k > 1 for v in cfg.few_step_sigmas[str(k)]}, reverse=True)
    for i, m in enumerate(methods):  # student_sampler.sigmas: every level scored, for methods that train levels (KD)
        own = [*keep, f"method={m}", *(f"{k}={v}" for k, v in budget.items())]
        sub = compose("config", overrides=[*own, f"++student_sampler.sigmas={levels}"])
        print(f"[2/3] ({i + 1}/{len(methods)}) distilling with {m} into {run_dir / m}")
        # the guard scores (and selects) the student with its own sampler, as `distill` does, not the scored levels
        student, training[m], _ = _train_student(sub, pack, teacher, dataset, run_dir / m, compose("config", overrides=own))
        base = OmegaConf.to_container(sub.student_sampler, resolve=True)
        for k in steps:  # few-step students get K - 1 intermediate sigmas (the method's own few_step_sigmas
            if base["name"] in STEP_LISTS:  # when its domain_method file sets them); diffusion students K steps
                base["sigmas"] = [] if k == 1 else list(sub.few_step_sigmas[str(k)])
            else:
                base["steps"] = k
            models[f"{m}@{k}"] = (student, sampler_spec(OmegaConf.create(base)))
    print(f"[3/3] sampling and scoring {len(models)} ensembles ({cfg.eval.members} members per case)")
    report, samples, cases = compare(pack=pack, models=models, members=cfg.eval.members, seed=cfg.seed,
                                     batch_size=cfg.eval.batch_size, device=device)
    report = {"domain": cfg.domain.name, "methods": methods, "steps": steps, **report, "training": training,
              "run_dirs": {m: str(run_dir / m) for m in methods},
              "budget_images": budget["trainer.iterations"] * budget["trainer.batch_size"]}
    table = write_method_table(report, run_dir)
    print(table.read_text())
    print(f"report: {table}")


def train_teacher(cfg: DictConfig) -> None:
    """Train the pack's teacher from scratch, save it, and score its ensembles (against the optimum if known)."""
    run_dir, device = _run_dir(), resolve_device(cfg.device)
    pack, method = build_pack(cfg), build_method(cfg)
    print(f"training a {cfg.domain.name} teacher with {cfg.method.name} into {run_dir}")
    if hasattr(pack, "train_teacher"):  # multi-stage teachers (e.g. CorrDiff: regression, then residual)
        teacher = pack.train_teacher(make_trainer=lambda **kw: _construct(Trainer, {**_trainer_kwargs(cfg), **kw}, "trainer"),
                                     method=method, run_dir=run_dir)
    else:
        trainer = build_trainer(cfg)
        players = method.players(student=pack.teacher_network(), teacher=None)
        trainer.fit(players, pack.dataset(), run_dir)
        teacher = frozen(trainer.averaged(players[0]))
        print(f"teacher saved to {pack.save_student(teacher, run_dir, name='teacher')}")
    report, samples, cases = compare(pack=pack, models={"teacher": (teacher.to(device), sampler_spec(cfg.teacher_sampler))},
                                     members=cfg.eval.members, seed=cfg.seed, batch_size=cfg.eval.batch_size,
                                     device=device)
    report = {"domain": cfg.domain.name, "method": f"train-teacher ({cfg.method.name})", **report}
    write_report(report, run_dir, pack=pack, samples=samples, cases=cases)
    _print_summary(report, run_dir)


def evaluate(cfg: DictConfig) -> None:
    """Score a saved student against the teacher (student=PATH)."""
    if not cfg.student:
        raise UserError("evaluate needs student=PATH (a student checkpoint from `fastgen-sci distill`)")
    run_dir, device = _run_dir(), resolve_device(cfg.device)
    pack = build_pack(cfg)
    teacher = frozen(pack.teacher()).to(device)
    student = frozen(load_student(pack, cfg.student)).to(device)
    models = {"teacher": (teacher, sampler_spec(cfg.teacher_sampler)), "student": (student, sampler_spec(cfg.student_sampler))}
    report, samples, cases = compare(pack=pack, models=models, members=cfg.members or cfg.eval.members,
                                     seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device)
    report = {"domain": cfg.domain.name, "method": "evaluate", **report, "student_checkpoint": str(cfg.student)}
    write_report(report, run_dir, pack=pack, samples=samples, cases=cases)
    _print_summary(report, run_dir)


def generate(cfg: DictConfig) -> None:
    """Write a student ensemble for the pack's cases to .zarr or .nc (student=PATH members=M out=FILE).

    Written block by block; rerunning the same command resumes an interrupted run.
    """
    from .ensemble import MemberSampler, generate_ensemble
    from .store import write_ensemble
    if not cfg.student or not cfg.out:
        raise UserError("generate needs student=PATH and out=FILE.zarr|FILE.nc")
    device = resolve_device(cfg.device)
    pack = build_pack(cfg)
    student = frozen(load_student(pack, cfg.student)).to(device)
    sampler, members = sampler_spec(cfg.student_sampler), cfg.members or cfg.eval.members
    kwargs = dict(members=members, seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device)
    if hasattr(pack, "ensemble_dataset"):  # the domain's units, coordinates and layout
        ds = pack.ensemble_dataset(student, sampler, **kwargs)
    else:
        cases = pack.eval_cases()
        block = MemberSampler(student, sampler, cases, seed=cfg.seed, batch_size=cfg.eval.batch_size, device=device,
                              decode=lambda x, case_ids: x[:, None])
        ds = generate_ensemble(block, cases=cases.n, members=members, variables=["sample"], shape=cases.shape,
                               dims=[f"dim_{i}" for i in range(len(cases.shape))], case_dim="case",
                               attrs_global=block.attrs)
    print(f"wrote {write_ensemble(ds, cfg.out, to_netcdf=getattr(pack, 'to_netcdf', None))}")


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
            "compare": compare_methods, "list": list_registered}

if __name__ == "__main__":
    sys.exit(main())
