"""The skill-and-spread report: student ensembles against the teacher's (and an exact reference when one
exists), with both timed in the same run, on the same device, with the same batching."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .checkpoint import write_json
from .denoiser import Denoiser
from .ensemble import sample_ensemble
from .registry import DomainPack, EvalCases
from .samplers import STEP_LISTS, SamplerSpec
from .train import read_metrics


def timed_ensemble(denoiser: Denoiser, sampler: SamplerSpec, cases: EvalCases, members: int, *, seed: int,
                   batch_size: int, device: torch.device, desc: str) -> tuple[Tensor, float]:
    """Samples [N, M, *shape] and wall-clock seconds per member, after one untimed warm-up batch."""
    warm = EvalCases(n=1, shape=cases.shape, cond=None if cases.cond is None else
                     {k: v[:1] for k, v in cases.cond.items()})
    sample_ensemble(denoiser, sampler, warm, min(members, batch_size), seed=seed + 1, batch_size=batch_size,
                    device=device, progress=False)
    _sync(device)
    t0 = time.perf_counter()
    samples = sample_ensemble(denoiser, sampler, cases, members, seed=seed, batch_size=batch_size, device=device,
                              desc=desc)
    _sync(device)
    return samples, (time.perf_counter() - t0) / (cases.n * members)


def compare(*, pack: DomainPack, models: Mapping[str, tuple[Denoiser, SamplerSpec]], members: int, seed: int,
            batch_size: int, device: torch.device) -> tuple[dict, dict[str, Tensor], EvalCases]:
    """Sample, time and score each named model's ensembles over the pack's evaluation cases."""
    cases = pack.eval_cases()
    report: dict = {"members": members, "cases": cases.n, "seed": seed, "batch_size": batch_size,
                    "device": str(device)}
    samples = {}
    for name, (model, sampler) in models.items():
        samples[name], sec = timed_ensemble(model, sampler, cases, members, seed=seed, batch_size=batch_size,
                                            device=device, desc=f"{name} ensemble ({sampler.nfe} NFE)")
        report[name] = {"nfe": sampler.nfe, "sampler": _describe(sampler), "seconds_per_member": sec,
                        **pack.score(samples[name], cases)}
    report["reference"] = pack.reference(cases, members) or {}
    for name in [n for n in samples if n != "teacher" and "teacher" in samples]:
        report[name]["speedup"] = report["teacher"]["seconds_per_member"] / report[name]["seconds_per_member"]
        if hasattr(pack, "cross_scores"):
            report.setdefault("vs_teacher", {})[name] = pack.cross_scores(samples[name], samples["teacher"], cases)
    if "student" in samples and "teacher" in samples:  # the distill report's headline keys
        report["speedup"] = report["student"]["speedup"]
        if "vs_teacher" in report:
            report["student_vs_teacher"] = report.pop("vs_teacher")["student"]
    return report, samples, cases


def write_report(report: dict, run_dir: Path, *, pack: DomainPack, samples: Mapping[str, Tensor],
                 cases: EvalCases) -> list[Path]:
    """report.json, report.md and plots into run_dir; returns the written paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = list(pack.plots(samples, cases, run_dir))
    curve = plot_training(run_dir)
    plots += [curve] if curve else []
    report["plots"] = [p.name for p in plots]
    write_json(run_dir / "report.json", report)
    md = run_dir / "report.md"
    md.write_text(markdown(report))
    return [run_dir / "report.json", md, *plots]


def markdown(report: dict) -> str:
    """The report as markdown: a table of scores per model; 'score:variable' keys get one table per variable."""
    cols = [c for c in ("teacher", "student", "reference", "student_vs_teacher") if report.get(c)]
    keys = list(dict.fromkeys(k for c in cols for k, v in report[c].items() if isinstance(v, (int, float))))
    lines = [f"# {report.get('domain', '')} / {report.get('method', '')}: skill and spread", "",
             f"{report['cases']} cases x {report['members']} members, seed {report['seed']}, "
             f"batch {report['batch_size']} on {report['device']}.", "",
             *[f"{who.capitalize()}: {report[who]['sampler']}." for who in ("teacher", "student") if who in report], "",
             *([f"**Speedup (teacher s/member / student s/member): {report['speedup']:.1f}x**", ""]
               if "speedup" in report else [])]
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split(":")[1] if ":" in k else "", []).append(k)
    for group, members in groups.items():
        lines += [f"### {group}" if group else "", "", "| score | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k.split(':')[0]} | " + " | ".join(_fmt(report[c].get(k)) for c in cols) + " |" for k in members]
        lines.append("")
    lines += [*[f"![{p}]({p})" for p in report.get("plots", [])], ""]
    return "\n".join(lines)


