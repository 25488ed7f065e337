"""Quickstart: wrap a model that predicts noise (eps) as a Denoiser, distil it with ECT into a one-step
student, and sample an ensemble. Runs on a laptop CPU in about a minute.

    python examples/quickstart.py
"""
import tempfile

import torch
from torch import nn

from fastgen_sci import SamplerSpec, Trainer, sample_ensemble
from fastgen_sci.adapters import EpsilonPrediction, vp_t_to_sigma
from fastgen_sci.domains.toy import ToyPack
from fastgen_sci.domains.toy.networks import build_network, mixture_denoiser
from fastgen_sci.methods.ect import ECT
from fastgen_sci.registry import EvalCases, frozen

pack = ToyPack()  # a 2-D mixture of 8 Gaussians; its exact samples are the ground truth here
mixture = pack.mixture


class MyEpsModel(nn.Module):
    """Stands in for your trained model: eps_hat(x_t, t) on VP time t in [0, 1] (Song et al. 2021).

    Here it is exact (derived from the mixture), so the distillation target is known.
    """

    def forward(self, x_t, t, cond=None):
        sigma = vp_t_to_sigma()(t)[:, None]  # EDM sigma of VP time t
        x = x_t * (1 + sigma**2).sqrt()  # EDM variables: x = x0 + sigma eps
        return (x - mixture_denoiser(mixture, x, sigma.flatten())) / sigma


# 1. Foreign conventions become Denoisers at the boundary: D(x, sigma, cond) -> x0_hat, EDM's sigma.
teacher = frozen(EpsilonPrediction(MyEpsModel(), sigma_data=mixture.sigma_data, sigma_max=80.0))
# The student is any trainable Denoiser; EDM preconditioning suits one-step maps (eps-prediction would
# multiply its errors by sigma_max at the first step).
student = build_network(dim=2, sigma_data=mixture.sigma_data, hidden=256, depth=3)

# 2. Distil: ECT, consistency-distillation variant (one Euler step of the teacher's ODE per pair).
method = ECT(variant="cd", P_mean=0.5, c=1.0, images_per_stage=3000 * 256 // 8)
players = method.players(student=student, teacher=teacher)
trainer = Trainer(iterations=3000, batch_size=256, ema_halflife_images=50_000, progress_bar=False)
with tempfile.TemporaryDirectory() as run_dir:
    trainer.fit(players, pack.dataset(), run_dir)
student = frozen(trainer.averaged(players[0]))

# 3. Ensembles: member k is the same sample whatever the batch it was drawn in (per-member seeds).
cases = EvalCases(n=1, shape=(2,))
one_step = sample_ensemble(student, SamplerSpec("few_step"), cases, 4000, seed=0)
heun = sample_ensemble(teacher, SamplerSpec("heun", steps=18), cases, 4000, seed=0)
for name, samples in (("teacher, 18-step Heun", heun), ("student, 1 step", one_step)):
    print(f"{name:>22}: energy distance to exact samples {pack.score(samples, cases)['energy_distance']:.4f}")
print(f"{'exact (noise floor)':>22}: {pack.reference(cases, 4000)['energy_distance']:.4f}")
