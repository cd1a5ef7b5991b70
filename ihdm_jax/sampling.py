"""Sampling: the KDE prior of Sec. 3.2 and the reverse chain of Alg. 2.

`f` is the network residual f(u, k) with k an int32 array of shape (B,); μ(u, k) = u + f(u, k).
The functions are pure and trace under jax.jit; wrap them with the model's parameters closed over.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ihdm_jax import heat

NoiseFn = Callable[[jax.Array], jax.Array]


def prior_sample(key, x, t_K, delta, backend='matmul'):
    """A draw from the KDE prior p(u_K) = (1/N_T) Σ_i N(F(t_K) x_i, δ²I) of Sec. 3.2.

    Args:
      key: PRNG key for the δ noise.
      x: training images picked uniformly by the caller, (B, H, W, C).
      t_K: the heat time of the last level.
      delta: the sampling noise δ (the KDE bandwidth).
    """
    x = jnp.asarray(x, jnp.float32)
    return heat.heat_forward(x, t_K, backend) + delta * jax.random.normal(key, x.shape)


def example_noise(keys, example_shape) -> NoiseFn:
    """Unit Gaussian noise ε_k for example b drawn from fold_in(keys[b], k).

    Each example's noise sequence depends only on its own key, not on the batch it is in or how
    the batch is sharded. Giving several examples the same key gives them the same sequence.
    """
    def noise(k):
        return jax.vmap(lambda key: jax.random.normal(
            jax.random.fold_in(key, k), example_shape))(keys)
    return noise


def sample_with_noise(f, u_K, K: int, delta, noise: NoiseFn, trajectory_steps: Sequence[int] = (),
                      stop: int = 0):
    """Alg. 2 with the noise sequence given: for k = K..1, u ← μ(u, k) + δ ε_k.

    No noise is added at the last step (k = 1), so the result is the mean μ(u_1, 1) (App. B.1).

    Args:
      f: the network residual f(u, k).
      u_K: the state at level K: the prior draw, or a state partway down the chain.
      K: the level of u_K (the number of levels for a full chain).
      delta: the sampling noise δ.
      noise: ε_k = noise(k), unit Gaussian noise of u_K's shape, for a traced int32 k.
      trajectory_steps: levels k in stop..K at which to record the state u_k (K is the input,
        stop the output).
      stop: run the levels K..stop+1 only and return u_stop (0: the full chain).
    Returns:
      u_stop, or (u_stop, trajectory) with trajectory of shape (len(trajectory_steps),) + u_K.shape.
    """
    u_K = jnp.asarray(u_K, jnp.float32)
    steps = tuple(int(s) for s in trajectory_steps)
    if not 0 <= stop <= K:
        raise ValueError(f'stop must lie in 0..{K}, got {stop}.')
    if any(not stop <= s <= K for s in steps):
        raise ValueError(f'trajectory_steps must lie in {stop}..{K}, got {steps}.')
    slot_of_level = np.full(K + 1, len(steps), np.int32)  # len(steps) = not recorded
    slot_of_level[list(steps)] = np.arange(len(steps))
    slot_of_level = jnp.asarray(slot_of_level)

    def record(traj, u, k):
        # The extra last slot is a scratch slot for levels that are not recorded.
        return traj.at[slot_of_level[k]].set(u)

    def step(i, carry):
        u, traj = carry
        k = K - i
        if steps:
            traj = record(traj, u, k)
        mean = u + f(u, jnp.full((u.shape[0],), k, jnp.int32))
        return mean + jnp.where(k > 1, delta, 0.0) * noise(k), traj

    traj = jnp.zeros((len(steps) + 1,) + u_K.shape, jnp.float32) if steps else ()
    u, traj = jax.lax.fori_loop(0, K - stop, step, (u_K, traj))
    if not steps:
        return u
    return u, record(traj, u, stop)[:-1]


def sample(f, u_K, K: int, delta, key, trajectory_steps: Sequence[int] = ()):
    """Alg. 2 from the prior draw u_K, with each example's noise from its own key split off `key`."""
    keys = jax.random.split(key, u_K.shape[0])
    return sample_with_noise(f, u_K, K, delta, example_noise(keys, u_K.shape[1:]),
                             trajectory_steps)


