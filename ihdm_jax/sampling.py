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


def prior_sample(key, x, t_K, delta, backend='fft'):
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


def sample_with_noise(f, u_K, K: int, delta, noise: NoiseFn, trajectory_steps: Sequence[int] = ()):
    """Alg. 2 with the noise sequence given: for k = K..1, u ← μ(u, k) + δ ε_k.

    No noise is added at the last step (k = 1), so the result is the mean μ(u_1, 1) (App. B.1).

    Args:
      f: the network residual f(u, k).
      u_K: the prior draw, (B, H, W, C).
      K: the number of levels.
      delta: the sampling noise δ.
      noise: ε_k = noise(k), unit Gaussian noise of u_K's shape, for a traced int32 k.
      trajectory_steps: levels k in 0..K at which to record the state u_k (K is the prior draw,
        0 the final output).
    Returns:
      u_0, or (u_0, trajectory) with trajectory of shape (len(trajectory_steps), B, H, W, C).
    """
    u_K = jnp.asarray(u_K, jnp.float32)
    steps = tuple(int(s) for s in trajectory_steps)
    if any(not 0 <= s <= K for s in steps):
        raise ValueError(f'trajectory_steps must lie in 0..{K}, got {steps}.')
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
    u, traj = jax.lax.fori_loop(0, K, step, (u_K, traj))
    if not steps:
        return u
    return u, record(traj, u, 0)[:-1]


def sample(f, u_K, K: int, delta, key, trajectory_steps: Sequence[int] = ()):
    """Alg. 2 from the prior draw u_K, with each example's noise from its own key split off `key`."""
    keys = jax.random.split(key, u_K.shape[0])
    return sample_with_noise(f, u_K, K, delta, example_noise(keys, u_K.shape[1:]),
                             trajectory_steps)
