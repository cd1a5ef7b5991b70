"""The ELBO estimator against its closed-form expectation for a linear residual, in float64
numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import scipy.special

from ihdm_jax import errors
from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax.evaluation import likelihood

K, SIGMA, DELTA = 4, 0.01, 0.0125


def _c(k):
    return 0.05 * k / K


def test_monte_carlo_elbo_matches_closed_form_expectation():
    rng = np.random.default_rng(0)
    u0 = rng.uniform(size=(8, 4, 4, 1))
    train = rng.uniform(size=(5, 4, 4, 1))
    t = np.asarray(heat.heat_times(K, 0.5, 3.0), np.float64)
    n = u0[0].size

    # E over ε of each level term, with μ(u, k) = (1 − c_k) u and u = a + σε:
    # E‖μ − b‖² = ‖(1 − c_k) a − b‖² + (1 − c_k)² σ² N.
    expected_levels = []
    for k in range(1, K + 1):
        a, b = numpy_reference.heat(u0, t[k]), numpy_reference.heat(u0, t[k - 1])
        sq = ((1 - _c(k)) * a - b) ** 2
        e_sq = sq.sum(axis=(1, 2, 3)) + (1 - _c(k)) ** 2 * SIGMA**2 * n
        if k == 1:
            term = e_sq / (2 * DELTA**2) + n * np.log(DELTA * np.sqrt(2 * np.pi))
        else:
            term = 0.5 * (
                n * SIGMA**2 / DELTA**2 - n + e_sq / DELTA**2 + 2 * n * np.log(DELTA / SIGMA)
            )
        expected_levels.append(term.mean())
    # L_K bound, Eq. (41) at the optimal φ, brute force.
    a_K, b_K = numpy_reference.heat(u0, t[K]), numpy_reference.heat(train, t[K])
    d2 = ((a_K[:, None] - b_K[None]) ** 2).sum(axis=(2, 3, 4))
    kl = 0.5 * (n * SIGMA**2 / DELTA**2 - n + d2 / DELTA**2 + 2 * n * np.log(DELTA / SIGMA))
    l_K = np.log(len(train)) - scipy.special.logsumexp(-kl, axis=1)
    expected_nats = l_K.mean() + sum(expected_levels)

    def f(u, k):
        return -_c(k)[:, None, None, None].astype(jnp.float32) * u

    t32 = jnp.asarray(t, jnp.float32)
    u32 = jnp.asarray(u0, jnp.float32)

    @jax.jit
    def passes(key):
        def body(carry, key):
            s, c = likelihood.level_pass(f, u32, key, t32, SIGMA, DELTA)
            return (carry[0] + s, carry[1] + c), None

        zeros = jnp.zeros(K + 1)
        return jax.lax.scan(body, (zeros, zeros), jax.random.split(key, 4000))[0]

    sums, counts = passes(jax.random.key(0))
    bound = objective.prior_kl_upper_bound(
        jnp.asarray(a_K, jnp.float32), jnp.asarray(b_K, jnp.float32), SIGMA, DELTA
    )
    result = likelihood.assemble(bound, sums, counts)
    np.testing.assert_allclose(result.level_nats, expected_levels, rtol=1e-2)
    np.testing.assert_allclose(result.nats, expected_nats, rtol=1e-2)
    np.testing.assert_allclose(result.L_K + result.sum_L_k + result.L_0, result.nats, rtol=1e-12)
    np.testing.assert_allclose(result.L_0, expected_levels[0], rtol=1e-2)
    np.testing.assert_allclose(result.L_K, l_K.mean(), rtol=1e-5)


def test_assemble_refuses_unsampled_levels():
    with pytest.raises(errors.UserError, match=r'Levels \[2\]'):
        likelihood.assemble(np.zeros(3), np.ones(4), np.array([0, 5, 0, 5]))


def test_dequantize_maps_each_byte_into_its_bin():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    u = np.asarray(likelihood.dequantize(jax.random.key(0), x))
    assert np.all(u >= x / 256) and np.all(u < (x.astype(np.float64) + 1) / 256)
