"""CorrDiff weather-downscaling pack (see README.md)."""
from .pack import CorrDiffPack

__all__ = ["CorrDiffPack"]
