"""Elementwise float32 math for the kernels, accurate on the GPU as well as under the interpreter.

On NVIDIA GPUs ``tl.exp`` is ``ex2.approx.ftz.f32(x * log2e)`` (within 2 ulp, plus the
rounding of ``x * log2e``: ``|x| 2^-24`` in the exponent) and float32 ``/`` is
``div.full.f32`` (within 2 ulp). Functions here use only FMAs, multiplies, adds and
``tl.math.div_rn`` (IEEE division), so they give the same accuracy on a card as under the
interpreter; ``tests/gpu_arith.py`` checks them with the GPU's arithmetic emulated.
"""

import triton
import triton.language as tl


@triton.jit
def _exp_reduced(y):
    """exp(y) for 0 <= y <= 20 within 1 ulp, without ex2.approx.

    Cody-Waite: y = k ln2 + r with |r| <= ln2 / 2 (ln2 split so k * LN2_HI is exact for
    k < 2^9), exp(r) by its degree-7 Taylor polynomial (truncation error < 2^-26 there),
    2^k built from its exponent bits.
    """
    k = tl.floor(tl.fma(y, 1.4426950408889634, 0.5))
    r = tl.fma(k, -0.693145751953125, y)
    r = tl.fma(k, -1.428606765330187e-06, r)
    p = tl.fma(r, 1.0 / 5040.0, 1.0 / 720.0)
    p = tl.fma(p, r, 1.0 / 120.0)
    p = tl.fma(p, r, 1.0 / 24.0)
    p = tl.fma(p, r, 1.0 / 6.0)
    p = tl.fma(p, r, 0.5)
    p = tl.fma(p, r, 1.0)
    p = tl.fma(p, r, 1.0)
    two_k = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return p * two_k


@triton.jit
def tanh_and_sech2(x):
    """(tanh(x), 1 - tanh(x)^2) in float32, within 1.4 ulp of tanh over the whole range.

    Replaces ``2 sigmoid(2x) - 1``, whose absolute error of ~2^-24 (more with ex2.approx and
    div.full) became ``softcap x 2^-24`` on every capped logit: 7-14x the error of naive
    float32 at softcap 30. Here:

    - ``|x| < 0.625``: ``x + x^3 P(x^2)``, the odd minimax polynomial of Cephes' tanhf
      (relative error ~1 ulp; no cancellation);
    - ``|x| >= 0.625``: ``1 - q`` with ``q = 2 / (exp(2|x|) + 1)``, ``exp`` from
      :func:`_exp_reduced` and an IEEE division; ``q <= 0.45`` there, so its relative error
      adds at most ~1 ulp of tanh. ``2|x|`` is capped at 20 (tanh(10) rounds to 1); past it the
      derivative is ``4 exp(-2|x|)`` (relative error 2^-28 from the dropped factor).

    ``1 - tanh^2`` is ``q (2 - q)`` on the large branch: no cancellation as tanh -> 1, so
    the softcap's derivative stays relatively accurate in the saturated tail.
    """
    a = tl.abs(x)
    z = a * a
    p = tl.fma(z, -5.70498872745e-3, 2.06390887954e-2)
    p = tl.fma(p, z, -5.37397155531e-2)
    p = tl.fma(p, z, 1.33314422036e-1)
    p = tl.fma(p, z, -3.33332819422e-1)
    small = tl.fma(p * z, a, a)
    e = _exp_reduced(tl.minimum(2.0 * a, 20.0))
    # div_rn wants a tensor dividend of e's shape (a block, or a scalar in the row kernels); e is finite.
    q = tl.math.div_rn(e * 0.0 + 2.0, e + 1.0)
    is_small = a < 0.625
    t = tl.where(is_small, small, 1.0 - q)
    # Past the cap q stops shrinking, but 1 - tanh^2 = 4 e^{-2|x|} (1 + e^{-2|x|})^-2 keeps falling (to 0 past
    # |x| ~ 52): its tail from exp itself, whose 2 ulp are relative there (a capped 1e30 logit gets 0, not 8e-9).
    sech2 = tl.where(is_small, 1.0 - small * small, tl.where(a > 10.0, 4.0 * tl.exp(-2.0 * a), q * (2.0 - q)))
    t = tl.where(x < 0, -t, t)
    t = tl.where(x != x, x, t)  # NaN in, NaN out
    return t, sech2


@triton.jit
def one_minus_exp(log_p, p):
    """``1 - p`` for ``p = exp(log_p)``, ``log_p <= 0``, accurate as ``p -> 1``.

    The gradient of a confident token's log-prob is ``g (1 - p)``: from ``p`` itself, the
    GPU's exp (ex2.approx, 2 ulp) puts 2 ulp of 1 into a small difference (4x the error of
    float32 ``log_softmax`` at p = 0.998). For ``log_p > -0.5`` this is ``-expm1(log_p)`` by
    its Taylor series to degree 9 (relative truncation error < 1e-9), with FMAs; below, where
    ``1 - p >= 0.39``, ``1 - p`` loses nothing.
    """
    x = tl.maximum(log_p, -0.5)  # keeps -inf (p = 0) out of the polynomial, which is not selected there
    q = tl.fma(x, 1.0 / 362880.0, 1.0 / 40320.0)
    q = tl.fma(q, x, 1.0 / 5040.0)
    q = tl.fma(q, x, 1.0 / 720.0)
    q = tl.fma(q, x, 1.0 / 120.0)
    q = tl.fma(q, x, 1.0 / 24.0)
    q = tl.fma(q, x, 1.0 / 6.0)
    q = tl.fma(q, x, 0.5)
    q = tl.fma(q, x, 1.0)
    return tl.where(log_p > -0.5, -(x * q), 1.0 - p)
