"""Class conditioning with classifier-free guidance (Ho & Salimans, 2022), for every process.

The network f(u, k, c) of a conditional model takes a class c in 0..C−1 or the null class ∅ = C
(no class). Training replaces the label by ∅ with probability p (`drop_labels`), so that one
network learns both f(u, k, c) and f(u, k, ∅). Sampling runs any sampler of any process with the
guided network of `guided`: for the heat process μ(u, k) = u + f(u, k) is affine in f, so guiding
f guides μ (μ̃ = μ(u, k, ∅) + w (μ(u, k, c) − μ(u, k, ∅))), and with it the score that μ
estimates; for heat_continuous the same holds for x̂_0 = u + f, and for the diffusion processes
f is ε, the guided quantity of Ho & Salimans.
"""

import jax
import jax.numpy as jnp
import numpy as np

NULL = -1  # a label of config.sampling.labels and of the API: no class (∅)


def drop_labels(key, labels, rate: float, num_classes: int):
    """c' = ∅ (the index num_classes) with probability `rate`, else c, independently per
    example: the label dropout of Ho & Salimans' Alg. 1 (their p_uncond)."""
    drop = jax.random.bernoulli(key, rate, labels.shape)
    return jnp.where(drop, num_classes, labels).astype(jnp.int32)


def guided(f, labels, num_classes: int, w):
    """f̃(u, k) = f(u, k, ∅) + w (f(u, k, c) − f(u, k, ∅)) for the labels c (B,) of the batch
    (Ho & Salimans, Eq. 6 with w = 1 + their w): w = 1 the conditional network, w = 0 the
    unconditional one, w > 1 guidance towards c. f(u, k, c) takes labels (B,) in 0..num_classes
    (num_classes = ∅); both evaluations run as one batch of 2B."""

    def f_guided(u, k):
        null = jnp.full_like(labels, num_classes)
        both = f(
            jnp.concatenate([u, u]),
            jnp.concatenate([k, k]),
            jnp.concatenate([labels, null]),
        )
        conditional, unconditional = jnp.split(both, 2)
        return unconditional + w * (conditional - unconditional)

    return f_guided


def network_labels(labels, num_classes: int) -> np.ndarray:
    """Labels of the API (0..C−1, or NULL) as the network's indices (NULL -> ∅ = C), int32."""
    labels = np.asarray(labels, np.int64)
    return np.where(labels == NULL, num_classes, labels).astype(np.int32)


def class_picks(
    generator: np.random.Generator, labels: np.ndarray, image_labels: np.ndarray
) -> np.ndarray:
    """One training image per label, uniformly among the images of its class (all images for
    NULL): the KDE prior of the heat process (Sec. 3.2) restricted to class c, p(u_K | c) =
    (1/N_c) Σ_{i: c_i = c} N(u_K | F(t_K) x_i, δ² I)."""
    uniform = generator.random(len(labels))
    picks = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(image_labels == label) if label != NULL else None
        count = len(image_labels) if members is None else len(members)
        where = labels == label
        chosen = np.floor(uniform[where] * count).astype(np.int64)
        picks[where] = chosen if members is None else members[chosen]
    return picks
