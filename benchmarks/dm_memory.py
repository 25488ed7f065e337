"""Distribution-matching players on CorrDiff as JSON: peak memory and step rate per player configuration,
with each player's parameters, gradients and optimizer state, and a check that the teacher holds none.

    python benchmarks/dm_memory.py [--iterations 10] [--batch-size 32] [--device auto]

Each configuration runs in its own process, so one configuration's peak does not hide another's.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = {  # name -> (method, overrides)
    "dmd2_vsd_only": ("dmd2", {"gan_weight": 0.0}),
    "dmd2_vsd_gan": ("dmd2", {"gan_weight": 1e-3}),
    "f_distill": ("f_distill", {"gan_weight": 1e-3}),
    "ladd": ("ladd", {}),
}
FEATURES = ("net.model.dec.8x8_in1",)  # the SongUNet bottleneck


def run_one(name: str, iterations: int, batch_size: int, device: str) -> dict:
    from fastgen_sci.domains.corrdiff import CorrDiffPack
    from fastgen_sci.registry import frozen, load_method
    from fastgen_sci.train import Trainer, resolve_device
    dev = resolve_device(device)
    pack = CorrDiffPack(data={"path": None, "n_times": 2032, "eval_times": 32, "seed": 0,
                              "benchmark": {"N": 32, "b": 4, "terrain": "alps"}}, teacher={})
    teacher = frozen(pack.teacher()).to(dev)
    method, kw = CONFIGS[name]
    hp = load_method(method)(features=FEATURES, **kw)
    players = hp.players(student=pack.student(teacher), teacher=teacher)
    trainer = Trainer(iterations=iterations, batch_size=batch_size, device=str(dev), progress_bar=False,
                      tensorboard=False)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = trainer.fit(players, pack.dataset(), run_dir)
        state = torch.load(f"{run_dir}/checkpoints/iter-{iterations:08d}/state.pt", weights_only=True)
    return {
        "method": method, **kw, "iterations_per_second": summary["iterations_per_second"],
        "peak_memory_mib": summary["peak_memory_bytes"] / 2**20, "peak_memory_of": summary["peak_memory_of"],
        "players": {p.name: {"every": p.every, "parameters": sum(q.numel() for q in p.module.parameters()),
                             "optimizer_tensors": sum(len(s) for s in state["optimizers"][p.name]["state"].values())}
                    for p in players},
        "teacher": {"parameters": sum(q.numel() for q in teacher.parameters()),
                    "with_grad": sum(q.grad is not None for q in teacher.parameters()),
                    "requires_grad": sum(q.requires_grad for q in teacher.parameters())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # one configuration, this process
    args = ap.parse_args()
    common = ["--iterations", str(args.iterations), "--batch-size", str(args.batch_size), "--device", args.device]
    if args.only:
        print(json.dumps(run_one(args.only, args.iterations, args.batch_size, args.device)))
        return
    results = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--only", name, *common], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "dm_memory", "torch": torch.__version__, "machine": platform.machine(),
                      "iterations": args.iterations, "batch_size": args.batch_size, "features": list(FEATURES),
                      "configs": results, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
