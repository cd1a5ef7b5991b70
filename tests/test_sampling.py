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
    out, trajectory = jax.jit(
        lambda u, key: sampling.sample(lambda x, k: jnp.zeros_like(x), u, K, 0.0, key)
    )(u, jax.random.key(0))
    np.testing.assert_array_equal(out, u)
    assert trajectory.shape == (0,) + u.shape


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

    def f(u, k):
        return -0.1 * u

    a, _ = sampling.sample(f, u_K, K, 0.1, jax.random.key(4))
    b, _ = sampling.sample(f, u_K, K, 0.1, jax.random.key(4))
    c, _ = sampling.sample(f, u_K, K, 0.1, jax.random.key(5))
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
        sampling.sample(
            lambda u, k: u, np.zeros((1, 2, 2, 1)), K, 0.0, jax.random.key(0), trajectory_steps=(7,)
        )


def _linear_f(u, k):
    return -0.05 * u + 0.01 * k[:, None, None, None]


def test_stop_runs_part_of_the_chain_and_composes():
    u_K = _images((2, 4, 4, 1), seed=7)
    noise = sampling.example_noise(jax.random.split(jax.random.key(7), 2), (4, 4, 1))
    full, _ = sampling.sample_with_noise(_linear_f, u_K, K, 0.1, noise)
    half, _ = sampling.sample_with_noise(_linear_f, u_K, K, 0.1, noise, stop=3)
    rest, _ = sampling.sample_with_noise(_linear_f, half, 3, 0.1, noise)
    np.testing.assert_allclose(rest, full, atol=1e-6)


def test_same_init_and_share_noise():
    u_K = _images((1, 4, 4, 1), seed=8)
    same_init, _ = sampling.sample(_linear_f, np.repeat(u_K, 3, axis=0), K, 0.1, jax.random.key(8))
    assert not np.allclose(same_init[0], same_init[1])  # one u_K, different noise sequences
    u_Ks = np.concatenate([u_K, u_K, _images((1, 4, 4, 1), seed=9)])
    shared = sampling.example_noise(jnp.stack([jax.random.key(9)] * 3), (4, 4, 1))
    out, _ = sampling.sample_with_noise(_linear_f, u_Ks, K, 0.1, shared)
    np.testing.assert_array_equal(out[0], out[1])  # same u_K and same noise: identical
    assert not np.allclose(out[0], out[2])


def test_slerp_keeps_norm_and_hits_endpoints():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
    b = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    w = jnp.linspace(0, 1, 9).reshape(-1, 1, 1, 1)
    path = np.asarray(sampling.slerp(jnp.asarray(a), jnp.asarray(b), w))
    norms = np.linalg.norm(path.reshape(9, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(a), rtol=1e-5)
    np.testing.assert_allclose(path[0], a[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], b[0], atol=1e-5)

    # The midpoint lies on the great circle: equal angles to both endpoints.
    def cos(x, y):
        return np.sum(x * y) / np.linalg.norm(x) / np.linalg.norm(y)

    np.testing.assert_allclose(cos(path[4], a[0]), cos(path[4], b[0]), atol=1e-5)


def test_interpolation_endpoints_are_the_two_samples():
    u_a, u_b = _images((4, 4, 1), seed=11), _images((4, 4, 1), seed=12)
    ka, kb = jax.random.key(11), jax.random.key(12)
    frames = sampling.interpolate(_alg2(K), jnp.asarray(u_a), jnp.asarray(u_b), ka, kb, 5)
    assert frames.shape == (5, 4, 4, 1)
    for frame, u, key in ((frames[0], u_a, ka), (frames[-1], u_b, kb)):
        alone, _ = sampling.sample_with_noise(
            _linear_f, u[None], K, 0.1, sampling.example_noise(key[None], u.shape)
        )
        np.testing.assert_allclose(frame, alone[0], atol=1e-5)
    # The start states linearly: the middle frame starts halfway between them.
    middle, _ = sampling.sample_with_noise(
        _linear_f,
        (u_a[None] + u_b[None]) / 2,
        K,
        0.1,
        lambda k: sampling.slerp(
            sampling.example_noise(ka[None], u_a.shape)(k),
            sampling.example_noise(kb[None], u_a.shape)(k),
            0.5,
        ),
    )
    np.testing.assert_allclose(frames[2], middle[0], atol=1e-5)


def _alg2(start):
    """Alg. 2 of _linear_f at δ = 0.1 as a sampler's chain, (u, noise) -> (u_0, trajectory)."""
    return lambda u, noise: sampling.sample_with_noise(_linear_f, u, start, 0.1, noise)


def _segment(u, noise, start, stop):
    return sampling.sample_with_noise(_linear_f, u, start, 0.1, noise, stop=stop)[0]


def test_hierarchical_branches_continue_from_their_parent():
    u_K = jnp.asarray(_images((4, 4, 1), seed=13))
    key = jax.random.key(13)
    states = sampling.hierarchical(_segment, u_K, K, key, splits=(4, 2), branches=2)
    assert [s.shape[0] for s in states] == [1, 2, 4]
    # The parent's state at the first split is the unbranched chain stopped there.
    parent, _ = sampling.sample_with_noise(
        _linear_f, u_K[None], K, 0.1, sampling.example_noise(key[None], (4, 4, 1)), stop=4
    )
    np.testing.assert_allclose(states[0], parent, atol=1e-6)
    # Every branch starts from its parent's state: children of one parent differ only after it.
    child_keys = jnp.stack([jax.random.fold_in(key, i) for i in range(2)])
    children, _ = sampling.sample_with_noise(
        _linear_f,
        jnp.repeat(parent, 2, axis=0),
        4,
        0.1,
        sampling.example_noise(child_keys, (4, 4, 1)),
        stop=2,
    )
    np.testing.assert_allclose(states[1], children, atol=1e-6)
    assert not np.allclose(states[2][0], states[2][1])
    with pytest.raises(ValueError, match='descending'):
        sampling.hierarchical(_segment, u_K, K, key, splits=(2, 4), branches=2)
