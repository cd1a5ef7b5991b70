"""An exact network for the heat process at continuous levels, shared by the tests: the
posterior mean E[u_0 | u_κ] of a small training set (a softmax-weighted mean of the images under
N(F(t(κ)) x_i, σ² I)), on a schedule of K = 20 levels from σ_B = 0.5 to 4."""

import jax
import jax.numpy as jnp
from sklearn.datasets import load_digits

from ihdm_jax import heat

K, SIGMA_MIN, SIGMA_MAX = 20, 0.5, 4.0


def time(kappa):
    """t(κ) = σ_B(κ)²/2 with σ_B log-linear in κ between σ_B(1) = 0.5 and σ_B(K) = 4."""
    weight = (kappa - 1.0) / (K - 1)
    return 0.5 * (SIGMA_MIN ** (1.0 - weight) * SIGMA_MAX**weight) ** 2


def continuous(config, sigma, **sampling):
    """`config` with the heat process at continuous levels on this schedule, training noise σ."""
    config = config.copy_and_resolve_references()
    config.model.process = 'heat_continuous'
    config.model.K, config.model.blur_sigma_max, config.model.sigma = K, SIGMA_MAX, sigma
    config.sampling.update(sampling)
    return config


def posterior_mean_residual(images, sigma):
    """f(u, κ) = E[u_0 | u_κ] − u for the training set `images` (N, H, W, C) at noise σ."""
    x = jnp.asarray(images, jnp.float32)

    def f(u, kappa):
        blurred = jax.vmap(lambda t: heat.heat_forward(x, t))(time(kappa))  # (B, N, H, W, C)
        distances = jnp.sum(jnp.square(u[:, None] - blurred), axis=(2, 3, 4))
        weights = jax.nn.softmax(-distances / (2 * sigma**2), axis=1)
        return jnp.einsum('bn,nhwc->bhwc', weights, x) - u

    return f


def digits(count):
    """The first `count` of scikit-learn's 8x8 digits in [0, 1], (count, 8, 8, 1) float64."""
    return load_digits().images[:count, :, :, None] / 16.0
