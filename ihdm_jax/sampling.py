"""Sampling: the KDE prior of Sec. 3.2, the reverse chain of Alg. 2, and the chain loop that every
sampler runs.

`f` is the network residual f(u, k) with k an int32 array of shape (B,); μ(u, k) = u + f(u, k).
The functions are pure and trace under jax.jit; wrap them with the model's parameters closed over.
"""

from typing import Callable
from typing import Sequence

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
        return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), example_shape))(
            keys
        )

    return noise


def chain(step, u_start, start: int, noise: NoiseFn, record: Sequence[int] = (), stop: int = 0):
    """A reverse chain on a grid of points 0..start: u_{i−1} = step(u_i, i, ε_i) for
    i = start..stop+1, with ε_i = noise(i).

    Args:
      step: (u, i, eps) -> the state at grid point i − 1, for a traced int32 i.
      u_start: the state at grid point `start`.
      record: grid points in stop..start whose states to keep.
      stop: the grid point at which to end (0: the full chain).
    Returns:
      (u_stop, trajectory), trajectory of shape (len(record),) + u_start.shape.
    """
    u_start = jnp.asarray(u_start, jnp.float32)
    points = tuple(int(i) for i in record)
    if not 0 <= stop <= start:
        raise ValueError(f'stop must lie in 0..{start}, got {stop}.')
    if any(not stop <= i <= start for i in points):
        raise ValueError(f'The recorded points must lie in {stop}..{start}, got {points}.')
    # Each grid point's slot in the trajectory; the extra last slot takes the points not recorded.
    slot = np.full(start + 1, len(points), np.int32)
    slot[list(points)] = np.arange(len(points))
    slot = jnp.asarray(slot)

    def body(j, carry):
        u, traj = carry
        i = start - j
        if points:
            traj = traj.at[slot[i]].set(u)
        return step(u, i, noise(i)), traj

    traj = jnp.zeros((len(points) + 1,) + u_start.shape, jnp.float32) if points else None
    u, traj = jax.lax.fori_loop(0, start - stop, body, (u_start, traj))
    if not points:
        return u, jnp.zeros((0,) + u_start.shape, jnp.float32)
    return u, traj.at[slot[stop]].set(u)[:-1]


def alg2_step(f, u, k, delta, eps):
    """One step of Alg. 2 from level k: μ(u_k, k) + δ ε, without noise at k = 1 (the result is
    then the mean μ(u_1, 1), App. B.1)."""
    mean = u + f(u, jnp.full((u.shape[0],), k, jnp.int32))
    return mean + jnp.where(k > 1, delta, 0.0) * eps


def heat_ddim_step(mean_s, mean_t, u, eta, delta, eps, last):
    """The DDIM step (Song et al., ICLR 2021, Eq. 12) of the heat process from t to s < t:
    u_s = F(s) x̂_0 + √(1 − η²)(u_t − F(t) x̂_0) + η δ ε, given mean_s = F(s) x̂_0 and
    mean_t = F(t) x̂_0 (x̂_0 = E[u_0 | u_t]).

    q(u_t | u_0) = N(F(t) u_0, σ² I) is the marginal of the per-frequency Ornstein-Uhlenbeck
    process dũ = −λ ũ dt + σ √(2λ) dw, so with δ = σ every marginal is kept. η = 1 is Alg. 2's
    step (mean_s is μ), η = 0 the exponential integrator of the probability-flow ODE
    du/dt = Δ F(t) x̂_0: u_s = u_t + (F(s) − F(t)) x̂_0 (Cold Diffusion's improved sampler,
    Bansal et al., NeurIPS 2023, Alg. 2). At the `last` step (s = 0) x̂_0 = mean_s alone, as
    Alg. 2 ends on μ(u_1, 1).
    """
    step = mean_s + jnp.sqrt(1.0 - eta**2) * (u - mean_t) + eta * delta * eps
    return jnp.where(last, mean_s, step)