def slerp(a, b, weight):
    """Spherical interpolation of each example's noise from a (weight 0) to b (weight 1).

    The direction moves along the great circle between a/‖a‖ and b/‖b‖ and the norm linearly
    from ‖a‖ to ‖b‖, so noise of equal norms keeps that norm all the way (App. D.2).
    """
    axes = tuple(range(1, a.ndim))
    norm_a = jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))
    norm_b = jnp.sqrt(jnp.sum(b * b, axis=axes, keepdims=True))
    cos = jnp.clip(jnp.sum(a * b, axis=axes, keepdims=True) / (norm_a * norm_b), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin_omega = jnp.sin(omega)
    parallel = sin_omega < 1e-6
    safe_sin = jnp.where(parallel, 1.0, sin_omega)
    wa = jnp.where(parallel, 1.0 - weight, jnp.sin((1.0 - weight) * omega) / safe_sin)
    wb = jnp.where(parallel, weight, jnp.sin(weight * omega) / safe_sin)
    direction = wa * a / norm_a + wb * b / norm_b
    direction = direction / jnp.sqrt(jnp.sum(direction * direction, axis=axes, keepdims=True))
    return direction * ((1.0 - weight) * norm_a + weight * norm_b)


def interpolate(f, u_K_a, u_K_b, key_a, key_b, K: int, delta, num_points: int):
    """Samples between two endpoints (App. D.2, Fig. 7b).

    The prior states are interpolated linearly and each step's noise spherically between the
    noise sequences of key_a and key_b.

    Args:
      u_K_a, u_K_b: the two prior states, shape (H, W, C).
      key_a, key_b: the keys of the two noise sequences.
      num_points: frames, endpoints included.
    Returns:
      (num_points, H, W, C): frame 0 is the sample from (u_K_a, key_a), the last from (u_K_b, key_b).
    """
    weight = jnp.linspace(0.0, 1.0, num_points).reshape(-1, 1, 1, 1)
    u_K = (1.0 - weight) * u_K_a[None] + weight * u_K_b[None]
    noise_a = example_noise(jnp.stack([key_a] * num_points), u_K_a.shape)
    noise_b = example_noise(jnp.stack([key_b] * num_points), u_K_a.shape)
    return sample_with_noise(f, u_K, K, delta, lambda k: slerp(noise_a(k), noise_b(k), weight))


def hierarchical(f, u_K, K: int, delta, key, splits: Sequence[int], branches: int):
    """A tree of samples from one prior state (Fig. 5b): every chain splits at the given levels.

    Chains run from level K; at each level in `splits` (descending) every chain is copied
    `branches` times and each copy continues with noise from its own key, fold_in(parent, i).

    Args:
      u_K: one prior state, shape (H, W, C).
      splits: levels in 1..K−1 at which the chains branch.
    Returns:
      A list: entry j holds all chains at level splits[j], before they split (shape
      (branches**j, H, W, C)); the last entry holds the final samples (branches**len(splits)).
    """
    splits = tuple(int(s) for s in splits)
    if list(splits) != sorted(set(splits), reverse=True) or any(not 0 < s < K for s in splits):
        raise ValueError(f'splits must be distinct levels in 1..{K - 1}, descending; got {splits}.')
    u, keys, level, states = u_K[None], key[None], K, []
    for stop in splits + (0,):
        u = sample_with_noise(f, u, level, delta, example_noise(keys, u_K.shape), stop=stop)
        states.append(u)
        if stop:
            u = jnp.repeat(u, branches, axis=0)
            keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(
                jnp.arange(branches)))(keys)
            keys = keys.reshape((-1,) + keys.shape[2:])
        level = stop
    return states
