"""Test tolerances from the rounding error of the computation, never from one CPU's results.

A float32 sum of n terms, in any order, is within ``gamma(n) * sum|terms|`` of the exact sum
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 4.2), with
``gamma(n) = n u / (1 - n u)`` and the unit roundoff ``u = 2^-24``. Two implementations that sum
in different orders (another vector width, another blocking, another library) therefore agree
within twice that. Dot products, matrix products and convolutions are such sums, with one more
rounding per product (``gamma(n + 1)``). These bounds hold on every CPU; the differences seen on
one machine are usually far smaller, which is no reason to test against them.
"""

from __future__ import annotations

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: the relative error bound of n successive roundings."""
    return n * u / (1 - n * u)


def two_orders(n: int, abs_sum: float, u: float = U32) -> float:
    """Absolute tolerance for two evaluations of a sum (or dot product) of ``n`` terms whose
    absolute values add up to at most ``abs_sum``, in possibly different orders."""
    return 2 * gamma(n + 1, u) * abs_sum


def network(depth: int, fan_in: int, condition: float = 10.0, u: float = U32) -> float:
    """Relative tolerance for two evaluations of a network of ``depth`` layers, each output a
    sum of at most ``fan_in`` products plus a bias, in possibly different orders (a folded BN,
    another batch size, another library).

    Each layer adds at most ``2 gamma(fan_in + 1)`` times its sums' ``sum|terms|``; ``condition``
    bounds ``sum|terms| / |sum|`` relative to the output scale (the cancellation in a sum), 10 for
    the small networks of these tests whose weights are PyTorch's init, below 1/sqrt(fan_in).
    The layers' errors add up (the layers do not amplify them: |w| sqrt(fan_in) <= 1).
    """
    return depth * 2 * gamma(fan_in + 1, u) * condition
