"""fastgen-sci: distil many-step diffusion models into one- or few-step generators, and show with skill
and spread scores what was kept."""
from .denoiser import Denoiser, EDMPrecond, FeatureTaps, FlowMap, FunctionDenoiser
from .ensemble import sample_ensemble
from .registry import DomainPack, EvalCases
from .samplers import SamplerSpec, euler, few_step, heun
from .train import Player, Trainer

__all__ = ["Denoiser", "EDMPrecond", "FeatureTaps", "FlowMap", "FunctionDenoiser", "sample_ensemble", "DomainPack",
           "EvalCases", "SamplerSpec", "euler", "few_step", "heun", "Player", "Trainer"]
__version__ = "0.1.0"
