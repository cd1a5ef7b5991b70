"""The analysis jobs on a briefly trained tiny model: their files and the properties that define
each mode, checked against plain step-by-step chains and brute-force numpy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from PIL import Image

from configs import tiny
from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import parallel
from ihdm_jax import train
from ihdm_jax.analysis import jobs
from ihdm_jax.models import unet


@pytest.fixture(scope='session')
def run(tmp_path_factory):
    """A 2-step tiny run, with analysis settings small enough for a test."""
    config = tiny.get_config()
    config.training.n_iters = 2
    config.training.log_freq = 2
    a = config.analysis
    a.num_rows, a.num_columns, a.num_points = 2, 4, 3
    a.num_trees, a.split_fractions, a.branches = 1, (0.5,), 4
    a.level_fractions = (0.1, 0.5, 1.0)
    a.num_images = 64
    a.gradient_pixels = ((0.5, 0.5), (0.25, 0.75))
    a.blur_sigma_maxes = (0.5, 1.0, 2.0, 4.0)
    config.evaluation.train_chunk = 1000  # the prior's 1500 training images in two parts
    a.num_neighbours = 2
    workdir = tmp_path_factory.mktemp('analysis')
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


@pytest.fixture(scope='session')
def mu(run):
    """μ(u, k) = u + f(u, k) of the run's EMA parameters, for a batch of 4, k a Python int."""
    config, workdir = run
    params, _ = train.restore_ema_params(config, str(workdir), parallel.make_mesh())
    graphdef = train.model_graphdef(config)
    step = jax.jit(lambda u, k: u + unet.apply(graphdef, params, u, k, train=False))
    return lambda u, k: np.asarray(step(jnp.asarray(u, jnp.float32), jnp.full((4,), k,
                                                                             jnp.int32)))


def _chain(mu, u_K, K, delta, key_at_level):
    """Alg. 2 one level at a time: u ← μ(u, k) + δ ε_k with ε_k of example b drawn from
    fold_in(key_at_level(k)[b], k); no noise at k = 1. Returns {k: u_k}."""
    u, states = np.asarray(u_K, np.float32), {K: np.asarray(u_K)}
    for k in range(K, 0, -1):
        u = mu(u, k)
        if k > 1:
            u = u + delta * np.stack([jax.random.normal(jax.random.fold_in(key, k), u.shape[1:])
                                      for key in key_at_level(k)])
        states[k - 1] = u
    return states


def _out(workdir, mode):
    return workdir / 'analysis' / mode


def test_same_init_rows_share_their_start(run):
    config, workdir = run
    jobs.same_init(config, str(workdir))
    out = _out(workdir, 'same_init')
    saved = np.load(out / 'same_init.npz')
    samples, u_K = saved['images'], saved['u_K']
    assert samples.shape == (2, 4, 8, 8, 1) and samples.dtype == np.uint8
    for row in range(2):
        for column in range(1, 4):
            np.testing.assert_array_equal(u_K[row, column], u_K[row, 0])
            assert not np.array_equal(samples[row, column], samples[row, 0])
    assert not np.allclose(u_K[0, 0], u_K[1, 0])
    assert Image.open(out / 'trajectory.gif').n_frames == config.model.K + 1
    assert Image.open(out / 'same_init.png').size[0] > 5 * 64


def test_share_noise_with_one_start_gives_identical_rows(run, monkeypatch):
    config, workdir = run
    one_state = jobs.prior_states

    def same_state(config, source, n, key):  # every column starts from the same u_K
        return np.repeat(one_state(config, source, 1, key), n, axis=0)
    monkeypatch.setattr(jobs, 'prior_states', same_state)
    jobs.share_noise(config, str(workdir))
    out = _out(workdir, 'share_noise')
    samples = np.load(out / 'share_noise.npz')['images']
    assert samples.shape == (2, 4, 8, 8, 1)
    for column in range(1, 4):
        np.testing.assert_array_equal(samples[:, column], samples[:, 0])
    assert not np.array_equal(samples[0, 0], samples[1, 0])  # another noise sequence
    assert (out / 'share_noise.png').exists() and (out / 'trajectory.gif').exists()


