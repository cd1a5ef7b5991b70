"""The process and sampler contracts (processes.Process, samplers.Sampler): a new process and a
new sampler, written here against the contracts alone and registered, run through the jobs of
--mode=sample and --mode=eval like the built-in ones."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_checkpoint

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import diffusion
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import samplers
from ihdm_jax import sampling
from ihdm_jax import state as state_lib
from ihdm_jax.evaluation import likelihood

BETA_1, BETA_T = 1e-3, 0.25


@processes.register
class LinearBetaInPixels(processes.Process):
    """DDPM (Ho et al.) with its own ᾱ table, in pixels: ε-prediction at network input 1000·t,
    ancestral sampling with the clip of u_0, and Eq. 5's ELBO, from diffusion.py's functions of
    a diffusion.Process with white noise and no blur."""

    name = 'test_linear_beta'

    def __init__(self, config):
        super().__init__(config)
        alpha_bar = np.cumprod(
            np.concatenate([[1.0], 1 - np.linspace(BETA_1, BETA_T, self.levels)])
        )

        def alpha_sigma(t):
            i = jnp.round(jnp.asarray(t, jnp.float32) * self.levels).astype(jnp.int32)
            return (
                jnp.asarray(np.sqrt(alpha_bar), jnp.float32)[i],
                jnp.asarray(np.sqrt(1 - alpha_bar), jnp.float32)[i],
            )

        self.gaussian = diffusion.Process(alpha_sigma, None, None, self.levels, continuous=False)

    def _net(self, f):
        return lambda u, t: f(u, 1000.0 * t)

    def loss(self, f, x, key):
        return diffusion.epsilon_loss(self.gaussian, self._net(f), 2.0 * x - 1.0, key)

    def prior(self, key, x, delta):
        return diffusion.prior_sample(self.gaussian, key, x.shape)  # N(0, I) drawn in the DCT basis

    def grid(self, steps):
        return diffusion.time_grid(self.gaussian, steps)

    def reverse_step(self, f, u, t, s, delta, eps):
        full = lambda v: jnp.full((u.shape[0],), v, jnp.float32)  # noqa: E731
        return diffusion.ancestral_step(
            self.gaussian, self._net(f), u, full(t), full(s), eps, clip=True
        )

    def ddim_step(self, f, u, t, s, eta, delta, eps):
        full = lambda v: jnp.full((u.shape[0],), v, jnp.float32)  # noqa: E731
        return diffusion.ddim_step(
            self.gaussian, self._net(f), u, full(t), full(s), eta, eps, clip=True
        )

    def mean(self, f, u, k):
        full = lambda v: jnp.full((u.shape[0],), v / self.levels, jnp.float32)  # noqa: E731
        return diffusion.model_mean(self.gaussian, self._net(f), u, full(k), full(k - 1))

    def level_state(self, x, k, key):
        t = jnp.full((x.shape[0],), k / self.levels, jnp.float32)
        return diffusion.q_sample(self.gaussian, 2.0 * x - 1.0, t, jax.random.normal(key, x.shape))

    def to_image(self, u):
        return (u + 1.0) / 2.0

    def level_label(self, k):
        return f'k={k}'

    def elbo_example(self, f, x, key, pass_keys, delta):
        """Every level's term once (no Monte Carlo), and L_T."""
        u0 = x.astype(jnp.float32) / 127.5 - 1.0
        eps = jax.random.normal(key, u0.shape)
        terms = jnp.stack(
            [
                diffusion.level_term(self.gaussian, self._net(f), u0, jnp.array([i]), eps)[0]
                for i in range(1, self.levels + 1)
            ]
        )
        return terms, diffusion.prior_kl(self.gaussian, u0)[0]

    def elbo_terms(self, outputs, delta, kde_bound):
        terms, l_T = outputs
        means = terms.mean(axis=0)
        return likelihood.ElboTerms(
            L_K=float(l_T.mean()),
            sum_L_k=float(means[1:].sum()),
            L_0=float(means[0]),
            nats=float(l_T.mean() + means.sum()),
            level_nats=means.tolist(),
        )

    def psd_curves(self, x, eps, levels):
        return []


