"""The forward process: the heat equation with Neumann boundaries, solved exactly in the DCT basis.

Arrays are NHWC; the transforms act on the H and W axes. Everything runs in float32; the matmul
backend uses HIGHEST precision so that it is not silently TF32 (GPU) or bf16 (TPU).

The matmul backend (two small dense DCT matrices) is the default on every platform: on CPU it is
2.5-7x faster than the FFT backend from 32 to 256 px (docs/benchmarks.md), TPUs run matmuls on
the MXU but FFTs slowly, and at the sizes used here the transform is a tiny part of a training
step on any device. The FFT backend stays as an independent implementation to test against.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ('fft', 'matmul')
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C of size n x n:
    (C x)_k = a_k sum_i x_i cos(pi (2i + 1) k / 2n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c.astype(np.float32)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'DCT backend {backend!r} is not one of {BACKENDS}.')


def dct_2d(x: jax.Array, backend: str = 'matmul') -> jax.Array:
    """Orthonormal 2-D DCT-II over the H and W axes of an NHWC array: ũ = Vᵀu of Eq. (2)."""
    _check_backend(backend)
    x = jnp.asarray(x, jnp.float32)
    if backend == 'fft':
        return jax.scipy.fft.dctn(x, type=2, axes=(1, 2), norm='ortho')
    ch, cw = dct_matrix(x.shape[1]), dct_matrix(x.shape[2])
    return jnp.einsum('kh,bhwc,lw->bklc', ch, x, cw, precision=_HIGHEST)


def idct_2d(x: jax.Array, backend: str = 'matmul') -> jax.Array:
    """Inverse of `dct_2d` (the orthonormal DCT-III): u = Vũ of Eq. (2)."""
    _check_backend(backend)
    x = jnp.asarray(x, jnp.float32)
    if backend == 'fft':
        return jax.scipy.fft.idctn(x, type=2, axes=(1, 2), norm='ortho')
    ch, cw = dct_matrix(x.shape[1]), dct_matrix(x.shape[2])
    return jnp.einsum('kh,bklc,lw->bhwc', ch, x, cw, precision=_HIGHEST)


def laplacian_eigenvalues(height: int, width: int) -> np.ndarray:
    """λ_nm = π²(n²/H² + m²/W²) of Eq. (21), shape (H, W, 1): −Λ in the DCT basis."""
    n = np.arange(height)[:, None] / height
    m = np.arange(width)[None, :] / width
    return (np.pi**2 * (n**2 + m**2))[:, :, None].astype(np.float32)


def heat_forward(u: jax.Array, t, backend: str = 'matmul') -> jax.Array:
    """F(t) u = V exp(Λt) Vᵀ u of Eq. (2) / Alg. 3, with Neumann boundaries.

    Args:
      u: images, shape (B, H, W, C).
      t: diffusion time, a scalar or one value per batch element (shape (B,)).
      backend: 'matmul' (default) or 'fft' DCT.
    Returns:
      The images after running the heat equation for time t, float32, u's shape.
    """
    u = jnp.asarray(u, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != u.shape[0]):
        raise ValueError(f't must be a scalar or have shape ({u.shape[0]},), got shape {t.shape}.')
    t = t.reshape((-1, 1, 1, 1)) if t.ndim == 1 else t
    decay = jnp.exp(-laplacian_eigenvalues(u.shape[1], u.shape[2]) * t)
    return idct_2d(dct_2d(u, backend) * decay, backend)


def blur_sigmas(K: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """σ_B,k of App. B.5 for k = 0..K, log-spaced from σ_B,min (k = 1) to σ_B,max (k = K);
    σ_B,0 = 0.

    σ_B,k = exp(log σ_B,min (K − k)/(K − 1) + log σ_B,max (k − 1)/(K − 1)). With K = 1 the only
    level is σ_B,max, so that t_K = σ_B,max²/2 always holds.
    """
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f'K must be an integer >= 1, got {K!r}.')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f'Need 0 < blur_sigma_min < blur_sigma_max, got {sigma_min} and {sigma_max}.'
        )
    if K == 1:
        return jnp.asarray([0.0, sigma_max], jnp.float32)
    k = np.arange(1, K + 1, dtype=np.float64)
    log_sigma = (np.log(sigma_min) * (K - k) + np.log(sigma_max) * (k - 1)) / (K - 1)
    return jnp.asarray(np.concatenate([[0.0], np.exp(log_sigma)]), jnp.float32)


def heat_times(K: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """t_k = σ_B,k²/2 for k = 0..K (Sec. 3.1: Gaussian blur of variance σ_B² = heat time 2t)."""
    return blur_sigmas(K, sigma_min, sigma_max) ** 2 / 2


def level_times(kappa, K: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """t(κ) = σ_B(κ)²/2 at continuous levels κ in [1, K], σ_B(κ) the log-linear interpolation of
    blur_sigmas between its integer levels (App. B.5); t(0) = 0, the data. K >= 2."""
    kappa = jnp.asarray(kappa, jnp.float32)
    log_sigma = (np.log(sigma_min) * (K - kappa) + np.log(sigma_max) * (kappa - 1)) / (K - 1)
    return jnp.where(kappa > 0, jnp.exp(2 * log_sigma) / 2, 0.0)