def test_interpolation_endpoints_are_the_endpoint_samples(run, mu):
    config, workdir = run
    jobs.interpolate(config, str(workdir))
    out = _out(workdir, 'interpolate')
    saved = np.load(out / 'interpolate.npz')
    frames = saved['images']
    assert frames.shape == (2, 3, 8, 8, 1)
    u_K = np.concatenate([saved['u_K_a'], saved['u_K_b']])
    keys = jax.random.wrap_key_data(np.concatenate([saved['noise_keys_a'],
                                                    saved['noise_keys_b']]))
    ends = _chain(mu, u_K, config.model.K, config.sampling.delta, lambda k: keys)[0]
    ends = np.round(np.clip(ends, 0, 1) * 255)
    np.testing.assert_allclose(frames[:, 0], ends[:2], atol=1)
    np.testing.assert_allclose(frames[:, -1], ends[2:], atol=1)
    assert not np.array_equal(frames[:, 1], frames[:, 0])
    assert Image.open(out / 'interpolate.gif').n_frames == 3
    assert (out / 'interpolate.png').exists()


def test_hierarchical_branches_equal_their_parent_before_the_split(run, mu):
    config, workdir = run
    jobs.hierarchical(config, str(workdir))
    out = _out(workdir, 'hierarchical')
    saved = np.load(out / 'hierarchical.npz')
    assert list(saved['levels']) == [5, 0]
    tree = {k: saved[f'level_{k}'][0] for k in (5, 0)}
    assert [tree[k].shape[0] for k in (5, 0)] == [1, 4]
    # Each of the 4 branches as one unbranched chain: the root's noise above level 5, then the
    # noise of branch i, fold_in(root, i).
    root = jax.random.wrap_key_data(saved['noise_keys'][0])
    branches = [jax.random.fold_in(root, i) for i in range(4)]
    states = _chain(mu, np.repeat(saved['u_K'][:1], 4, axis=0), config.model.K,
                    config.sampling.delta, lambda k: [root] * 4 if k > 5 else branches)
    np.testing.assert_allclose(states[5], np.repeat(tree[5], 4, axis=0), atol=1e-4)
    np.testing.assert_allclose(states[0], tree[0], atol=1e-4)
    assert not np.allclose(tree[0][0], tree[0][1], atol=1e-3)
    assert (out / 'hierarchical.png').exists()


def test_nearest_neighbours_are_the_closest_training_images(run):
    config, workdir = run
    jobs.nearest_neighbours(config, str(workdir))
    out = _out(workdir, 'nearest_neighbours')
    saved = np.load(out / 'nearest_neighbours.npz')
    source = data.make_source(config)
    training_images = source.load(np.arange(len(source)))
    training = training_images.astype(np.float64) / 255
    samples = saved['images'].astype(np.float64) / 255
    d = np.sqrt(((samples[:, None] - training[None]) ** 2).sum(axis=(2, 3, 4)))
    np.testing.assert_allclose(saved['distances'], np.sort(d, axis=1)[:, :2], rtol=1e-6)
    np.testing.assert_array_equal(saved['neighbours'][:, 0],
                                  training_images[saved['indices'][:, 0]])
    assert (out / 'nearest_neighbours.png').exists()


