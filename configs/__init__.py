"""Hydra configs of fastgen-sci (installed as the package fastgen_sci.configs)."""
