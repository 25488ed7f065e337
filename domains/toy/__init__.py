"""Toy pack: Gaussian mixtures with an exact denoiser (see README.md)."""
from .pack import ToyPack

__all__ = ["ToyPack"]
