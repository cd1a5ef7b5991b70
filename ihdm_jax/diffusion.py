"""Gaussian forward processes diagonal in the DCT basis, and everything that follows from them.

In DCT coefficients ũ = Vᵀu (heat.dct_2d), with λ the eigenvalue of −Laplacian of each frequency
(heat.laplacian_eigenvalues), a process is

    q(ũ_t | ũ_0) = N(a_t(λ) ũ_0, s_t(λ)²)  per frequency,  a_t = α_t d_t(λ),  s_t = σ_t c(λ),

with a scalar schedule (α_t, σ_t), a blurring factor d_t(λ) (1 without blurring) and a noise
spectrum c(λ) (1 for white noise), t in [0, 1]. Three processes are defined here:

- DDPM (Ho et al. 2020): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) of the linear β schedule, d = c = 1.
- Blurring diffusion (Hoogeboom & Salimans, arXiv 2209.05557): the cosine schedule and
  d_t(λ) = (1 − d_min) exp(−λ τ_t) + d_min, c = 1.
- Non-isotropic noise (Voleti et al.): DDPM's schedule and c(λ) ∝ (λ + c0)^(−γ/2).

The network predicts the white noise ε = V ẽ of u_t = V(a_t ⊙ ũ_0 + s_t ⊙ ẽ): `eps_fn(u, t)`
with u of shape (B, H, W, C) and t float32 of shape (B,). Images live in [−1, 1] (Ho et al.,
Sec. 3.3). Levels are the grid t_i = i/N, i = 0..N; training draws t on that grid (DDPM, the
non-isotropic process) or uniformly on [0, 1] (blurring diffusion, Sec. 4). Everything is
float32 with the DCT at HIGHEST precision.
"""

import dataclasses
import functools
from typing import Callable
from typing import Optional
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ihdm_jax import heat
from ihdm_jax import sampling

TIME_SCALE = 1000.0  # the network sees 1000·t: Ho et al.'s integer step i when N = 1000


@dataclasses.dataclass(frozen=True)
class Process:
    """A forward process diagonal in the DCT basis (module docstring).

    alpha_sigma: t (B,) -> (α_t, σ_t), each (B,).
    blur: (t (B,), λ (H, W, 1)) -> d_t(λ) (B, H, W, 1); None: d ≡ 1.
    spectrum: λ (H, W, 1) -> c(λ) (H, W, 1); None: c ≡ 1.
    num_levels: N, the levels t_i = i/N of sampling and of the ELBO.
    continuous: training draws t ~ U(0, 1) rather than i ~ U{1..N}.
    """

    alpha_sigma: Callable
    blur: Optional[Callable]
    spectrum: Optional[Callable]
    num_levels: int
    continuous: bool


# ---- the three processes ------------------------------------------------------------------


