"""The samplers and the heat process at continuous levels, against references written here: the
exact posterior mean E[u_0 | u_t] of a small training set in place of the network (a
softmax-weighted mean of the images under N(F(t) x_i, σ² I)), float64 scipy DCTs, the
geometric spacing of the paper's σ_B, and the identity of DDIM at η = 1 with the ancestral
step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import posterior_oracle as oracle
import pytest
import scipy.fft
from conftest import write_checkpoint
from numpy_reference import heat as heat64
from posterior_oracle import SIGMA_MAX
from posterior_oracle import SIGMA_MIN
from posterior_oracle import K

from ihdm_jax import heat
from ihdm_jax import loading
from ihdm_jax import main
from ihdm_jax import processes
from ihdm_jax import rng
from ihdm_jax import samplers


def test_continuous_levels_interpolate_the_paper_schedule_geometrically():
    integer = np.asarray(heat.level_times(np.arange(K + 1.0), K, SIGMA_MIN, SIGMA_MAX))
    np.testing.assert_allclose(integer, heat.heat_times(K, SIGMA_MIN, SIGMA_MAX), rtol=1e-6)
    halves = np.asarray(heat.level_times(np.arange(1, K) + 0.5, K, SIGMA_MIN, SIGMA_MAX))
    sigma_b = np.sqrt(2 * integer)
    # σ_B halfway between two levels is their geometric mean.
    np.testing.assert_allclose(halves, sigma_b[1:-1] * sigma_b[2:] / 2, rtol=1e-6)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_a_ddim_step_keeps_the_marginal_of_every_frequency(config, eta):
    """u_t ~ q(u_t | x) = N(F(t) x, σ²): after one DDIM step with the exact posterior mean and
    δ = σ, each DCT coefficient of u_s has mean that of F(s) x and variance σ² (4000 draws; the
    other training image is far, so the posterior mean is x)."""
    sigma, draws = 0.05, 4000
    generator = np.random.default_rng(0)
    images = np.stack(
        [generator.uniform(0.0, 0.5, (8, 8, 1)), generator.uniform(0.5, 1.0, (8, 8, 1))]
    )
    process = processes.from_config(oracle.continuous(config, sigma))
    f = oracle.posterior_mean_residual(images, sigma)
    t, s = 12.0, 5.0
    z, eps = jax.random.normal(jax.random.key(1), (2, draws, 8, 8, 1))
    u_t = jnp.asarray(heat64(images[:1], oracle.time(t)), jnp.float32) + sigma * z
    u_s = np.asarray(jax.jit(lambda u, e: process.ddim_step(f, u, t, s, eta, sigma, e))(u_t, eps))

    coefficients = scipy.fft.dctn(u_s.astype(np.float64), axes=(1, 2), norm='ortho')
    expected = scipy.fft.dctn(heat64(images[:1], oracle.time(s))[0], axes=(0, 1), norm='ortho')
    standard_error = sigma / np.sqrt(draws)
    assert np.abs(coefficients.mean(axis=0) - expected).max() < 5 * standard_error
    # The variance's relative standard error is √(2/4000) = 2.2%.
    np.testing.assert_allclose(coefficients.var(axis=0), sigma**2, rtol=0.12)


def test_few_steps_of_the_posterior_mean_carry_the_noise_and_end_on_training_images(config):
    """Five DDIM steps with the exact posterior mean, from prior draws: at every grid point the
    state lies at noise σ from the blur of a training image (‖u − F(t) x_j‖² ≈ Dσ², the noise
    that x̂_0 leaves carried down), and the chains end on training images, several of them; at
    η = 0 (the probability-flow ODE's exponential integrator) and at η = 1 with fresh noise.
    Without the noise term (η = 1, δ = 0: each step F(s) x̂_0 alone) the states sit on the
    blurred images instead."""
    sigma, images = 0.2, oracle.digits(4)
    f = oracle.posterior_mean_residual(images, sigma)
    u_K = jnp.asarray(np.repeat(heat64(images, oracle.time(K)), 8, axis=0), jnp.float32)
    u_K = u_K + sigma * jax.random.normal(jax.random.key(2), u_K.shape)
    keys = jax.random.split(jax.random.key(5), len(u_K))
    fresh = lambda i: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (8, 8, 1)))(  # noqa: E731
        keys
    )

    def run(eta, delta, noise):
        """(‖u − F(t) x_j‖²/(Dσ²) of the nearest x_j at grid points 1..4, (4, 32); the largest
        pixel distance of each end to its nearest training image, and which image)."""
        c = oracle.continuous(config, sigma, sampler='ddim', steps=5, eta=eta)
        sampler = samplers.from_config(processes.from_config(c), c)
        assert sampler.steps == 5
        u_0, states = jax.jit(lambda u: sampler(f, u, delta, noise, record=(1, 2, 3, 4)))(u_K)
        ratios = []
        for state, kappa in zip(np.asarray(states), sampler.grid[1:5]):
            blurred = heat64(images, oracle.time(float(kappa)))
            squares = np.square(state[:, None] - blurred[None]).sum(axis=(2, 3, 4))
            ratios.append(squares.min(axis=1) / (64 * sigma**2))
        distances = np.abs(np.asarray(u_0)[:, None] - images[None]).max(axis=(2, 3, 4))
        return np.array(ratios), distances.min(axis=1), distances.argmin(axis=1)

    # Measured: ratios in [0.53, 1.51] (η = 0), [0.64, 1.53] (η = 1); 31 of 32 ends within
    # 1e-4 of an image.
    for eta, noise in ((0.0, lambda i: jnp.zeros_like(u_K)), (1.0, fresh)):
        ratios, nearest, which = run(eta, sigma, noise)
        assert 0.4 < ratios.min() and ratios.max() < 1.7
        assert np.quantile(nearest, 0.9) < 1e-3 and len(set(which)) >= 3
    ratios, _, _ = run(1.0, 0.0, lambda i: jnp.zeros_like(u_K))
    assert ratios.mean(axis=1).max() < 0.2


def _some_residual(u, k):
    """A network stand-in far from the identity that depends on the level."""
    return jnp.tanh(2.0 * u - 1.0) * (0.3 + 0.02 * k.astype(jnp.float32)[:, None, None, None])


@pytest.mark.parametrize('process', ['heat', 'ddpm'])
def test_ddim_at_eta_one_on_every_level_is_the_ancestral_sampler(config, process):
    """The same noise through both samplers gives the same samples to float32 rounding (for the
    heat process: Alg. 2)."""
    config = config.copy_and_resolve_references()
    config.model.process = process
    u = jax.random.uniform(jax.random.key(3), (4, 8, 8, 1)) * 2 - 1
    keys = jax.random.split(jax.random.key(4), 4)
    noise = lambda i: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), u.shape[1:]))(  # noqa: E731
        keys
    )
    outputs = []
    for name in ('ancestral', 'ddim'):
        c = config.copy_and_resolve_references()
        c.sampling.sampler, c.sampling.eta = name, 1.0
        sampler = samplers.from_config(processes.from_config(c), c)
        outputs.append(np.asarray(sampler(_some_residual, u, 0.0125, noise)[0]))
    assert np.abs(outputs[0]).max() > 0.5
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-5)


def test_alg2_on_a_subsequence_of_the_levels_of_the_paper_model(config):
    """steps = 5 of K = 10 levels: Alg. 2's steps from levels 10, 8, 6, 4 and 2, without
    noise after the last."""
    config = config.copy_and_resolve_references()
    config.sampling.steps = 5
    sampler = samplers.from_config(processes.from_config(config), config)
    np.testing.assert_array_equal(sampler.grid, [0, 2, 4, 6, 8, 10])
    u = jax.random.uniform(jax.random.key(6), (2, 8, 8, 1))
    noise = lambda i: jnp.full(u.shape, i, jnp.float32)  # noqa: E731
    expected = u
    for k in (10, 8, 6, 4, 2):
        expected = (
            expected + _some_residual(expected, jnp.full((2,), k)) + 0.01 * (k > 2) * (k // 2)
        )
    np.testing.assert_allclose(sampler(_some_residual, u, 0.01, noise)[0], expected, atol=1e-6)


@pytest.fixture(scope='module')
def continuous_run(config, tmp_path_factory):
    """A workdir of the tiny config with the heat process at continuous levels and a
    checkpoint far from the initialisation (written without training)."""
    config = oracle.continuous(config, 0.01, sampler='ddim', steps=3)
    config.model.K = 10
    config.evaluation.num_passes = 20  # every level drawn: 8 examples x 20 passes
    config.evaluation.num_examples = 8
    return config, write_checkpoint(config, tmp_path_factory.mktemp('continuous'), 3)


def test_a_continuous_model_samples_in_few_steps_and_evaluates_its_elbo(continuous_run):
    config, workdir = continuous_run
    samples = []
    for sampler, steps in (('ddim', 3), ('ancestral', 3), ('ddim', 0)):
        c = config.copy_and_resolve_references()
        c.sampling.sampler, c.sampling.steps = sampler, steps
        main.run(c, 'sample', workdir)
        samples.append(np.load(os.path.join(workdir, 'samples', 'samples.npz'))['images'])
    assert all(s.shape == (8, 8, 8, 1) and s.std() > 10 for s in samples)
    assert np.abs(samples[0].astype(int) - samples[1]).max() > 10
    assert np.abs(samples[0].astype(int) - samples[2]).max() > 10
    model = loading.load(workdir)  # its config.json: ddim, 3 steps
    floats = model.sample(rng.sample_key(config.seed), 8, sampler='ancestral')
    assert np.abs(np.round(np.clip(floats, 0, 1) * 255) - samples[1]).max() <= 1
    results = []
    for steps in (0, 3):  # Eq. 7 on the K levels, and on the 3-step grid
        c = config.copy_and_resolve_references()
        c.sampling.steps = steps
        main.run(c, 'eval', workdir)
        with open(os.path.join(workdir, 'eval', 'likelihood.json')) as f:
            results.append(json.load(f))
    assert [len(r['level_nats']) for r in results] == [10, 3]
    for result in results:
        assert result['bits_per_dim'] == pytest.approx(
            result['L_K'] + result['sum_L_k'] + result['L_0'] + 8.0, rel=1e-6
        )
    assert results[0]['L_K'] == results[1]['L_K']  # the same prior at κ = K
    assert abs(results[0]['sum_L_k'] - results[1]['sum_L_k']) > 0.1


@pytest.mark.parametrize('mode', ['same_init', 'hierarchical'])
def test_the_variants_run_the_continuous_model_s_sampler(continuous_run, mode):
    config, workdir = continuous_run
    config = config.copy_and_resolve_references()
    config.analysis.num_rows, config.analysis.num_points = 2, 3
    config.analysis.split_fractions = (0.7, 0.4)  # of the 3 steps: grid points 2 and 1
    main.run(config, mode, workdir)
    files = os.listdir(os.path.join(workdir, 'analysis', mode))
    assert any(name.endswith('.png') for name in files), files
