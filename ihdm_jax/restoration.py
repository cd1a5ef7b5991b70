"""Restoration with a trained heat model: deblurring and super-resolution (docs/restoration.md).

A degraded image y measures the image x in the model's DCT basis: ŷ = a ⊙ x̂ + n, a the gain of
each frequency (carried as log a, −inf where y says nothing) and n noise of standard deviation
`noise` per coefficient. At heat time t the measurement estimates the heat state's mean
F(t) x as e^{−λt} ŷ / a, with noise e^{−λt} n / a: a frequency is *measured* at t where that
noise is at most the training noise σ. The reverse chain starts at the first grid point where
every frequency is either measured or blurred below σ (`start_index`), from the measured
frequencies with noise σ and σ ε elsewhere, and with data consistency has the measured ones
replaced after every step (`consistency`; cf. ILVR, Choi et al. 2021). Everything is pure and
traces under jax.jit.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from ihdm_jax import errors
from ihdm_jax import heat

# The standard deviation of the rounding of [0, 1] images to 8 bits: 1 / (255 √12).
QUANTISATION = 1.0 / (255.0 * np.sqrt(12.0))


def box_downsample(x, factor: int):
    """The mean of each factor x factor block of x (B, H, W, C): the low-resolution image."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def box_response(n: int, factor: int) -> np.ndarray:
    """D(m) = sin(πm / 2n) / (r sin(πm / 2rn)), D(0) = 1, for m = 0..n − 1: the gain by which
    the mean over blocks of r = factor pixels scales the DCT-II basis vector m of length rn (the
    block mean of cos(πm(2i + 1) / 2rn) is D(m) cos(πm(2j + 1) / 2n)). Frequencies m >= n fold
    onto lower ones (aliasing), which the measurement model leaves out."""
    m = np.arange(n, dtype=np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        d = np.sin(np.pi * m / (2 * n)) / (factor * np.sin(np.pi * m / (2 * factor * n)))
    d[0] = 1.0
    return d


def place(y, factor: int):
    """ŷ = r · DCT(y) of low-resolution images y (B, h, w, C) as the lowest h x w coefficients
    of the (rh, rw) DCT basis, zero elsewhere. The orthonormal DCT of length rn has √r times
    the coefficients of length n for the same continuous signal, so r = √r · √r in 2D; then
    ŷ = D_h ⊗ D_w ⊙ x̂ for y = box_downsample(x, r), up to aliasing."""
    b, h, w, c = y.shape
    coefficients = factor * heat.dct_2d(jnp.asarray(y, jnp.float32))
    return jnp.zeros((b, factor * h, factor * w, c), jnp.float32).at[:, :h, :w].set(coefficients)


@dataclasses.dataclass(frozen=True)
class Degradation:
    """How the images to restore were made from images of the model's size (H, W): a Gaussian
    blur of blur_sigma pixels (the heat equation's F(σ_y² / 2)), or the mean over blocks of
    `upsample` pixels, with measurement noise of standard deviation `noise` per pixel on top of
    8-bit rounding."""

    size: tuple  # (H, W) of the model's images
    blur_sigma: float = 0.0
    upsample: int = 1
    noise: float = 0.0

    @property
    def t_star(self) -> float:
        """The heat time of the blur, t* = σ_y² / 2."""
        return self.blur_sigma**2 / 2

    def apply(self, x):
        """The degradation of images x (B, H, W, C) in [0, 1], without noise or rounding."""
        if self.upsample > 1:
            return box_downsample(x, self.upsample)
        return heat.heat_forward(x, self.t_star)

    def input_size(self) -> tuple:
        """(h, w) of the degraded images."""
        return tuple(s // self.upsample for s in self.size)

    def log_gain(self) -> np.ndarray:
        """log a per frequency, (H, W, 1) float64: −λ t* for the blur; log D_h ⊗ D_w inside the
        low-resolution image's h x w frequencies and −inf outside for the block mean."""
        if self.upsample == 1:
            return -heat.laplacian_eigenvalues(*self.size) * self.t_star
        (h, w), r = self.input_size(), self.upsample
        gain = np.zeros(self.size)
        gain[:h, :w] = np.outer(box_response(h, r), box_response(w, r))
        with np.errstate(divide='ignore'):
            return np.log(gain)[..., None]

    def coefficient_noise(self) -> float:
        """The noise n per coefficient of ŷ: the pixel noise and the rounding, times r for the
        placed low-resolution coefficients."""
        return float(self.upsample * np.hypot(self.noise, QUANTISATION))

    def check(self, shape: tuple, channels: int):
        """errors.UserError unless degraded images of `shape` (N, h, w, C) fit a model of
        `channels` channels."""
        name = f'upsample={self.upsample}' if self.upsample > 1 else f'blur_sigma={self.blur_sigma}'
        if self.upsample < 1 or self.blur_sigma < 0 or (self.blur_sigma > 0) == (self.upsample > 1):
            raise errors.UserError(
                f'blur_sigma={self.blur_sigma}, upsample={self.upsample}: restoration takes '
                'either a blur σ_y > 0 (deblurring) or a factor > 1 (super-resolution), not '
                'both or neither.'
            )
        h, w = self.size
        if h % self.upsample or w % self.upsample:
            raise errors.UserError(
                f"{name} does not divide the model's image size {h}x{w}: the low-resolution "
                'images would not have whole pixels.'
            )
        if len(shape) != 4 or tuple(shape[1:3]) != self.input_size():
            raise errors.UserError(
                f'Images of shape {tuple(shape)} with {name}: expected (N, '
                f'{self.input_size()[0]}, {self.input_size()[1]}, {channels}), so that the '
                f"restorations have the model's {h}x{w}."
            )
        if shape[3] != channels:
            raise errors.UserError(f'Images with {shape[3]} channels: the model takes {channels}.')

    def consistency(self, u, t, y, sigma, top_up, eps):
        """The state u (B, H, W, C) at heat time t made consistent with the degraded images y.
        The blur: its measured frequencies replaced (`consistency`). The block mean: ILVR's step
        u − P u + P(F(t) x̃ + top_up ε), P = ↑ ∘ (block mean) with ↑ the nearest upsampling,
        the orthogonal projection onto images with given block means; x̃ = `upsampled(y)`. At
        t = 0, top_up = 0 it makes the block means of u exactly y."""
        if self.upsample == 1:
            return consistency(
                u,
                t,
                self.coefficients(y),
                self.log_gain(),
                self.coefficient_noise(),
                sigma,
                top_up,
                eps,
            )
        target = heat.heat_forward(self.upsampled(y), t) + top_up * eps
        r = self.upsample
        return u - self.nearest(box_downsample(u, r)) + self.nearest(box_downsample(target, r))

    def upsampled(self, y):
        """x̃: the DCT zero-padding of y with the block mean's gain divided out (ŷ / a on the
        low frequencies), its block means then set to y exactly (x̃ + ↑(y − block mean of x̃))."""
        log_gain = self.log_gain()
        inverse = np.exp(-np.where(np.isfinite(log_gain), log_gain, np.inf))
        smooth = heat.idct_2d(self.coefficients(y) * jnp.asarray(inverse, jnp.float32))
        return smooth + self.nearest(
            jnp.asarray(y, jnp.float32) - box_downsample(smooth, self.upsample)
        )

    def nearest(self, y):
        """↑y: each pixel of y (B, h, w, C) repeated upsample x upsample times."""
        r = self.upsample
        return jnp.repeat(jnp.repeat(jnp.asarray(y, jnp.float32), r, axis=1), r, axis=2)

    def coefficients(self, y):
        """ŷ of degraded images y (B, h, w, C) in [0, 1]."""
        if self.upsample > 1:
            return place(y, self.upsample)
        return heat.dct_2d(jnp.asarray(y, jnp.float32))


def estimate(coefficients, log_gain, noise: float, t):
    """(e^{−λt} ŷ / a, e^{−λt} n / a): the measurement's estimate of the DCT coefficients of
    F(t) x and its noise per frequency; 0 and inf where a = 0."""
    lam = heat.laplacian_eigenvalues(*log_gain.shape[:2])
    known = np.isfinite(log_gain)
    scale = jnp.exp(jnp.asarray(np.where(known, -log_gain, 0.0), jnp.float32) - lam * t)
    scale = jnp.where(known, scale, 0.0)
    return coefficients * scale, jnp.where(known, noise * scale, jnp.inf)


def consistency(u, t, coefficients, log_gain, noise: float, sigma, top_up, eps):
    """The state u (B, H, W, C) at heat time t with its measured frequencies replaced by the
    measurement's estimate plus noise of variance top_up² − s² (s the estimate's noise), so that
    they carry noise top_up: σ at the chain's states, 0 at its end. eps: unit noise like u."""
    mean, s = estimate(coefficients, log_gain, noise, t)
    replace = s <= sigma
    extra = jnp.sqrt(jnp.maximum(top_up**2 - jnp.where(replace, s, 0.0) ** 2, 0.0))
    u_hat = jnp.where(replace, mean + extra * heat.dct_2d(eps), heat.dct_2d(u))
    return heat.idct_2d(u_hat)


def start_index(times, log_gain, noise: float, sigma: float):
    """The first index i of the ascending heat times (numpy) at which every frequency is
    measured (`estimate`'s noise at most σ) or blurred to a gain e^{−λt} <= σ (a unit
    coefficient below the noise); None if none is."""
    lam = heat.laplacian_eigenvalues(*log_gain.shape[:2])
    for i, t in enumerate(np.asarray(times, np.float64)):
        s = np.asarray(estimate(jnp.zeros(()), log_gain, noise, t)[1])
        if np.all((s <= sigma) | (np.exp(-lam * t) <= sigma)):
            return i
    return None


def tikhonov(coefficients, log_gain, alpha: float):
    """The Tikhonov (Wiener with a flat prior) restoration idct(a ŷ / (a² + α)): exact
    deconvolution of the blur at α = 0, regularised where a² falls below α."""
    gain = jnp.asarray(np.exp(log_gain), jnp.float32)
    return heat.idct_2d(coefficients * gain / (gain**2 + alpha))