def method_rows(report: dict) -> list[dict]:
    """One row per compared student (method@steps): NFE, scores, scores against the teacher, cost."""
    rows = []
    for name in [n for n in report if "@" in n and isinstance(report[n], dict)]:
        method, steps = name.split("@")
        r, train = report[name], report.get("training", {}).get(method, {})
        rows.append({"method": method, "steps": int(steps), "nfe": r["nfe"],
                     **{k: v for k, v in r.items() if isinstance(v, float) and k not in ("seconds_per_member", "speedup")},
                     **{k: v for k, v in report.get("vs_teacher", {}).get(name, {}).items() if isinstance(v, float)},
                     "speedup": r.get("speedup"), "train_seconds": _train_seconds(train, report.get("run_dirs", {}).get(method)),
                     "peak_memory_mb": train["peak_memory_bytes"] / 2**20 if train.get("peak_memory_bytes") else None})
    return rows


def _train_seconds(summary: dict, run_dir: str | None) -> float | None:
    """Training wall time; for a run resumed after it had finished, the time its metrics log recorded."""
    if summary.get("resumed_from") == summary.get("iterations") and run_dir:
        rows = read_metrics(Path(run_dir))
        return rows[-1]["seconds"] if rows else None
    return summary.get("seconds")


def write_method_table(report: dict, run_dir: Path) -> Path:
    """compare.json, compare.md (one row per method and step count, per-variable scores joined by '/'), and
    compare.png; returns the markdown path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = method_rows(report)
    report["rows"] = rows
    write_json(run_dir / "compare.json", report)
    first = ["method", "steps", "nfe"]
    last = ["speedup", "train_seconds", "peak_memory_mb"]
    bases = list(dict.fromkeys(k.split(":")[0] for r in rows for k in r if k not in first + last))
    variables = list(dict.fromkeys(k.split(":")[1] for r in rows for k in r if ":" in k))
    ref = report.get("reference", {})
    head = ["method", "steps", "NFE", *bases, "speedup", "train s", "peak MB"]
    lines = [f"# {report.get('domain', '')}: methods compared", "",
             f"Same teacher, {report.get('budget_images', '?')} training images and seed {report['seed']} each; "
             f"{report['cases']} cases x {report['members']} members. Teacher: {report['teacher']['sampler']}."
             + (f" Per-variable scores are {' / '.join(variables)}." if variables else ""), "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def cells(r: dict) -> str:
        return " | ".join(" / ".join(_fmt(r.get(f"{b}:{v}")) for v in variables if f"{b}:{v}" in r) or _fmt(r.get(b))
                          for b in bases)

    for who, r in (("teacher", report["teacher"]), ("reference", ref)):
        if r:
            lines.append(f"| {who} | | {_fmt(r.get('nfe'))} | {cells(r)} | | | |")
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {cells(r)} | {_fmt(r['speedup'])} "
                     f"| {_fmt(r['train_seconds'])} | {_fmt(r['peak_memory_mb'])} |")
    plot = _plot_methods(rows, variables, run_dir)
    lines += ["", f"![{plot.name}]({plot.name})" if plot else "", ""]
    md = run_dir / "compare.md"
    md.write_text("\n".join(lines))
    return md


def _plot_methods(rows: list[dict], variables: list[str], run_dir: Path) -> Path | None:
    """Bars of the CRPS gap to the teacher and the SSR per student, when the domain reports them."""
    panels = [(b, lab) for b, lab in (("crps_rel_gap", "fair CRPS gap to teacher"), ("ssr", "spread-skill ratio"))
              if any(k.startswith(b) for r in rows for k in r)]
    if not rows or not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    names = [f"{r['method']}@{r['steps']}" for r in rows]
    for ax, (base, label) in zip(axes[0], panels):
        keys = [f"{base}:{v}" for v in variables] or [base]
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            ax.bar([i + j * width for i in range(len(rows))], [r.get(k, float("nan")) for r in rows], width,
                   label=k.split(":")[-1])
        ax.axhline(1.0 if base == "ssr" else 0.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], names, rotation=45, ha="right")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(run_dir: Path) -> Path | None:
    """Loss curves from metrics.csv, one line per player (log scale); None when there is no log."""
    rows = read_metrics(run_dir)
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("loss/")]
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["iteration"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), lw=0.8, label=k.split("/")[1])
    ax.set(xlabel="iteration", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "training_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _describe(sampler: SamplerSpec) -> str:
    if sampler.name in STEP_LISTS:
        return f"{sampler.name}, {sampler.nfe} step(s), intermediate sigmas {list(sampler.sigmas)}"
    return f"{sampler.name} {sampler.steps} steps rho {sampler.rho}" + (f" churn {sampler.S_churn}" if sampler.S_churn else "")


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
