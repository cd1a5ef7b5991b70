"""The forward processes: the contract every process implements, and the registry of processes
by config.model.process, the one place the jobs look a process up.

A process holds the forward process q(u_k | u_0) and what the reverse chain needs: the training
loss, the prior, one reverse step, the negative ELBO's terms and the PSD comparison curves, all
for the same U-Net f(u, k). Its `levels` K are the levels of the process (level K the prior,
level 0 the data); a sampler (samplers.py) runs the reverse chain on a grid of points that the
process gives (`grid`), and its `steps` are the grid's steps. Images come in and go out in
[0, 1]; a process may work on other values (the diffusion processes on 2x − 1) and maps its
states back with `to_image`.

A new process is a subclass of Process registered under its name (`register`); the config's
model.process then selects it, and every job uses it.
"""

import abc
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ihdm_jax import diffusion
from ihdm_jax import errors
from ihdm_jax import heat
from ihdm_jax import objective
from ihdm_jax import registry
from ihdm_jax import sampling
from ihdm_jax import schedule as schedule_lib
from ihdm_jax.analysis import spectra
from ihdm_jax.evaluation import likelihood


class Process(abc.ABC):
    """A forward process and its reverse chain (module docstring).

    `f` below is the network f(u, k) of processes' states u (B, H, W, C); k is whatever the
    process feeds it (int32 levels for the heat process). Everything traces under jax.jit.
    """

    name: str  # config.model.process
    # Modes the process does not define, and why (main.py refuses them).
    unsupported_modes: Mapping[str, str] = {}
    # bits/dim added to nats/(D ln 2): 8 for dequantised data (densities on [0, 1]), 0 for a
    # discrete likelihood of the 8-bit values.
    bits_offset: float = 0.0

    def __init__(self, config):
        self.levels = config.model.K

    @classmethod
    def check(cls, config):
        """errors.UserError if the config's settings do not suit the process."""

    # ---- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, f, x, key):
        """The training loss of images x (B, H, W, C) in [0, 1], a scalar."""

    # ---- sampling ----------------------------------------------------------------------------
    @abc.abstractmethod
    def prior(self, key, x, delta):
        """A draw of u_K for each of the training images x (B, H, W, C) in [0, 1] (which a
        prior may ignore), at sampling noise δ."""

    @abc.abstractmethod
    def grid(self, steps: int) -> np.ndarray:
        """The points of the reverse chain, (steps + 1,) ascending from the data (0) to the
        prior, in the units `reverse_step` takes; steps = 0: every level (`check` refuses the
        steps that do not suit the process)."""

    @abc.abstractmethod
    def reverse_step(self, f, u, t, s, delta, eps):
        """A draw of p(u_s | u_t) for grid points s < t (traced scalars), given unit noise eps."""

    @abc.abstractmethod
    def ddim_step(self, f, u, t, s, eta, delta, eps):
        """The DDIM step (Song et al., ICLR 2021) from grid point t to s < t with η = eta in
        [0, 1]: 1 the reverse step's marginals with fresh noise, 0 deterministic."""

    @abc.abstractmethod
    def mean(self, f, u, k):
        """The mean of the reverse step from level k to k − 1."""

    @abc.abstractmethod
    def level_state(self, x, k, key):
        """The state of level k for training images x in [0, 1] (the input of the step from k)."""

    def mix_states(self, a, b, weight):
        """States between the start states a and b at `weight` (0: a, 1: b) for interpolation."""
        return sampling.slerp(a, b, weight)

    def to_image(self, u):
        """A state as an image in [0, 1] (not clipped)."""
        return u

    @abc.abstractmethod
    def level_label(self, k) -> str:
        """How a figure names level k."""

    # ---- the negative ELBO -------------------------------------------------------------------
    @abc.abstractmethod
    def elbo_example(self, f, x, key, pass_keys, delta):
        """One test image's terms: x (1, H, W, C) uint8, a key and (passes,) keys of its own;
        a tuple of arrays that elbo_terms reads, each stacked over the test images."""

    @abc.abstractmethod
    def elbo_terms(self, outputs, delta, kde_bound) -> likelihood.ElboTerms:
        """The mean negative ELBO from elbo_example's outputs of every test image (float64
        numpy, in example order). kde_bound(u_K_means, t_K, sigma, delta) is elbo.prior_bounds
        against the training set, for a process whose prior is the KDE of Sec. 3.2."""

    # ---- analyses ----------------------------------------------------------------------------
    @abc.abstractmethod
    def psd_curves(self, x, eps, levels) -> list:
        """The radial PSD (spectra.radial_psd) of the states of training images x at `levels`
        (Fig. 4), one dict per level, with unit noise eps of x's shape."""

    def blur_sigmas(self):
        """σ_B of the levels 1..K where the process blurs by the heat equation, else None
        (the energy-against-blur figure of --mode=psd, Fig. 9)."""
        return None

    def heat_times(self, points):
        """The heat times t of grid points where the states are F(t) x + σ ε (restoration.py),
        float32 numpy; None for processes whose states are not."""
        return None


