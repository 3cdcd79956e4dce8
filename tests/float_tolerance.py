"""How close a tensor finebench computes must be to a golden tensor written on another machine.

A golden file is written once, on one CPU; the tests run on whatever x86 CPU CI draws (AVX2,
AVX-512, AMX), where oneDNN, MKL and ATen's vectorised reductions block and order their sums
differently. In float64 the result still agrees to ~1e-12 and the comparison stays strict. In
float32 the only bound that holds for every summation order is the worst-case one (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5): a sum of ``n`` products
computed in any order is off by at most ``gamma(n) = n*u / (1 - n*u)`` times the sum of their
magnitudes, ``u = 2**-24``. Through a chain of layers the first-order errors add, so ``n`` is the
total length of the accumulations on the longest path from the inputs to the compared tensor.
Both the golden run and ours round, hence the factor 2; the tensor's largest magnitude stands in
for the sum of magnitudes. A wrong formula, index or draw moves a value by far more than this.
"""

from __future__ import annotations

import torch

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
STRICT_FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
"""float64 agrees to within a few ulps of the values these tests compare, on every CPU."""


def gamma(terms: int) -> float:
    """Higham's gamma_n for float32: the relative bound of an ``terms``-long sum in any order."""
    product = terms * FLOAT32_UNIT_ROUNDOFF
    assert product < 1, terms
    return product / (1 - product)


def float32_atol(expected: torch.Tensor, terms: int) -> float:
    """Absolute tolerance for a float32 tensor behind ``terms`` accumulated products (module doc)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return 2 * gamma(terms) * scale


def assert_agrees(actual: torch.Tensor, expected: torch.Tensor, terms: int, msg: str | None = None) -> None:
    """float64: strict; float32: within the worst-case rounding of a ``terms``-long accumulation chain."""
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, **STRICT_FLOAT64, msg=msg)
    else:
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=float32_atol(expected, terms), msg=msg)
