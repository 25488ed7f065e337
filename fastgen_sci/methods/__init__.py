"""Distillation and training methods: one file each, a frozen dataclass plus pure loss functions."""