REGISTRY = registry.Registry('model.process')
register = REGISTRY.register


def check(config):
    """The process's checks of the config (errors.UserError)."""
    REGISTRY.lookup(config).check(config)


def check_mode(config, mode):
    """errors.UserError if `mode` is not defined for config.model.process."""
    why = REGISTRY.lookup(config).unsupported_modes.get(mode)
    if why:
        raise errors.UserError(
            f'--mode={mode} is not defined for config.model.process='
            f'{config.model.process!r} ({why}).'
        )


def from_config(config) -> Process:
    """The process of config.model.process."""
    return REGISTRY.lookup(config)(config)


@register
class Heat(Process):
    """IHDM as objective.py and sampling.py define it (Alg. 1, 2; the KDE prior; Eq. 7)."""

    name = 'heat'
    bits_offset = 8.0

    def __init__(self, config):
        super().__init__(config)
        self.schedule = schedule_lib.from_config(config)

    @classmethod
    def check(cls, config):
        K, steps, sampler = config.model.K, config.sampling.steps, config.sampling.sampler
        if steps < 0 or steps > K or (steps and K % steps):
            raise errors.UserError(
                f'config.sampling.steps={steps} must be 0 (all K levels) or a divisor of K = {K}.'
            )
        if steps and sampler != 'ancestral':
            raise errors.UserError(
                f'config.sampling.sampler={sampler!r} steps between neighbouring levels of '
                f"config.model.process='heat' only (steps = 0): its network estimates the next "
                "level's mean alone. Train with model.process='heat_continuous' to sample in "
                'fewer steps.'
            )

    def loss(self, f, x, key):
        return objective.training_loss(f, x, key, self.schedule.t, self.schedule.sigma)

    def prior(self, key, x, delta):
        """u_K = F(t_K) x + δ ε, the KDE prior around the training images x."""
        return sampling.prior_sample(key, x, self.schedule.t_K, delta)

    def grid(self, steps):
        """Every level, or every (K/steps)-th."""
        return np.arange(0, self.levels + 1, self.levels // (steps or self.levels), np.int32)

    def reverse_step(self, f, u, t, s, delta, eps):
        """Alg. 2's step from level t, taken as the state at level s (on a coarser grid than
        every level, each step un-blurs by one level where it should by t − s: Alg. 2 on a
        subsequence of the levels, which the network was not trained for); no noise when s is
        the data."""
        return sampling.alg2_step(f, u, t, jnp.where(s > 0, delta, 0.0), eps)

    def ddim_step(self, f, u, t, s, eta, delta, eps):
        """sampling.heat_ddim_step between neighbouring levels s = t − 1 (steps = 0): μ(u_t, t)
        estimates F(t_s) x̂_0, so F(t_t) x̂_0 = F(t_t − t_s) μ."""
        mean = self.mean(f, u, t)
        times = self.schedule.t
        mean_t = heat.heat_forward(mean, times[t] - times[s])
        return sampling.heat_ddim_step(mean, mean_t, u, eta, delta, eps, s == 0)

    def mean(self, f, u, k):
        """μ(u_k, k) = u_k + f(u_k, k)."""
        return u + f(u, jnp.full((u.shape[0],), k, jnp.int32))

    def level_state(self, x, k, key):
        """F(t_k) x, the noise-free blur."""
        del key
        return heat.heat_forward(x, self.schedule.t[k])

    def mix_states(self, a, b, weight):
        """Linearly (App. D.2)."""
        return sampling.lerp(a, b, weight)

    def level_label(self, k):
        return f'k={k}, σ_B={float(jnp.sqrt(2 * self.schedule.t[k])):.2f}'

    def elbo_times(self):
        """The heat times t_0..t_N of Eq. 7's levels: the K levels of the schedule."""
        return self.schedule.t

    def elbo_example(self, f, x, key, pass_keys, delta):
        """(level sums, level counts) of the passes (likelihood.level_pass) over the levels of
        elbo_times, and F(t_K) u0, for u0 the dequantised image."""
        t, sigma = self.elbo_times(), self.schedule.sigma
        u0 = likelihood.dequantize(key, x)

        def one_pass(totals, pass_key):
            sums, counts = likelihood.level_pass(f, u0, pass_key, t, sigma, delta)
            return (totals[0] + sums, totals[1] + counts), None

        zeros = jnp.zeros(t.shape, jnp.float32)
        (sums, counts), _ = jax.lax.scan(one_pass, (zeros, zeros), pass_keys)
        return sums, counts, heat.heat_forward(u0, t[-1])[0]

    def elbo_terms(self, outputs, delta, kde_bound):
        """Eq. 7: the per-level means (every level must have been drawn) and the App. A.3 bound
        on L_K against the training set (likelihood.assemble)."""
        sums, counts, u_K_means = outputs
        bounds = kde_bound(
            u_K_means=u_K_means.astype(np.float32),
            t_K=self.schedule.t_K,
            sigma=self.schedule.sigma,
            delta=delta,
        )
        return likelihood.assemble(bounds, sums.sum(axis=0), counts.sum(axis=0))

    def psd_curves(self, x, eps, levels):
        """F(t_k) x, and the variance-preserving diffusion x/√ᾱ + √((1 − ᾱ)/ᾱ) ε at the ᾱ of
        spectra.matched_alpha_bar, whose noise floor (1 − ᾱ)/ᾱ equals the data power at the
        lowest frequency the heat level has pushed below σ²."""
        sigma, t = self.schedule.sigma, np.asarray(self.schedule.t)
        _, data_psd = spectra.radial_psd(x)
        blur = jax.jit(heat.heat_forward)
        curves = []
        for k in levels:
            _, heat_psd = spectra.radial_psd(blur(x, t[k]))
            alpha_bar = spectra.matched_alpha_bar(data_psd, heat_psd, sigma)
            noisy = spectra.diffusion_forward(x, eps, alpha_bar) / np.sqrt(alpha_bar)
            curves.append(
                {
                    'k': k,
                    'blur_sigma': float(np.sqrt(2 * t[k])),
                    'heat_psd': heat_psd,
                    'alpha_bar': alpha_bar,
                    'diffusion_psd': spectra.radial_psd(noisy)[1],
                }
            )
        return curves

    def blur_sigmas(self):
        return np.sqrt(2 * np.asarray(self.schedule.t)[1:])

    def heat_times(self, points):
        return np.asarray(self.schedule.t)[np.asarray(points)]


@register
class HeatContinuous(Heat):
    """The heat process at continuous levels κ in [0, K] (heat.level_times: σ_B log-spaced
    between the integer levels of App. B.5, κ = 0 the data): the U-Net f(u, κ) estimates
    x̂_0(u_κ, κ) = E[u_0 | u_κ] as u_κ + f(u_κ, κ) (objective.x0_loss), from which every
    sampler steps between any two levels. At integer levels its mean F(t_{k−1}) x̂_0 takes the
    place of the paper's μ(u_k, k) in the analyses; the ELBO takes the sampler's grid."""

    name = 'heat_continuous'

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.time = lambda kappa: heat.level_times(kappa, m.K, m.blur_sigma_min, m.blur_sigma_max)
        self.sampler_grid = self.grid(config.sampling.steps)

    @classmethod
    def check(cls, config):
        m, steps = config.model, config.sampling.steps
        if m.K < 2:
            raise errors.UserError(
                f'config.model.K={m.K}: config.model.process={m.process!r} needs at least 2 '
                'levels (the ends of its log-spaced σ_B).'
            )
        if steps < 0:
            raise errors.UserError(
                f'config.sampling.steps={steps} must be 0 (all K levels) or a number of steps.'
            )

    def x0(self, f, u, kappa):
        """x̂_0(u, κ) = u + f(u, κ) at the level κ (a scalar)."""
        return u + f(u, jnp.full((u.shape[0],), kappa, jnp.float32))

    def loss(self, f, x, key):
        return objective.x0_training_loss(f, x, key, self.time, self.levels, self.schedule.sigma)

    def grid(self, steps):
        """κ = 0 and `steps` levels (0: K) evenly spaced in [1, K], i.e. log-spaced in σ_B."""
        levels = np.linspace(1.0, self.levels, steps or self.levels)
        return np.concatenate([[0.0], levels]).astype(np.float32)

    def reverse_step(self, f, u, t, s, delta, eps):
        """Alg. 2's step between any levels: F(t_s) x̂_0 + δ ε (the DDIM step at η = 1)."""
        return self.ddim_step(f, u, t, s, 1.0, delta, eps)

    def ddim_step(self, f, u, t, s, eta, delta, eps):
        """sampling.heat_ddim_step with F(t_s) x̂_0 and F(t_t) x̂_0 of x̂_0(u, t)."""
        x0 = self.x0(f, u, t)
        mean_s = heat.heat_forward(x0, self.time(s))
        mean_t = heat.heat_forward(x0, self.time(t))
        return sampling.heat_ddim_step(mean_s, mean_t, u, eta, delta, eps, s == 0)

    def level_residual(self, f):
        """The paper's f(u_k, k) = F(t_{k−1}) x̂_0(u_k, k) − u_k at integer levels k (B,)."""

        def residual(u, k):
            x0 = u + f(u, k.astype(jnp.float32))
            return heat.heat_forward(x0, self.schedule.t[k - 1]) - u

        return residual

    def mean(self, f, u, k):
        return super().mean(self.level_residual(f), u, k)

    def heat_times(self, points):
        return np.asarray(self.time(points))

    def elbo_times(self):
        """The heat times of the sampler's grid (config.sampling.steps; 0: the K levels)."""
        return self.time(self.sampler_grid)

    def elbo_example(self, f, x, key, pass_keys, delta):
        """Eq. 7 on the sampler's grid κ_0..κ_N: the term of grid level i has the mean
        F(t(κ_{i−1})) x̂_0(u_i, κ_i), the step that the ancestral sampler takes."""
        grid, t = jnp.asarray(self.sampler_grid), self.elbo_times()

        def residual(u, i):
            x0 = u + f(u, grid[i])
            return heat.heat_forward(x0, t[i - 1]) - u

        return super().elbo_example(residual, x, key, pass_keys, delta)


class Diffusion(Process):
    """A process of diffusion.py with ε-prediction by the U-Net at time input 1000·t, on states
    2x − 1 in [−1, 1] (Ho et al., Sec. 3.3)."""

    unsupported_modes = {
        'sweep_delta': 'δ is the sampling noise of the heat process (Eq. 8)',
        'delta_grid': 'δ is the sampling noise of the heat process (Eq. 8)',
        'prior_overlap': 'it bounds L_K of the KDE prior of the heat process (App. A.3)',
        'hierarchical': 'its chains split at levels of the heat sampler (Fig. 5b)',
        'trajectory_gradients': 'it probes the heat sampler along its chain (Fig. 8 right, 13b)',
        'restore': 'restoration starts the chain from the input as a state of the heat process',
    }

    def __init__(self, config):
        super().__init__(config)
        self.process = self.make(config.model)
        self.levels = self.process.num_levels

    @staticmethod
    @abc.abstractmethod
    def make(model) -> diffusion.Process:
        """The diffusion.Process of config.model."""

    @classmethod
    def check(cls, config):
        m, steps = config.model, config.sampling.steps
        if m.K < 2:
            raise errors.UserError(
                f'config.model.K={m.K}: config.model.process={m.process!r} '
                'needs at least 2 levels (the decoder at t_1 and the steps '
                'above it).'
            )
        continuous = cls.make(m).continuous
        if steps < 0 or steps > m.K or (not continuous and steps and m.K % steps):
            raise errors.UserError(
                f'config.sampling.steps={steps} must be 0 (all K levels) or, '
                f'for config.model.process={m.process!r}, '
                + ('at most K' if continuous else 'a divisor of K')
                + f' = {m.K}.'
            )

    @staticmethod
    def eps_fn(f):
        return lambda u, t: f(u, diffusion.TIME_SCALE * t)

    def loss(self, f, x, key):
        return diffusion.epsilon_loss(self.process, self.eps_fn(f), 2.0 * x - 1.0, key)

    def prior(self, key, x, delta):
        """u_K ~ N(0, V diag(c²) Vᵀ); the training images and δ play no part."""
        del delta
        return diffusion.prior_sample(self.process, key, x.shape)

    def grid(self, steps):
        """The times i/N of diffusion.time_grid."""
        return diffusion.time_grid(self.process, steps)

    def reverse_step(self, f, u, t, s, delta, eps):
        """diffusion.ancestral_step with the sampler's clip (δ plays no part)."""
        del delta
        batch = u.shape[0]
        return diffusion.ancestral_step(
            self.process,
            self.eps_fn(f),
            u,
            jnp.full((batch,), t, jnp.float32),
            jnp.full((batch,), s, jnp.float32),
            eps,
            clip=True,
        )

    def ddim_step(self, f, u, t, s, eta, delta, eps):
        """diffusion.ddim_step with the sampler's clip (δ plays no part)."""
        del delta
        batch = u.shape[0]
        return diffusion.ddim_step(
            self.process,
            self.eps_fn(f),
            u,
            jnp.full((batch,), t, jnp.float32),
            jnp.full((batch,), s, jnp.float32),
            eta,
            eps,
            clip=True,
        )

    def mean(self, f, u, k):
        """The mean of p(u_{k−1} | u_k) (the model's u_0 at k = 1), for u in [−1, 1]."""
        batch = u.shape[0]
        t = jnp.full((batch,), k / self.levels, jnp.float32)
        s = jnp.full((batch,), (k - 1) / self.levels, jnp.float32)
        return diffusion.model_mean(self.process, self.eps_fn(f), u, t, s)

    def level_state(self, x, k, key):
        """A draw of q(u_k | 2x − 1)."""
        t = jnp.full((x.shape[0],), k / self.levels, jnp.float32)
        return diffusion.q_sample(
            self.process, 2.0 * x - 1.0, t, jax.random.normal(key, x.shape, jnp.float32)
        )

    def to_image(self, u):
        return (u + 1.0) / 2.0

    def level_label(self, k):
        return f'k={k}, t={k / self.levels:.3g}'

    def elbo_example(self, f, x, key, pass_keys, delta):
        """Ho et al.'s Eq. 5 for the 8-bit image scaled to [−1, 1] (no dequantisation): the
        (N + 1,) sums and counts of L_{i−1} over the passes' draws i ~ U{2..N}, L_0 (the
        discretised decoder, one draw) and L_T exactly."""
        del delta
        net, N = self.eps_fn(f), self.levels
        u0 = x.astype(jnp.float32) / 127.5 - 1.0

        def one_pass(totals, pass_key):
            i_key, eps_key = jax.random.split(pass_key)
            i = jax.random.randint(i_key, (1,), 2, N + 1)
            eps = jax.random.normal(eps_key, u0.shape, jnp.float32)
            kl = diffusion.level_kl(self.process, net, u0, i, eps)[0]
            return (totals[0].at[i[0]].add(kl), totals[1].at[i[0]].add(1.0)), None

        zeros = jnp.zeros((N + 1,), jnp.float32)
        (sums, counts), _ = jax.lax.scan(one_pass, (zeros, zeros), pass_keys)
        l_0 = diffusion.decoder_nll(
            self.process, net, u0, jax.random.normal(key, u0.shape, jnp.float32)
        )[0]
        return sums, counts, l_0, diffusion.prior_kl(self.process, u0)[0]

    def elbo_terms(self, outputs, delta, kde_bound):
        """Σ_{i=2..N} L_{i−1} estimated as (N − 1) times the mean of the drawn terms."""
        del delta, kde_bound
        sums, counts, l_0, l_T = outputs
        sums, counts = sums.sum(axis=0), counts.sum(axis=0)
        sum_kl = (self.levels - 1) * sums[2:].sum() / counts[2:].sum()
        return likelihood.ElboTerms(
            L_K=float(np.mean(l_T)),
            sum_L_k=float(sum_kl),
            L_0=float(np.mean(l_0)),
            nats=float(np.mean(l_T) + sum_kl + np.mean(l_0)),
            level_nats=[float(np.mean(l_0))]
            + [float(s / c) if c else None for s, c in zip(sums[2:], counts[2:])],
        )

    def psd_curves(self, x, eps, levels):
        """u_k/(2α_k) = (a_k/α_k) ⊙ x + (s_k/(2α_k)) ⊙ ε, a draw of q(u_k | 2x − 1) at the
        data's scale (the DC term, the only one the shift by −1 touches, is left out)."""
        curves = []
        for k in levels:
            t = np.full((len(x),), k / self.levels, np.float32)
            alpha, _ = self.process.alpha_sigma(t)
            u_k = diffusion.q_sample(self.process, 2.0 * x - 1.0, t, eps)
            psd_k = spectra.radial_psd(
                np.asarray(u_k) / (2.0 * np.asarray(alpha)[:, None, None, None])
            )[1]
            curves.append({'k': k, 't': k / self.levels, 'alpha': float(alpha[0]), 'psd': psd_k})
        return curves


@register
class Ddpm(Diffusion):
    name = 'ddpm'

    @staticmethod
    def make(model):
        return diffusion.ddpm(model.K, model.beta_min, model.beta_max)


@register
class Blurring(Diffusion):
    name = 'blurring'

    @staticmethod
    def make(model):
        return diffusion.blurring(model.K, model.blur_sigma_max, model.blur_d_min)


@register
class NonIsotropic(Diffusion):
    name = 'non_isotropic'

    @staticmethod
    def make(model):
        return diffusion.non_isotropic(
            model.K, model.noise_gamma, model.noise_c0, model.beta_min, model.beta_max
        )
