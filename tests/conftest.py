import pytest
import torch


def rand_qkv(tq, tk, hq, hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def max_err(a, b):
    """Max abs difference treating matching infinities (lse of empty rows) as equal."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    if (torch.isinf(a) ^ torch.isinf(b)).any():
        return float("inf")
    return (a - b).masked_fill(both_inf, 0).abs().max().item() if a.numel() else 0.0


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
