"""Shared fixtures: small deterministic problems with closed-form answers."""
import math
import os
import socket

import pytest
import torch
from torch import nn

from fastgen_sci.denoiser import expand_sigma

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


class GaussianGenerator(nn.Module):
    """One-step student whose samples are N(mu, a^2 I): G(sigma_max eps) = mu + a eps."""

    def __init__(self, mu: float, a: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.log_a = nn.Parameter(torch.tensor(math.log(a), dtype=torch.float64))
        self.sigma_data, self.sigma_min, self.sigma_max = 0.8, 0.002, 80.0  # sigma_data: test_dmd2's data

    def forward(self, x, sigma, cond=None):
        return self.mu + self.log_a.exp() * x / expand_sigma(sigma, x)


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
