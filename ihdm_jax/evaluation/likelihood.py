"""Negative ELBO (Eq. 7 with the App. A.3 bound on L_K), estimated by Monte Carlo over k.

The per-level terms use the paper's indexing: level k ≥ 2 gives L_{k−1} (Eq. 10) and level 1
gives L_0 (Eq. 11). Each pass draws one level per example; the sum over levels is estimated by
the sum of the per-level means (every level must have been drawn at least once).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ihdm_jax import errors
from ihdm_jax import objective


def dequantize(key, images):
    """Uniform dequantisation of uint8 images to [0, 1]: u0 = (x·255 + U)/256, U ~ U[0, 1)."""
    x = jnp.asarray(images, jnp.float32)
    return (x + jax.random.uniform(key, x.shape)) / 256.0


def draw_level(key, shape, K):
    """One pass's randomness for a batch of `shape` (B, H, W, C): k ~ U{1..K} and ε ~ N(0, I)."""
    k_key, eps_key = jax.random.split(key)
    k = jax.random.randint(k_key, (shape[0],), 1, K + 1, dtype=jnp.int32)
    return k, jax.random.normal(eps_key, shape, jnp.float32)


def level_pass(f, u0, key, t, sigma, delta, backend='matmul'):
    """One Monte-Carlo pass: a level k ~ U{1..K} per example and its term, summed per level.

    Returns:
      (sums, counts), each of shape (K + 1,) (index 0 unused): the sum of the sampled level
      terms in nats and how many examples drew each level.
    """
    num_levels = t.shape[0]
    k, eps = draw_level(key, u0.shape, num_levels - 1)
    terms = objective.level_term(f, u0, k, eps, t, sigma, delta, backend)
    sums = jax.ops.segment_sum(terms, k, num_segments=num_levels)
    counts = jax.ops.segment_sum(jnp.ones_like(terms), k, num_segments=num_levels)
    return sums, counts


def merge_prior_bounds(bounds, sizes):
    """The App. A.3 bound on L_K against a training set from the bounds against its parts.

    The optimal bound of Eq. (41), log N_T − log Σ_i exp(−D_KL[q(u_K | u0) ‖ N(u_K^i, δ²I)]),
    splits its sum over training images i into parts c of N_c images, each of whose bounds is
    b_c = log N_c − log Σ_{i∈c} exp(−D_KL_i), so the whole bound is
    log Σ_c N_c − log Σ_c N_c exp(−b_c).

    Args:
      bounds: (C, B) bounds of B examples against each of C parts.
      sizes: (C,) images per part.
    Returns:
      (B,) bounds against the whole training set, float64.
    """
    bounds = np.asarray(bounds, np.float64)
    log_sizes = np.log(np.asarray(sizes, np.float64))[:, None]
    return np.log(np.sum(sizes)) - scipy.special.logsumexp(log_sizes - bounds, axis=0)


@dataclasses.dataclass(frozen=True)
class ElboTerms:
    """The mean negative ELBO of a test set in nats per image: L_K (the prior term), Σ L_k (the
    levels above 1), L_0 (the decoder), their total, and the mean term of each level k = 1..K
    (None where no draw fell on it)."""

    L_K: float
    sum_L_k: float
    L_0: float
    nats: float
    level_nats: list


def assemble(prior_bound, level_sums, level_counts) -> ElboTerms:
    """The mean negative ELBO of Eq. 7 over a data set from its per-level sums.

    Args:
      prior_bound: the App. A.3 upper bounds on L_K, one per evaluated example.
      level_sums, level_counts: the accumulated outputs of `level_pass`, shape (K + 1,); every
        level k = 1..K must have been drawn.
    """
    level_sums = np.asarray(level_sums, np.float64)[1:]
    level_counts = np.asarray(level_counts, np.float64)[1:]
    missing = np.flatnonzero(level_counts == 0) + 1
    if missing.size:
        raise errors.UserError(
            f'Levels {missing.tolist()} were never drawn: evaluate more '
            'examples or more passes so that every level k = 1..K is sampled.'
        )
    level_means = level_sums / level_counts
    l_K = float(np.mean(np.asarray(prior_bound, np.float64)))
    return ElboTerms(
        L_K=l_K,
        sum_L_k=float(np.sum(level_means[1:])),
        L_0=float(level_means[0]),
        nats=l_K + float(np.sum(level_means)),
        level_nats=level_means.tolist(),
    )
