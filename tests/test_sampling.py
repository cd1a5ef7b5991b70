"""Alg. 2 and the KDE prior draw against explicit numpy loops and analytic identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ihdm_jax import heat
from ihdm_jax import sampling

K = 6


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_zero_residual_and_zero_noise_return_the_input():
    u = _images((3, 8, 8, 2))
    out = jax.jit(lambda u, key: sampling.sample(lambda x, k: jnp.zeros_like(x), u, K, 0.0, key))(
        u, jax.random.key(0))
    np.testing.assert_array_equal(out, u)


def test_linear_residual_matches_numpy_chain_with_recorded_trajectory():
    c, delta = 0.1, 0.05
    u_K = _images((2, 4, 6, 1), seed=1)
    levels_seen = []

    def f(u, k):
        levels_seen.append(k)
        return -c * u * k[:, None, None, None] / K

    keys = jax.random.split(jax.random.key(1), 2)
    noise = sampling.example_noise(keys, u_K.shape[1:])
    steps = (K, 3, 1, 0)
    out, traj = jax.jit(lambda u: sampling.sample_with_noise(f, u, K, delta, noise, steps))(u_K)

    u = u_K.astype(np.float64)
    expected_traj = {K: u}
    for k in range(K, 0, -1):  # Alg. 2, with no noise on the last step
        u = u - c * u * k / K + (delta * np.asarray(noise(k)) if k > 1 else 0.0)
        expected_traj[k - 1] = u
    np.testing.assert_allclose(out, u, atol=1e-6)
    np.testing.assert_allclose(traj, np.stack([expected_traj[s] for s in steps]), atol=1e-6)
    assert levels_seen[0].dtype == jnp.int32 and levels_seen[0].shape == (2,)


def test_noise_is_per_example_and_shared_by_equal_keys():
    shape = (4, 4, 1)
    keys = jax.random.split(jax.random.key(2), 3)
    full = sampling.example_noise(keys, shape)(5)
    part = sampling.example_noise(keys[1:], shape)(5)
    np.testing.assert_array_equal(full[1:], part)  # independent of the batch it is in
    shared = sampling.example_noise(jnp.stack([keys[0]] * 3), shape)(5)
    np.testing.assert_array_equal(shared, jnp.broadcast_to(full[:1], shared.shape))
    assert not np.allclose(full[0], full[1])
    assert not np.allclose(full[0], sampling.example_noise(keys, shape)(4)[0])


def test_sample_is_reproducible_and_keyed():
    u_K = _images((2, 4, 4, 1), seed=3)
    f = lambda u, k: -0.1 * u
    a = sampling.sample(f, u_K, K, 0.1, jax.random.key(4))
    b = sampling.sample(f, u_K, K, 0.1, jax.random.key(4))
    c = sampling.sample(f, u_K, K, 0.1, jax.random.key(5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_prior_sample_is_blurred_data_plus_delta_noise():
    x = _images((64, 8, 8, 3), seed=5)
    t_K, delta = 8.0, 0.02
    draw = sampling.prior_sample(jax.random.key(6), x, t_K, delta)
    residual = (np.asarray(draw) - np.asarray(heat.heat_forward(x, t_K))) / delta
    assert abs(residual.mean()) < 0.02
    np.testing.assert_allclose(residual.std(), 1.0, rtol=0.02)


def test_trajectory_steps_out_of_range_are_refused():
    with pytest.raises(ValueError, match='0..6'):
        sampling.sample(lambda u, k: u, np.zeros((1, 2, 2, 1)), K, 0.0, jax.random.key(0),
                        trajectory_steps=(7,))
