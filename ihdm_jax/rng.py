"""Every random stream of config.seed, named in one place.

jax keys: initialisation, training (folded with the step), sampling (folded with the chunk of
samples) and the ELBO (folded with each test example's index). numpy generators for the data:
the permutation of each epoch, the flips of each step, and the training images picked for the
KDE prior. A resumed run, a run on another number of devices and a run with another batch size
of samples or evaluation therefore draw the same numbers.
"""

import jax
import numpy as np

# numpy streams: np.random.default_rng([seed, stream, index]).
PERMUTATION, FLIP, PRIOR = 0, 1, 2
_ELBO = 3  # the ELBO's key is fold_in(key(seed), _ELBO)
# Streams of the analyses, split off the sampling key.
ANALYSIS_PRIOR, ANALYSIS_NOISE = 0, 1
# Draw numbers of the prior picks of the analyses, apart from the sample chunks 0, 1, 2, ...
ANALYSIS_DRAW = 2**31


def _split(seed: int):
    return jax.random.split(jax.random.key(seed), 3)


def init_key(seed: int) -> jax.Array:
    return _split(seed)[0]


def train_key(seed: int) -> jax.Array:
    """The training key; step s uses fold_in(train_key, s)."""
    return _split(seed)[1]


def sample_key(seed: int) -> jax.Array:
    """The sampling key; chunk c of samples uses fold_in(sample_key, c)."""
    return _split(seed)[2]


def elbo_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), _ELBO)


def analysis_key(seed: int, stream: int) -> jax.Array:
    """ANALYSIS_PRIOR (the prior noise of the analyses' chains) or ANALYSIS_NOISE (their
    noise sequences)."""
    return jax.random.fold_in(sample_key(seed), stream)


def numpy_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def prior_picks(seed: int, draw: int, n: int, num_images: int) -> np.ndarray:
    """Indices of n training images picked uniformly for the KDE prior, draw number `draw`."""
    return numpy_rng(seed, PRIOR, draw).integers(0, num_images, n)


def subset(seed: int, n: int, num_images: int) -> np.ndarray:
    """n distinct image indices, sorted, for the analyses that average over training images."""
    picks = numpy_rng(seed, PRIOR, ANALYSIS_DRAW).choice(
        num_images, min(n, num_images), replace=False
    )
    return np.sort(picks)


def example_keys(key: jax.Array, n: int) -> np.ndarray:
    """n keys split off `key` as uint32 key data, one per example, so that they can be padded
    and sharded like any batch."""
    return np.asarray(jax.random.key_data(jax.random.split(key, n)))
