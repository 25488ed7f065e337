"""Weather pack: CorrDiff-style km-scale downscaling."""
