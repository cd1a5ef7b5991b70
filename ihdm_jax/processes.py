"""The forward process of a config (config.model.process), as the runtime and the jobs use it.

This is the one place that tells the heat process (IHDM: objective.py, sampling.py, the KDE
prior) from the Gaussian processes of diffusion.py (DDPM, blurring diffusion, non-isotropic
noise). Both kinds offer the same operations on the same U-Net f(u, k): the training loss, the
prior draw, the reverse chain, the model mean of one step and the input state of a level.

Images come in and go out in [0, 1] (the heat process works there); the diffusion processes
work on 2x − 1 in [−1, 1] (Ho et al., Sec. 3.3). Level k runs from K (the prior) to 0.
"""

import jax
import jax.numpy as jnp

from ihdm_jax import diffusion
from ihdm_jax import errors
from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax import sampling
from ihdm_jax import schedule as schedule_lib

NAMES = ('heat', 'ddpm', 'blurring', 'non_isotropic')
# Modes defined for the heat process only, and why.
HEAT_ONLY_MODES = {
    'sweep_delta': 'δ is the sampling noise of the heat process (Eq. 8)',
    'delta_grid': 'δ is the sampling noise of the heat process (Eq. 8)',
    'prior_overlap': 'it bounds L_K of the KDE prior of the heat process (App. A.3)',
    'hierarchical': 'its chains split at levels of the heat sampler (Fig. 5b)',
    'trajectory_gradients': 'it probes the heat sampler along its chain (Fig. 8 right, 13b)',
}


def check(config):
    """config.sampling.steps suits config.model.process (errors.UserError otherwise)."""
    m, steps = config.model, config.sampling.steps
    if m.process == 'heat':
        if steps:
            raise errors.UserError(f'config.sampling.steps={steps} applies to the diffusion '
                                   'processes; the heat process samples all K levels (0).')
        return
    if m.K < 2:
        raise errors.UserError(f'config.model.K={m.K}: config.model.process={m.process!r} needs '
                               'at least 2 levels (the decoder at t_1 and the steps above it).')
    if steps < 0 or steps > m.K or (m.process != 'blurring' and steps and m.K % steps):
        raise errors.UserError(f'config.sampling.steps={steps} must be 0 (all K levels) or, '
                               f'for config.model.process={m.process!r}, '
                               + ('at most K' if m.process == 'blurring' else 'a divisor of K')
                               + f' = {m.K}.')


def check_mode(config, mode):
    """errors.UserError if `mode` is not defined for config.model.process."""
    process = config.model.process
    if process != 'heat' and mode in HEAT_ONLY_MODES:
        raise errors.UserError(f'--mode={mode} is defined for the heat process only '
                               f'({HEAT_ONLY_MODES[mode]}); config.model.process={process!r}.')


def diffusion_process(config) -> diffusion.Process:
    """The diffusion.Process of config.model (process 'ddpm', 'blurring' or 'non_isotropic')."""
    m = config.model
    if m.process == 'ddpm':
        return diffusion.ddpm(m.K, m.beta_min, m.beta_max)
    if m.process == 'blurring':
        return diffusion.blurring(m.K, m.blur_sigma_max, m.blur_d_min)
    if m.process == 'non_isotropic':
        return diffusion.non_isotropic(m.K, m.noise_gamma, m.noise_c0, m.beta_min, m.beta_max)
    raise ValueError(f'Not a diffusion process: {m.process!r}.')