def linear_alpha_bar(T: int, beta_1: float, beta_T: float) -> np.ndarray:
    """ᾱ_i = Π_{j≤i} (1 − β_j), i = 0..T, for β linear from β_1 to β_T (Ho et al., Sec. 4),
    float64; ᾱ_0 = 1."""
    betas = np.linspace(beta_1, beta_T, T, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def _table_alpha_sigma(alpha_bar, t):
    """(√ᾱ_i, √(1 − ᾱ_i)) at i = round(t N) from a table ᾱ_0..ᾱ_N (float64 before rounding)."""
    N = len(alpha_bar) - 1
    i = jnp.clip(jnp.round(jnp.asarray(t, jnp.float32) * N).astype(jnp.int32), 0, N)
    alpha = jnp.asarray(np.sqrt(alpha_bar), jnp.float32)
    sigma = jnp.asarray(np.sqrt(1.0 - alpha_bar), jnp.float32)
    return alpha[i], sigma[i]


def cosine_alpha_sigma(t, logsnr_min=-10.0, logsnr_max=10.0):
    """(α_t, σ_t) of the cosine schedule with log SNR clipped to [logsnr_min, logsnr_max], as in
    Hoogeboom & Salimans' App. A pseudo-code: log SNR_t = −2 log tan(a t + b), α² = sigmoid(log
    SNR), σ² = sigmoid(−log SNR), with b = arctan(e^(−logsnr_max/2)) and
    a = arctan(e^(−logsnr_min/2)) − b."""
    b = np.arctan(np.exp(-0.5 * logsnr_max))
    a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
    logsnr = -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def blur_factor(t, lam, blur_sigma_max, d_min):
    """d_t(λ) = (1 − d_min) exp(−λ τ_t) + d_min with τ_t = σ_B(t)²/2 and
    σ_B(t) = σ_B,max sin²(πt/2) (Hoogeboom & Salimans, Sec. 4 and App. A)."""
    t = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
    tau = (blur_sigma_max * jnp.sin(t * jnp.pi / 2) ** 2) ** 2 / 2
    return (1.0 - d_min) * jnp.exp(-lam * tau) + d_min


def power_spectrum(lam, gamma, c0):
    """c(λ) ∝ (λ + c0)^(−γ/2), scaled so that the mean of c² over the frequencies is 1."""
    c2 = np.power(np.asarray(lam, np.float64) + c0, -gamma)
    return jnp.asarray(np.sqrt(c2 / np.mean(c2)), jnp.float32)


def ddpm(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> Process:
    """Ho et al. 2020: T levels, β linear from 1e-4 to 0.02 (Sec. 4), ε-prediction."""
    return Process(
        functools.partial(_table_alpha_sigma, linear_alpha_bar(T, beta_1, beta_T)),
        None,
        None,
        T,
        continuous=False,
    )


def blurring(num_levels: int, blur_sigma_max: float, d_min: float = 0.001) -> Process:
    """Hoogeboom & Salimans: the cosine schedule and the blurring factor d_t (Sec. 4), continuous
    t, sampled and evaluated on num_levels levels."""
    return Process(
        cosine_alpha_sigma,
        functools.partial(blur_factor, blur_sigma_max=blur_sigma_max, d_min=d_min),
        None,
        num_levels,
        continuous=True,
    )


def non_isotropic(
    T: int, gamma: float, c0: float, beta_1: float = 1e-4, beta_T: float = 0.02
) -> Process:
    """DDPM's schedule with noise of spectrum c(λ) ∝ (λ + c0)^(−γ/2) (Voleti et al.)."""
    return dataclasses.replace(
        ddpm(T, beta_1, beta_T), spectrum=functools.partial(power_spectrum, gamma=gamma, c0=c0)
    )


# ---- the per-frequency Gaussian machinery --------------------------------------------------


def coefficients(process: Process, t, shape):
    """(a_t(λ), s_t(λ)) for images of `shape` (B, H, W, C) at times t (B,): (B, H, W, 1) each."""
    alpha, sigma = process.alpha_sigma(jnp.asarray(t, jnp.float32))
    return (
        alpha.reshape(-1, 1, 1, 1) * blur_at(process, t, shape),
        sigma.reshape(-1, 1, 1, 1) * noise_spectrum(process, shape),
    )


def noise_spectrum(process: Process, shape):
    """c(λ), (H, W, 1): the std of each DCT coefficient of the prior N(0, V diag(c²) Vᵀ)."""
    lam = heat.laplacian_eigenvalues(shape[1], shape[2])
    return jnp.ones_like(lam) if process.spectrum is None else process.spectrum(lam)


def q_sample(process: Process, u0, t, eps):
    """u_t = V(a_t ⊙ Vᵀu_0 + s_t ⊙ Vᵀε), a draw of q(u_t | u_0) given white noise ε."""
    a, s = coefficients(process, t, u0.shape)
    return heat.idct_2d(a * heat.dct_2d(u0) + s * heat.dct_2d(eps))


def prior_sample(process: Process, key, shape):
    """u_1 ~ p(u_1) = N(0, V diag(c²) Vᵀ): V(c ⊙ z)."""
    return heat.idct_2d(noise_spectrum(process, shape) * jax.random.normal(key, shape))


def posterior(a_s, s_s, a_t, s_t):
    """q(ũ_s | ũ_t, ũ_0) = N(coef_t ũ_t + coef_0 ũ_0, var) per frequency for s < t.

    α_{t|s} = a_t/a_s, σ²_{t|s} = s_t² − α_{t|s}² s_s²; coef_t = α_{t|s} s_s²/s_t²,
    coef_0 = a_s σ²_{t|s}/s_t², var = σ²_{t|s} s_s²/s_t² (Hoogeboom & Salimans, Sec. 3; for
    d = c = 1 this is Ho et al.'s Eq. 7). Returns (coef_t, coef_0, var).
    """
    alpha_ts = a_t / a_s
    sigma2_ts = s_t**2 - alpha_ts**2 * s_s**2
    return alpha_ts * s_s**2 / s_t**2, a_s * sigma2_ts / s_t**2, sigma2_ts * s_s**2 / s_t**2


def predict_u0(process: Process, eps_fn, u_t, t):
    """(ũ_t, the model's ũ_0 = (ũ_t − s_t ⊙ Vᵀε̂)/a_t) in DCT coefficients."""
    a, s = coefficients(process, t, u_t.shape)
    eps_hat = heat.dct_2d(eps_fn(u_t, jnp.asarray(t, jnp.float32)))
    u_t_dct = heat.dct_2d(u_t)
    return u_t_dct, (u_t_dct - s * eps_hat) / a


def blur_at(process: Process, t, shape):
    """d_t(λ) for images of `shape` (B, H, W, C) at times t (B,): (B, H, W, 1); ones without
    blurring."""
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    lam = heat.laplacian_eigenvalues(shape[1], shape[2])
    if process.blur is None:
        return jnp.ones(t.shape + lam.shape, jnp.float32)
    return process.blur(t, lam)


def _model_u0(process: Process, eps_fn, u_t, t, s, clip):
    """predict_u0, with clip: the blurred model image D_s u_0 = V(d_s ⊙ ũ_0), the only way u_0
    enters the step to s, clipped to [−1, 1] in pixels: Ho et al.'s clip of u_0 without
    blurring, and the one clip that keeps blurring diffusion's samples (docs/processes.md)."""
    u_t_dct, u0_dct = predict_u0(process, eps_fn, u_t, t)
    if clip:
        d_s = blur_at(process, s, u_t.shape)
        u0_dct = heat.dct_2d(jnp.clip(heat.idct_2d(d_s * u0_dct), -1.0, 1.0)) / d_s
    return u_t_dct, u0_dct


def model_mean(process: Process, eps_fn, u_t, t, s, clip=False):
    """μ_θ(u_t): the mean of p(u_s | u_t) = q(u_s | u_t, u_0 = the model's u_0), in pixels;
    at s = 0 the model's u_0 itself (clip: _model_u0's)."""
    u_t_dct, u0_dct = _model_u0(process, eps_fn, u_t, t, s, clip)
    a_s, s_s = coefficients(process, s, u_t.shape)
    a_t, s_t = coefficients(process, t, u_t.shape)
    coef_t, coef_0, _ = posterior(a_s, s_s, a_t, s_t)
    s = jnp.asarray(s, jnp.float32).reshape(-1, 1, 1, 1)
    return heat.idct_2d(jnp.where(s > 0, coef_t * u_t_dct + coef_0 * u0_dct, u0_dct))


def training_times(process: Process, key, batch: int):
    """t ~ U(0, 1) (continuous) or t = i/N with i ~ U{1..N}, shape (batch,)."""
    if process.continuous:
        return jax.random.uniform(key, (batch,), jnp.float32)
    N = process.num_levels
    return jax.random.randint(key, (batch,), 1, N + 1).astype(jnp.float32) / N


def epsilon_loss(process: Process, eps_fn, u0, key):
    """L_simple of Ho et al. (Eq. 14): ‖ε − ε_θ(u_t, t)‖², the mean over pixels (as their code
    takes it) and over the batch."""
    t_key, eps_key = jax.random.split(key)
    t = training_times(process, t_key, u0.shape[0])
    eps = jax.random.normal(eps_key, u0.shape, jnp.float32)
    return jnp.mean(jnp.square(eps - eps_fn(q_sample(process, u0, t, eps), t)))


def ancestral_step(process: Process, eps_fn, u_t, t, s, noise, clip=False):
    """One draw of p(u_s | u_t): μ_θ(u_t) + V(√var ⊙ Vᵀnoise); at s = 0 the model's u_0
    (clip: model_mean's)."""
    _, var = _step_var(process, t, s, u_t.shape)
    return model_mean(process, eps_fn, u_t, t, s, clip) + heat.idct_2d(
        jnp.sqrt(jnp.maximum(var, 0.0)) * heat.dct_2d(noise)
    )


def ddim_step(process: Process, eps_fn, u_t, t, s, eta, noise, clip=False):
    """The DDIM step from t to s < t (Song et al., ICLR 2021, Eq. 12), per frequency:
    ũ_s = a_s ũ_0 + √(s_s² − η² var) ε̂ + η √var z̃, with ũ_0 the model's (clip: _model_u0's),
    ε̂ = (ũ_t − a_t ũ_0)/s_t the noise that ũ_0 leaves, and var the variance of q(ũ_s | ũ_t,
    ũ_0) (`posterior`). Every marginal q(ũ_s | ũ_0) = N(a_s ũ_0, s_s²) is kept; η = 1 is the
    ancestral step (the same mean and variance), η = 0 deterministic. At s = 0 the model's u_0.
    """
    u_t_dct, u0_dct = _model_u0(process, eps_fn, u_t, t, s, clip)
    a_s, s_s = coefficients(process, s, u_t.shape)
    a_t, s_t = coefficients(process, t, u_t.shape)
    _, _, var = posterior(a_s, s_s, a_t, s_t)
    var = eta**2 * jnp.maximum(var, 0.0)
    eps_hat = (u_t_dct - a_t * u0_dct) / s_t
    step = a_s * u0_dct + jnp.sqrt(jnp.maximum(s_s**2 - var, 0.0)) * eps_hat
    step = step + jnp.sqrt(var) * heat.dct_2d(noise)
    s = jnp.asarray(s, jnp.float32).reshape(-1, 1, 1, 1)
    return heat.idct_2d(jnp.where(s > 0, step, u0_dct))


def _step_var(process, t, s, shape):
    a_s, s_s = coefficients(process, s, shape)
    a_t, s_t = coefficients(process, t, shape)
    s = jnp.asarray(s, jnp.float32).reshape(-1, 1, 1, 1)
    _, coef_0, var = posterior(a_s, s_s, a_t, s_t)
    return coef_0, jnp.where(s > 0, var, 0.0)


def time_grid(process: Process, steps: int = 0) -> np.ndarray:
    """The sampler's times t_i = i/N, i = 0..N, float32, for N = steps (0: the process's
    num_levels). The posterior holds between any s < t, so fewer steps skip levels; a discrete
    process needs N to divide its num_levels."""
    N = steps or process.num_levels
    if not process.continuous and process.num_levels % N:
        raise ValueError(f'{N} steps do not divide the {process.num_levels} levels.')
    return np.arange(N + 1, dtype=np.float32) / np.float32(N)


def sample_with_noise(
    process: Process, eps_fn, u_N, noise, trajectory_steps: Sequence[int] = (), num_steps: int = 0
):
    """Ancestral sampling on the grid t_i = i/N (time_grid), i = N..1, from u_N: u_{i−1} ~
    p(u_{t_{i−1}} | u_{t_i}), the last step returning the model's u_0 (Ho et al., Alg. 2), with
    model_mean's clip at every step (Ho et al.'s clip of u_0 without blurring).
    noise(i) gives the unit noise of grid point i (sampling.example_noise). Returns (u_0,
    trajectory): the states at trajectory_steps (grid points in 0..N), (len, B, H, W, C)."""
    times = jnp.asarray(time_grid(process, num_steps))
    batch = u_N.shape[0]

    def step(u, i, eps):
        t = jnp.full((batch,), times[i], jnp.float32)
        s = jnp.full((batch,), times[i - 1], jnp.float32)
        return ancestral_step(process, eps_fn, u, t, s, eps, clip=True)

    return sampling.chain(step, u_N, len(times) - 1, noise, trajectory_steps)


# ---- the negative ELBO (Ho et al., Eq. 5) ---------------------------------------------------


def prior_kl(process: Process, u0):
    """L_T = D_KL[q(u_1 | u_0) ‖ N(0, V diag(c²) Vᵀ)] per example, in nats (frequency sum)."""
    t = jnp.ones((u0.shape[0],), jnp.float32)
    a, s = coefficients(process, t, u0.shape)
    c2 = noise_spectrum(process, u0.shape) ** 2
    mean = a * heat.dct_2d(u0)
    kl = 0.5 * (s**2 / c2 + mean**2 / c2 - 1.0 - jnp.log(s**2 / c2))
    return jnp.sum(kl, axis=(1, 2, 3))


def level_kl(process: Process, eps_fn, u0, i, eps):
    """L_{i−1} = D_KL[q(u_{t_{i−1}} | u_{t_i}, u_0) ‖ p_θ(u_{t_{i−1}} | u_{t_i})] for i ≥ 2, one
    draw u_{t_i} = q_sample(.., eps); per example, nats. Both have the posterior's variance, so
    the KL is Σ_λ coef_0² (ũ_0 − ũ_0,θ)²/(2 var)."""
    N = process.num_levels
    t = jnp.asarray(i, jnp.float32) / N
    s = (jnp.asarray(i, jnp.float32) - 1) / N
    u_t = q_sample(process, u0, t, eps)
    _, u0_hat = predict_u0(process, eps_fn, u_t, t)
    coef_0, var = _step_var(process, t, s, u0.shape)
    return jnp.sum(0.5 * coef_0**2 * (heat.dct_2d(u0) - u0_hat) ** 2 / var, axis=(1, 2, 3))


def decoder_std(process: Process, shape):
    """The std of the decoder p(x | u_{t_1}): √(mean over frequencies of s_{t_1}(λ)²), the mean
    per-pixel variance of q(u_{t_1} | u_0); Ho et al.'s σ_1 = √β_1 for DDPM. Shape (1,)."""
    _, s = coefficients(process, jnp.full((1,), 1.0 / process.num_levels), shape)
    return jnp.sqrt(jnp.mean(s**2, axis=(1, 2, 3)))


def discretized_gaussian_log_likelihood(x, mean, std):
    """log ∫ N(y; mean, std²) dy over the bin of each 8-bit value x in [−1, 1] (Ho et al.,
    Eq. 13): bins of width 2/255 around x, the outermost open to ±∞; summed over pixels."""
    upper = jnp.where(x > 0.999, jnp.inf, (x - mean + 1.0 / 255) / std)
    lower = jnp.where(x < -0.999, -jnp.inf, (x - mean - 1.0 / 255) / std)
    # log(Φ(upper) − Φ(lower)) without cancellation: mirror bins above the mean.
    flip = (upper + lower) > 0
    hi, lo = jnp.where(flip, -lower, upper), jnp.where(flip, -upper, lower)
    log_hi = jax.scipy.special.log_ndtr(hi)
    log_p = log_hi + jnp.log1p(-jnp.exp(jax.scipy.special.log_ndtr(lo) - log_hi))
    return jnp.sum(log_p, axis=tuple(range(1, x.ndim)))


def decoder_nll(process: Process, eps_fn, x, eps):
    """L_0 = −log p_θ(x | u_{t_1}), the discretised Gaussian of mean the model's u_0 and std
    decoder_std, for 8-bit data x scaled to [−1, 1]; one draw u_{t_1}; per example, nats."""
    t = jnp.full((x.shape[0],), 1.0 / process.num_levels, jnp.float32)
    u_t = q_sample(process, x, t, eps)
    _, u0_hat = predict_u0(process, eps_fn, u_t, t)
    return -discretized_gaussian_log_likelihood(
        x, heat.idct_2d(u0_hat), decoder_std(process, x.shape)
    )


def level_term(process: Process, eps_fn, x, i, eps):
    """L_{i−1} for i ≥ 2 (level_kl) and L_0 for i = 1 (decoder_nll), per example, nats;
    Σ_{i=1..N} of it plus prior_kl is the negative ELBO of Ho et al.'s Eq. (5)."""
    i = jnp.asarray(i, jnp.int32)
    return jnp.where(
        i == 1,
        decoder_nll(process, eps_fn, x, eps),
        level_kl(process, eps_fn, x, jnp.maximum(i, 2), eps),
    )


def to_bits_per_dim(nats, num_dims):
    """bits/dim of 8-bit data from a discrete likelihood in nats (no dequantisation offset)."""
    return np.asarray(nats) / (num_dims * np.log(2.0))
