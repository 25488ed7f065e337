"""Cost of the time-derivative methods against a plain training step of the same network, as JSON.

    python benchmarks/jvp_cost.py [--domain corrdiff] [--batch-size 16] [--repeats 10] [--device auto]

One training step (loss forward + backward, no optimizer) of each method on the same batch and the same
student network, timed round-robin in one run so the ratios hold on a noisy machine: `sft` (denoising
score matching: one forward + backward, the baseline), `sct`/`scd` and `meanflow` (cd: the teacher's
velocity; ct: eps - x) with the exact forward-mode JVP and with the finite difference, and `ect` (two
forwards, one backward) for reference. The consistency-training steps (sct, meanflow ct) are the JVP path
alone: forward + JVP + backward; the distillation steps (scd, meanflow cd) add one teacher forward.
`jvp alone` times MeanFlow's exact time derivative by itself, `teacher forward` one no-grad teacher call.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from fastgen_sci.cli import build_method, build_pack
from fastgen_sci.registry import frozen
from fastgen_sci.rng import StepRNG
from fastgen_sci.train import Progress, _fetch, resolve_device

CASES = [("sft", {}), ("ect", {}), ("sct", {"method.jvp": "exact"}), ("scd", {"method.jvp": "exact"}),
         ("scd", {"method.jvp": "fd"}), ("meanflow", {"method.jvp": "exact", "method.variant": "ct"}),
         ("meanflow", {"method.jvp": "exact"}), ("meanflow", {"method.jvp": "fd"})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="corrdiff")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = ["data.n_times=2032"] if args.domain == "corrdiff" else []
    steps = {}
    with initialize_config_module("fastgen_sci.configs", version_base="1.3"):
        base = compose("config", overrides=[f"domain={args.domain}", *data])
        pack = build_pack(base)
        teacher = frozen(pack.teacher()).to(device)
        x, cond = _fetch(pack.dataset(), list(range(args.batch_size)), device)  # the trainer's own batching
        for name, over in CASES:
            cfg = compose("config", overrides=[f"domain={args.domain}", *data, f"method={name}",
                                               *(f"{k}={v}" for k, v in over.items())])
            player = build_method(cfg).players(student=pack.student(teacher), teacher=teacher)[0]
            label = name + (f" ({', '.join(over.values())})" if over else "")
            steps[label] = _step(player.module.to(device).train(), player.loss, x, cond, device)
        steps["jvp alone"] = _jvp_alone(player.module, x, cond)  # the last case's MeanFlow student
        steps["teacher forward"] = lambda r: teacher(x, torch.full((x.shape[0],), 1.0, device=device), cond)
    seconds = {k: [] for k in steps}
    for r in range(args.repeats + 1):  # round-robin; the first round warms up
        for k, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step(r)
            _sync(device)
            if r:
                seconds[k].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({
        "benchmark": "jvp_cost", "domain": args.domain, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "batch_size": args.batch_size,
        "repeats": args.repeats, "seconds_per_step": median,
        "ratio_to_plain_forward_backward": {k: v / median["sft"] for k, v in median.items()},
    }, indent=2))


def _step(module, loss_fn, x, cond, device):
    def step(r: int) -> None:
        rng = StepRNG(0, r, 0, device=device)
        loss_fn(module, x, cond, rng, Progress(iteration=10**6, images_seen=10**9)).mean().backward()
        module.zero_grad(set_to_none=True)
    return step


def _jvp_alone(module, x, cond):
    """MeanFlow's exact du/dt along (v, 1, 0) at t = 0.9, r = 0.3 (no grad), as in its loss."""
    from fastgen_sci.methods.meanflow import time_derivative
    t = torch.full((x.shape[0],), 0.9, dtype=torch.float64, device=x.device)
    z, v = torch.randn_like(x).double(), torch.randn_like(x).double()
    return lambda r: time_derivative(module, z, t, t / 3, v, cond, mode="exact", step=1e-3, t_max=0.999, seed=r,
                                     dtype=x.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
