import math

import torch

# Per storage dtype: (atol, rtol) against a float64 reference of the same inputs.
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3)}


def assert_close(actual, expected, dtype=torch.float32, scale=1.0):
    atol, rtol = TOL[dtype]
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), "non-finite values"
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / max(b.norm().item(), 1e-12)).item()


def finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None and not math.isnan(0))
