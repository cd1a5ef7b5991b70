"""Input gradients of the reverse step (Fig. 8) and nearest training neighbours of samples
(Fig. 30)."""

import jax
import numpy as np


def input_gradient(fn, u, pixel):
    """∂ fn(u)[0, i, j, c] / ∂u: how one output pixel depends on every input pixel.

    Args:
      fn: maps a (1, H, W, C) image to an image, e.g. u ↦ μ(u, k) or u ↦ F(t) u.
      u: the input, (1, H, W, C).
      pixel: (i, j, c) of the output pixel.
    Returns:
      The gradient map, (H, W, C).
    """
    i, j, c = pixel
    return jax.grad(lambda x: fn(x)[0, i, j, c])(u)[0]


def nearest_neighbours(samples, train, num=1, chunk_size=4096):
    """Indices of the `num` Euclidean-nearest training images of each sample, nearest first."""
    a = np.asarray(samples, np.float64).reshape(len(samples), -1)
    a_sq = np.sum(a * a, axis=1, keepdims=True)
    best_d = np.full((len(a), 0), np.inf)
    best_i = np.zeros((len(a), 0), int)
    for start in range(0, len(train), chunk_size):
        b = np.asarray(train[start : start + chunk_size], np.float64).reshape(-1, a.shape[1])
        d = a_sq + np.sum(b * b, axis=1) - 2 * a @ b.T
        best_d = np.concatenate([best_d, d], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(start + np.arange(len(b)), d.shape)], 1)
        keep = np.argsort(best_d, axis=1, kind='stable')[:, :num]
        best_d = np.take_along_axis(best_d, keep, 1)
        best_i = np.take_along_axis(best_i, keep, 1)
    return best_i