@samplers.register
class MeanOnly(samplers.Sampler):
    """Every step the process's reverse step without its noise."""

    name = 'test_mean_only'

    def step(self, f, u, i, delta, eps):
        grid = jnp.asarray(self.grid)
        return self.process.reverse_step(f, u, grid[i], grid[i - 1], delta, jnp.zeros_like(eps))


@pytest.fixture(scope='module')
def linear_beta(config, tmp_path_factory):
    """(config, workdir) of the test process and, with the same parameters, of the built-in
    DDPM of the same β schedule."""
    ours = config.copy_and_resolve_references()
    ours.model.process = LinearBetaInPixels.name
    ours.evaluation.num_examples = 8
    builtin = ours.copy_and_resolve_references()
    builtin.model.process = 'ddpm'
    builtin.model.beta_min, builtin.model.beta_max = BETA_1, BETA_T
    return [
        (c, write_checkpoint(c, tmp_path_factory.mktemp(c.model.process), 3))
        for c in (ours, builtin)
    ]


def test_a_new_process_samples_as_the_builtin_ddpm_does(linear_beta):
    """--mode=sample of the test process equals that of the built-in DDPM with the same
    schedule and parameters (the jobs go through the contract alone)."""
    samples = []
    for config, workdir in linear_beta:
        main.run(config, 'sample', workdir)
        samples.append(np.load(os.path.join(workdir, 'samples', 'samples.npz'))['images'])
    assert samples[0].std() > 10
    # Float32 chains through two programs; measured: no sample differs.
    assert np.abs(samples[0].astype(int) - samples[1]).max() <= 1


def test_a_new_process_evaluates_its_own_elbo(linear_beta):
    """--mode=eval of the test process: its terms from its own elbo_terms (every level once,
    no +8 offset), their sum, and L_T and L_0 as the built-in DDPM's of the same schedule."""
    results = []
    for config, workdir in linear_beta:
        main.run(config, 'eval', workdir)
        with open(os.path.join(workdir, 'eval', 'likelihood.json')) as f:
            results.append(json.load(f))
    ours, builtin = results
    assert ours['offset'] == 0.0 and len(ours['level_nats']) == 10
    assert ours['bits_per_dim'] == pytest.approx(
        ours['L_K'] + ours['sum_L_k'] + ours['L_0'], rel=1e-9
    )
    # L_T in closed form and L_0 of the same decoder draw (each example's own key): measured
    # equal. Σ L_k differs: every level here, a Monte-Carlo estimate in the built-in one.
    assert ours['L_K'] == pytest.approx(builtin['L_K'], rel=1e-6)
    assert ours['L_0'] == pytest.approx(builtin['L_0'], rel=1e-6)


def test_a_new_sampler_runs_through_the_sample_job(trained, config, tmp_path):
    """--mode=sample with the test sampler is Alg. 2 at δ = 0 after the KDE prior's draw."""
    import shutil

    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    mean_only = config.copy_and_resolve_references()
    mean_only.sampling.sampler = MeanOnly.name
    main.run(mean_only, 'sample', str(workdir))
    samples = np.load(workdir / 'samples' / 'samples.npz')['images']

    mesh = parallel.make_mesh()
    params, _ = checkpoint.restore_ema_params(config, str(workdir), mesh)
    sampler = programs.Sampler(config, mesh)
    prior_key, _ = jax.random.split(jax.random.fold_in(rng.sample_key(config.seed), 0))
    u_K = sampler.prior_states(data.make_source(config), 0, config.sampling.batch_size, prior_key)
    f = programs.residual(state_lib.model_graphdef(config))
    expected, _ = sampling.sample_with_noise(
        lambda u, k: f(params, u, k), u_K, config.model.K, 0.0, lambda k: jnp.zeros(u_K.shape)
    )
    reference = np.round(np.clip(np.asarray(expected), 0, 1) * 255)
    assert np.abs(samples - reference).max() <= 1
    main.run(config, 'sample', str(workdir))  # the ancestral sampler: Alg. 2 with its δ noise
    assert (
        np.abs(np.load(workdir / 'samples' / 'samples.npz')['images'].astype(int) - samples).max()
        > 10
    )
