"""CorrDiff pack throughput as JSON: ensemble members per second (student 1 step vs teacher 18-step
Heun, same batching, same run), ECT distillation steps per second, and peak memory.

    python benchmarks/corrdiff_throughput.py [--members 16] [--iterations 20] [--device auto]

Defaults use the embedded benchmark data and the shipped default teacher; pass Hydra-style
--teacher-regression/--teacher-residual to time your own .mdlus files on the same data.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fastgen_sci.domains.corrdiff import CorrDiffPack
from fastgen_sci.evaluate import timed_ensemble
from fastgen_sci.methods.ect import ECT
from fastgen_sci.registry import frozen
from fastgen_sci.samplers import SamplerSpec
from fastgen_sci.train import Trainer, peak_memory, reset_peak_memory, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--train-batch-size", type=int, default=32)
    ap.add_argument("--teacher-regression", default=None)
    ap.add_argument("--teacher-residual", default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    pack = CorrDiffPack(data={"path": None, "n_times": 2032, "eval_times": 32, "seed": 0,
                              "benchmark": {"N": 32, "b": 4, "terrain": "alps"}},
                        teacher={"regression": args.teacher_regression, "residual": args.teacher_residual})
    teacher = frozen(pack.teacher()).to(device)
    student = frozen(pack.student(teacher))
    cases = pack.eval_cases()
    rates = {}
    for name, model, sampler in (("teacher", teacher, SamplerSpec("heun", steps=18)),
                                 ("student", student, SamplerSpec("few_step"))):
        reset_peak_memory(device)
        _, sec = timed_ensemble(model, sampler, cases, args.members, seed=0, batch_size=args.batch_size,
                                device=device, desc=name)
        rates[name] = {"nfe": sampler.nfe, "members_per_second": 1 / sec, "peak_memory_mib": peak_memory(device) / 2**20}
    players = ECT(variant="cd", solver="heun", sigma_max=800.0).players(student=pack.student(teacher), teacher=teacher)
    trainer = Trainer(iterations=args.iterations, batch_size=args.train_batch_size, device=str(device),
                      progress_bar=False, tensorboard=False)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = trainer.fit(players, pack.dataset(), run_dir)
    print(json.dumps({
        "benchmark": "corrdiff_throughput", "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "grid": list(pack.data.grid), "cases": cases.n, "members": args.members, "batch_size": args.batch_size,
        "sampling": rates,
        "speedup_members_per_second": rates["student"]["members_per_second"] / rates["teacher"]["members_per_second"],
        "distill": {"method": "ect-cd (heun step, as the main job)", "batch_size": args.train_batch_size, "iterations": args.iterations,
                    "iterations_per_second": summary["iterations_per_second"],
                    "peak_memory_mib": summary["peak_memory_bytes"] / 2**20, "peak_memory_of": summary["peak_memory_of"]},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2))


if __name__ == "__main__":
    main()
