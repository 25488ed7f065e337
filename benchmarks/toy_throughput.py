"""Toy pack throughput: ECT training steps per second and ensemble sampling rates, as JSON.

    python benchmarks/toy_throughput.py [--iterations 300] [--members 20000] [--device cpu]

Student (1-step MLP) and teacher (exact mixture denoiser, 18-step Heun) are timed in the same run with
the same batching, so their ratio is meaningful on a noisy machine; absolute numbers are not.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fastgen_sci.domains.toy import ToyPack
from fastgen_sci.evaluate import timed_ensemble
from fastgen_sci.methods.ect import ECT
from fastgen_sci.samplers import SamplerSpec
from fastgen_sci.train import Trainer, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--members", type=int, default=20000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)

    pack = ToyPack()
    teacher = pack.teacher().to(device)
    players = ECT(variant="cd", P_mean=0.5, c=1.0).players(student=pack.student(teacher), teacher=teacher)
    trainer = Trainer(iterations=args.iterations, batch_size=args.batch_size, device=str(device),
                      progress_bar=False, tensorboard=False)
    with tempfile.TemporaryDirectory() as run_dir:
        summary = trainer.fit(players, pack.dataset(), run_dir)
    student = trainer.averaged(players[0]).eval()

    cases, rates = pack.eval_cases(), {}
    for name, model, sampler in (("teacher", teacher, SamplerSpec("heun", steps=18)),
                                 ("student", student, SamplerSpec("few_step"))):
        _, sec = timed_ensemble(model, sampler, cases, args.members, seed=0, batch_size=4096, device=device,
                                desc=name)
        rates[name] = {"nfe": sampler.nfe, "members_per_second": 1 / sec}
    print(json.dumps({
        "benchmark": "toy_throughput", "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "train": {"method": "ect-cd", "batch_size": args.batch_size, "iterations": args.iterations,
                  "iterations_per_second": summary["iterations_per_second"],
                  "images_per_second": summary["images_per_second"]},
        "sampling": rates,
        "student_over_teacher_members_per_second": rates["student"]["members_per_second"] / rates["teacher"]["members_per_second"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2))


if __name__ == "__main__":
    main()