def sample_with_noise(
    f, u_K, K: int, delta, noise: NoiseFn, trajectory_steps: Sequence[int] = (), stop: int = 0
):
    """Alg. 2 with the noise sequence given: for k = K..1, u ← μ(u, k) + δ ε_k (alg2_step).

    Args:
      f: the network residual f(u, k).
      u_K: the state at level K: the prior draw, or a state partway down the chain.
      K: the level of u_K (the number of levels for a full chain).
      delta: the sampling noise δ.
      noise: ε_k = noise(k), unit Gaussian noise of u_K's shape, for a traced int32 k.
      trajectory_steps: levels k in stop..K at which to record the state u_k.
      stop: run the levels K..stop+1 only and return u_stop (0: the full chain).
    Returns:
      (u_stop, trajectory), trajectory of shape (len(trajectory_steps),) + u_K.shape.
    """
    return chain(
        lambda u, k, eps: alg2_step(f, u, k, delta, eps), u_K, K, noise, trajectory_steps, stop
    )


def sample(f, u_K, K: int, delta, key, trajectory_steps: Sequence[int] = ()):
    """Alg. 2 from the prior draw u_K, with each example's noise from its own key split off `key`;
    (u_0, trajectory) as sample_with_noise."""
    keys = jax.random.split(key, u_K.shape[0])
    return sample_with_noise(f, u_K, K, delta, example_noise(keys, u_K.shape[1:]), trajectory_steps)


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


def lerp(a, b, weight):
    """(1 − weight) a + weight b: the interpolation of the heat process's prior states."""
    return (1.0 - weight) * a + weight * b


def interpolate(run_chain, u_a, u_b, key_a, key_b, num_points: int, mix=lerp):
    """Samples between two endpoints (App. D.2, Fig. 7b).

    The start states are interpolated by `mix` (linearly for the heat process) and each step's
    noise spherically between the noise sequences of key_a and key_b.

    Args:
      run_chain: (u_start (B, H, W, C), noise) -> (u_0, trajectory), a sampler's chain.
      u_a, u_b: the two start states, shape (H, W, C).
      key_a, key_b: the keys of the two noise sequences.
      num_points: frames, endpoints included.
      mix: (a, b, weight) -> the states between a and b.
    Returns:
      (num_points, H, W, C): frame 0 is the sample from (u_a, key_a), the last from (u_b, key_b).
    """
    weight = jnp.linspace(0.0, 1.0, num_points).reshape(-1, 1, 1, 1)
    noise_a = example_noise(jnp.stack([key_a] * num_points), u_a.shape)
    noise_b = example_noise(jnp.stack([key_b] * num_points), u_a.shape)
    return run_chain(
        mix(u_a[None], u_b[None], weight), lambda k: slerp(noise_a(k), noise_b(k), weight)
    )[0]


def hierarchical(segment, u_K, K: int, key, splits: Sequence[int], branches: int):
    """A tree of samples from one start state (Fig. 5b): every chain splits at the given points.

    Chains run from grid point K; at each point in `splits` (descending) every chain is copied
    `branches` times and each copy continues with noise from its own key, fold_in(parent, i).

    Args:
      segment: (u, noise, start, stop) -> the state at grid point stop of the chain from u at
        grid point start, a sampler's chain (for Alg. 2: sample_with_noise with stop).
      u_K: one start state, shape (H, W, C).
      splits: grid points in 1..K−1 at which the chains branch.
    Returns:
      A list: entry j holds all chains at splits[j], before they split (shape
      (branches**j, H, W, C)); the last entry holds the final samples (branches**len(splits)).
    """
    splits = tuple(int(s) for s in splits)
    if list(splits) != sorted(set(splits), reverse=True) or any(not 0 < s < K for s in splits):
        raise ValueError(f'splits must be distinct levels in 1..{K - 1}, descending; got {splits}.')
    u, keys, level, states = u_K[None], key[None], K, []
    for stop in splits + (0,):
        u = segment(u, example_noise(keys, u_K.shape), level, stop)
        states.append(u)
        if stop:
            u = jnp.repeat(u, branches, axis=0)
            keys = jax.vmap(
                lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(branches))
            )(keys)
            keys = keys.reshape((-1,) + keys.shape[2:])
        level = stop
    return states
