"""Shared fixtures: small deterministic problems with closed-form answers."""
import os
import socket

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # tiny ops: one thread is fastest and immune to oversubscription


class GaussianDenoiser(torch.nn.Module):
    """Exact EDM denoiser of x0 ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, s: float = 0.7, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.s, self.sigma_data, self.sigma_min, self.sigma_max = s, s, sigma_min, sigma_max

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.s**2 / (self.s**2 + sigma**2) * x


@pytest.fixture
def gaussian_denoiser():
    return GaussianDenoiser()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Generated default data goes to a per-session cache, not the user's ~/.cache."""
    os.environ["FASTGEN_SCI_CACHE"] = str(tmp_path_factory.mktemp("fastgen_cache"))


@pytest.fixture
def free_port() -> int:
    """A TCP port free on localhost, for torch.distributed tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