def test_input_gradients_match_finite_differences(run, mu):
    config, workdir = run
    jobs.input_gradients(config, str(workdir))
    out = _out(workdir, 'input_gradients')
    saved = np.load(out / 'input_gradients.npz')
    grads, inputs = saved['gradients'], saved['inputs']
    assert grads.shape == (2, 3, 8, 8, 1) and list(saved['levels']) == [1, 5, 10]
    assert [tuple(p) for p in saved['pixels']] == [(4, 4), (2, 6)]
    i, j = saved['pixels'][1]
    u, h = inputs[2], 1e-2
    # Central differences of μ(u, 10)[i, j] along the pixel itself and one neighbour.
    bumps = np.zeros((4,) + u.shape, np.float32)
    bumps[0, i, j], bumps[1, i, j], bumps[2, i + 1, j], bumps[3, i + 1, j] = h, -h, h, -h
    mu_ij = mu(u + bumps, 10)[:, i, j, 0]
    np.testing.assert_allclose([(mu_ij[0] - mu_ij[1]) / (2 * h), (mu_ij[2] - mu_ij[3]) / (2 * h)],
                               [grads[1, 2, i, j, 0], grads[1, 2, i + 1, j, 0]], atol=2e-3)
    assert (out / 'input_gradients.png').exists()


def test_psd_heat_from_below_and_diffusion_at_its_matched_floor(run):
    config, workdir = run
    jobs.psd(config, str(workdir))
    out = _out(workdir, 'psd')
    saved = json.loads((out / 'psd.json').read_text())
    data_psd = np.array(saved['data_psd'])
    assert np.isfinite(saved['power_law_exponent']) and len(data_psd) == 7
    previous = data_psd
    for level in saved['levels']:
        heat_psd = np.array(level['heat_psd'])
        assert np.all(heat_psd <= previous * (1 + 1e-4))  # blurring only removes power
        previous = heat_psd
        # As many contours above the diffusion's noise floor as above σ² after blurring.
        floor = (1 - level['alpha_bar']) / level['alpha_bar']
        assert np.sum(data_psd > floor * (1 + 1e-9)) == np.sum(heat_psd >= saved['sigma']**2)
    # At k = K the floor dominates: unit white noise scaled by (1 − ᾱ)/ᾱ lies on top of the data.
    noisy = np.array(saved['levels'][-1]['diffusion_psd'])
    np.testing.assert_allclose(np.mean(noisy - data_psd), floor, rtol=0.1)
    energy = np.array(saved['energy_by_blur'])
    assert energy.shape == (config.model.K, 7)
    assert np.all(np.diff(energy, axis=0) <= 1e-9)
    assert (out / 'psd.png').exists() and (out / 'energy_vs_blur.png').exists()


def test_prior_overlap_matches_brute_force_and_falls_with_blur(run):
    config, workdir = run
    jobs.prior_overlap(config, str(workdir))
    out = _out(workdir, 'prior_overlap')
    results = json.loads((out / 'prior_overlap.json').read_text())['results']
    nats = np.array([r['L_K_nats'] for r in results])
    assert [r['blur_sigma_max'] for r in results] == [0.5, 1.0, 2.0, 4.0]
    assert np.all(nats >= 0) and np.all(np.diff(nats) <= 1e-3)  # F(t) only shrinks distances
    np.testing.assert_allclose([r['L_K_bits_per_dim'] for r in results],
                               nats / (64 * np.log(2)), rtol=1e-6)
    # L_K ≤ log N − logsumexp_i(−KL[N(F u0, σ²) ‖ N(F x_i, δ²)]) at σ_B,max = 1, in float64.
    blur = lambda x: np.asarray(heat.heat_forward(x / 255, 0.5), np.float64)  # noqa: E731
    source = data.make_source(config)
    train_u = blur(source.load(np.arange(len(source)))).reshape(-1, 64)
    test_source = data.make_source(config, split='test')
    test_u = blur(test_source.load(np.arange(len(test_source)))).reshape(-1, 64)
    sigma, delta, n = config.model.sigma, config.sampling.delta, 64
    kl = (0.5 * (n * sigma**2 / delta**2 - n + 2 * n * np.log(delta / sigma))
          + ((test_u[:, None] - train_u[None]) ** 2).sum(-1) / (2 * delta**2))
    expected = np.mean(np.log(len(train_u)) - scipy.special.logsumexp(-kl, axis=1))
    np.testing.assert_allclose(nats[1], expected, rtol=1e-3)
    assert (out / 'prior_overlap.png').exists()