class Heat:
    """IHDM exactly as objective.py and sampling.py define it (Alg. 1, 2; the KDE prior)."""

    def __init__(self, config):
        self.schedule = schedule_lib.from_config(config)
        self.K = self.chain_levels = self.schedule.K

    def loss(self, f, x, key):
        return objective.training_loss(f, x, key, self.schedule.t, self.schedule.sigma)

    def prior(self, key, x, delta):
        """u_K from the KDE prior around the training images x (B, H, W, C)."""
        return sampling.prior_sample(key, x, self.schedule.t_K, delta)

    def chain(self, f, u_K, delta, noise, trajectory_steps=()):
        """u_0 (and the states at trajectory_steps) of Alg. 2, in [0, 1]."""
        return sampling.sample_with_noise(f, u_K, self.K, delta, noise, trajectory_steps)

    def mean(self, f, u, k):
        """μ(u_k, k) = u_k + f(u_k, k), the mean of the step from level k."""
        return u + f(u, jnp.full((u.shape[0],), k, jnp.int32))

    def level_state(self, x, k, key):
        """The input of level k for training images x: F(t_k) x (the noise-free blur)."""
        del key
        return heat.heat_forward(x, self.schedule.t[k])

    def interpolate(self, f, u_a, u_b, key_a, key_b, delta, num_points):
        """App. D.2 (sampling.interpolate): u_K linearly, the noise spherically."""
        return sampling.interpolate(f, u_a, u_b, key_a, key_b, self.K, delta, num_points)

    def level_label(self, k):
        return f'k={k}, σ_B={float(jnp.sqrt(2 * self.schedule.t[k])):.2f}'

    def to_image(self, u):
        return u


class Diffusion:
    """A process of diffusion.py with ε-prediction by the U-Net at time input 1000·t."""

    def __init__(self, config):
        self.process = diffusion_process(config)
        self.K = self.process.num_levels
        self.chain_levels = config.sampling.steps or self.K  # the sampler's levels

    @staticmethod
    def eps_fn(f):
        return lambda u, t: f(u, diffusion.TIME_SCALE * t)

    def loss(self, f, x, key):
        return diffusion.epsilon_loss(self.process, self.eps_fn(f), 2.0 * x - 1.0, key)

    def prior(self, key, x, delta):
        """u_K ~ N(0, V diag(c²) Vᵀ); the training images and δ play no part."""
        del delta
        return diffusion.prior_sample(self.process, key, x.shape)

    def chain(self, f, u_K, delta, noise, trajectory_steps=()):
        """Ancestral sampling from u_K; u_0 and the states in [0, 1] (δ plays no part)."""
        del delta
        out = diffusion.sample_with_noise(self.process, self.eps_fn(f), u_K, noise,
                                          trajectory_steps, self.chain_levels)
        return jax.tree.map(self.to_image, out)

    def mean(self, f, u, k):
        """The mean of p(u_{k−1} | u_k) (the model's u_0 at k = 1), for u in [−1, 1]."""
        batch = u.shape[0]
        t = jnp.full((batch,), k / self.K, jnp.float32)
        s = jnp.full((batch,), (k - 1) / self.K, jnp.float32)
        return diffusion.model_mean(self.process, self.eps_fn(f), u, t, s)

    def level_state(self, x, k, key):
        """A draw of q(u_k | 2x − 1) for training images x."""
        t = jnp.full((x.shape[0],), k / self.K, jnp.float32)
        return diffusion.q_sample(self.process, 2.0 * x - 1.0, t,
                                  jax.random.normal(key, x.shape, jnp.float32))

    def interpolate(self, f, u_a, u_b, key_a, key_b, delta, num_points):
        """Frames between two endpoints (u_K, noise keys), each (H, W, C) and a key: u_K and
        every level's noise interpolated spherically (a linear mix of two Gaussian draws would
        shrink towards 0), the frames then sampled as usual; (num_points, H, W, C) in [0, 1]."""
        weight = jnp.linspace(0.0, 1.0, num_points).reshape(-1, 1, 1, 1)
        u_K = sampling.slerp(u_a[None], u_b[None], weight)
        noise_a = sampling.example_noise(jnp.stack([key_a] * num_points), u_a.shape)
        noise_b = sampling.example_noise(jnp.stack([key_b] * num_points), u_a.shape)
        return self.chain(f, u_K, delta,
                          lambda k: sampling.slerp(noise_a(k), noise_b(k), weight))

    def level_label(self, k):
        return f'k={k}, t={k / self.K:.3g}'

    def to_image(self, u):
        return (u + 1.0) / 2.0


def from_config(config):
    """Heat or Diffusion for config.model.process."""
    return Heat(config) if config.model.process == 'heat' else Diffusion(config)
