"""The analysis jobs on conftest's checkpoint: their files and the properties that define each
mode, checked against plain step-by-step chains with the EMA parameters and brute-force numpy."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import scipy.fft
import scipy.special
from PIL import Image

from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import heat
from ihdm_jax import parallel
from ihdm_jax import programs
from ihdm_jax import rng
from ihdm_jax import state as state_lib
from ihdm_jax.analysis import spectra
from ihdm_jax.jobs import forward_process
from ihdm_jax.jobs import probing
from ihdm_jax.jobs import sample
from ihdm_jax.jobs import variants
from ihdm_jax.models import unet


@pytest.fixture(scope='module')
def analysis_config(config):
    """configs/tiny.py with analysis settings small enough for a test."""
    config = config.copy_and_resolve_references()
    a = config.analysis
    a.num_rows, a.num_columns, a.num_points = 2, 4, 3
    a.num_trees, a.split_fractions, a.branches = 1, (0.5,), 4
    a.level_fractions = (0.1, 0.5, 1.0)
    a.num_images = 64
    a.gradient_pixels = ((0.5, 0.5), (0.25, 0.75))
    a.blur_sigma_maxes = (0.5, 1.0, 2.0, 4.0)
    config.evaluation.train_chunk = 1000  # the prior's 1500 training images in two parts
    a.num_neighbours = 2
    a.deltas = (0.0, 0.0125, 0.05)
    return config


@pytest.fixture(scope='module')
def workdir(trained, tmp_path_factory):
    """A copy of conftest's checkpoint, since the jobs write into their workdir."""
    path = tmp_path_factory.mktemp('analysis') / 'run'
    shutil.copytree(trained, path)
    return path


@pytest.fixture(scope='module')
def mu(analysis_config, trained):
    """μ(u, k) = u + f(u, k) of the checkpoint's EMA parameters, for a batch u and a Python int
    k, in float32 as the jobs compute it."""
    params, _ = checkpoint.restore_ema_params(analysis_config, str(trained), parallel.make_mesh())
    graphdef = state_lib.model_graphdef(analysis_config)
    step = jax.jit(lambda u, k: u + unet.apply(graphdef, params, u, k, train=False))
    return lambda u, k: np.asarray(
        step(jnp.asarray(u, jnp.float32), jnp.full((len(u),), k, jnp.int32))
    )


@pytest.fixture(scope='module')
def training_images(analysis_config):
    source = data.make_source(analysis_config)
    return source.load(np.arange(len(source)))


def _noise(keys, k, shape):
    """ε_k of each chain: unit Gaussian noise from fold_in(key_b, k)."""
    return np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, k), shape)) for key in keys]
    )


def _chain(mu, u_K, K, delta, noise_at_level):
    """Alg. 2 one level at a time: u ← μ(u, k) + δ ε_k with ε_k = noise_at_level(k), no noise at
    k = 1. Returns {k: u_k}."""
    u, states = np.asarray(u_K, np.float32), {K: np.asarray(u_K)}
    for k in range(K, 0, -1):
        u = mu(u, k)
        if k > 1:
            u = u + delta * noise_at_level(k)
        states[k - 1] = u
    return states


def _keyed_chain(config, mu, u_K, raw_keys):
    """u_0 of the chains from u_K, chain b with the noise of key data raw_keys[b]."""
    keys = jax.random.wrap_key_data(np.asarray(raw_keys))
    return _chain(
        mu, u_K, config.model.K, config.sampling.delta, lambda k: _noise(keys, k, u_K.shape[1:])
    )[0]


def _grey(u):
    """Float images as the jobs' uint8 grey levels. Samples are compared to these within one
    level, for roundings on either side of a half; measured: none differ."""
    return np.round(np.clip(u, 0, 1) * 255)


def _prior(config, training_images, draw, n, key):
    """n draws of the KDE prior as the jobs document them, in float64: F(t_K) x + δ ε with x the
    training images of rng.prior_picks(seed, draw) and ε of draw b from split(key, n)[b]. The
    jobs' float32 states agree to 6.3e-8."""
    x = training_images[rng.prior_picks(config.seed, draw, n, len(training_images))] / 255.0
    t_K = float(
        heat.heat_times(config.model.K, config.model.blur_sigma_min, config.model.blur_sigma_max)[
            -1
        ]
    )
    eps = np.stack(
        [np.asarray(jax.random.normal(k, (1,) + x.shape[1:]))[0] for k in jax.random.split(key, n)]
    )
    return numpy_reference.heat(x, t_K) + config.sampling.delta * eps


def _key_data(key, n):
    return np.asarray(jax.random.key_data(jax.random.split(key, n)))


PRIOR_KEY = rng.analysis_key(0, rng.ANALYSIS_PRIOR)  # configs/tiny.py's seed is 0
NOISE_KEY = rng.analysis_key(0, rng.ANALYSIS_NOISE)


def _out(workdir, mode):
    return workdir / 'analysis' / mode


def test_same_init_rows_share_their_start(analysis_config, workdir, mu, training_images):
    config = analysis_config
    assert config.seed == 0
    variants.same_init(config, str(workdir))
    out = _out(workdir, 'same_init')
    saved = np.load(out / 'same_init.npz')
    samples, u_K = saved['images'], saved['u_K']
    assert samples.shape == (2, 4, 8, 8, 1) and samples.dtype == np.uint8
    starts = _prior(config, training_images, rng.ANALYSIS_DRAW, 2, PRIOR_KEY)
    np.testing.assert_allclose(u_K, np.repeat(starts[:, None], 4, axis=1), atol=5e-7)
    np.testing.assert_array_equal(saved['noise_keys'], _key_data(NOISE_KEY, 8))
    expected = _keyed_chain(config, mu, u_K.reshape(8, 8, 8, 1), saved['noise_keys'])
    np.testing.assert_allclose(samples.reshape(8, 8, 8, 1), _grey(expected), atol=1)
    for row in range(2):
        for column in range(1, 4):
            assert not np.array_equal(samples[row, column], samples[row, 0])
    assert Image.open(out / 'trajectory.gif').n_frames == config.model.K + 1
    assert Image.open(out / 'same_init.png').size[0] > 5 * 64


def test_share_noise_rows_share_their_noise(
    analysis_config, workdir, mu, training_images, monkeypatch
):
    config = analysis_config
    variants.share_noise(config, str(workdir))
    out = _out(workdir, 'share_noise')
    saved = np.load(out / 'share_noise.npz')
    samples, u_K, keys = saved['images'], saved['u_K'], saved['noise_keys']
    assert samples.shape == (2, 4, 8, 8, 1)
    np.testing.assert_allclose(
        u_K, _prior(config, training_images, rng.ANALYSIS_DRAW, 4, PRIOR_KEY), atol=5e-7
    )
    np.testing.assert_array_equal(keys, _key_data(NOISE_KEY, 2))
    # Sample (r, c) is the chain from u_K[c] with the noise of row r.
    expected = _keyed_chain(config, mu, np.tile(u_K, (2, 1, 1, 1)), np.repeat(keys, 4, axis=0))
    np.testing.assert_allclose(samples.reshape(8, 8, 8, 1), _grey(expected), atol=1)
    assert (out / 'share_noise.png').exists() and (out / 'trajectory.gif').exists()

    prior_states = programs.Sampler.prior_states

    def one_state(self, source, draw, n, key, delta=None, labels=None):  # columns start alike
        return np.repeat(prior_states(self, source, draw, 1, key, delta, labels), n, axis=0)

    monkeypatch.setattr(programs.Sampler, 'prior_states', one_state)
    variants.share_noise(config, str(workdir))
    samples = np.load(out / 'share_noise.npz')['images']
    for column in range(1, 4):
        np.testing.assert_array_equal(samples[:, column], samples[:, 0])
    assert not np.array_equal(samples[0, 0], samples[1, 0])  # another noise sequence


def _slerp(a, b, weight):
    """Noise of each example interpolated along the great circle, its norm linearly."""
    axes = tuple(range(1, a.ndim))
    norm_a = np.sqrt((a * a).sum(axes, keepdims=True))
    norm_b = np.sqrt((b * b).sum(axes, keepdims=True))
    omega = np.arccos((a * b).sum(axes, keepdims=True) / (norm_a * norm_b))
    direction = (
        np.sin((1 - weight) * omega) * a / norm_a + np.sin(weight * omega) * b / norm_b
    ) / np.sin(omega)
    return direction * ((1 - weight) * norm_a + weight * norm_b)


def test_interpolation_follows_its_endpoints_chains(analysis_config, workdir, mu, training_images):
    config = analysis_config
    variants.interpolate(config, str(workdir))
    out = _out(workdir, 'interpolate')
    saved = np.load(out / 'interpolate.npz')
    frames = saved['images']
    assert frames.shape == (2, 3, 8, 8, 1)
    for end, draw in (('a', 0), ('b', 1)):
        np.testing.assert_allclose(
            saved[f'u_K_{end}'],
            _prior(
                config,
                training_images,
                rng.ANALYSIS_DRAW + draw,
                2,
                jax.random.fold_in(PRIOR_KEY, draw),
            ),
            atol=5e-7,
        )
        np.testing.assert_array_equal(
            saved[f'noise_keys_{end}'], _key_data(jax.random.fold_in(NOISE_KEY, draw), 2)
        )
    u_K = np.concatenate([saved['u_K_a'], saved['u_K_b']])
    ends = _keyed_chain(
        config, mu, u_K, np.concatenate([saved['noise_keys_a'], saved['noise_keys_b']])
    )
    np.testing.assert_allclose(frames[:, 0], _grey(ends[:2]), atol=1)
    np.testing.assert_allclose(frames[:, -1], _grey(ends[2:]), atol=1)
    # The middle frame: halfway between the prior states, the noise halfway along the circle.
    keys_a, keys_b = (jax.random.wrap_key_data(saved[f'noise_keys_{end}']) for end in 'ab')
    middle = _chain(
        mu,
        (saved['u_K_a'] + saved['u_K_b']) / 2,
        config.model.K,
        config.sampling.delta,
        lambda k: _slerp(_noise(keys_a, k, (8, 8, 1)), _noise(keys_b, k, (8, 8, 1)), 0.5),
    )[0]
    np.testing.assert_allclose(frames[:, 1], _grey(middle), atol=1)
    assert not np.array_equal(frames[:, 1], frames[:, 0])
    assert Image.open(out / 'interpolate.gif').n_frames == 3
    assert (out / 'interpolate.png').exists()


def test_hierarchical_branches_are_chains_that_share_their_start(
    analysis_config, workdir, mu, training_images
):
    config = analysis_config
    variants.hierarchical(config, str(workdir))
    out = _out(workdir, 'hierarchical')
    saved = np.load(out / 'hierarchical.npz')
    assert list(saved['levels']) == [5, 0]
    tree = {k: saved[f'level_{k}'][0] for k in (5, 0)}
    assert [tree[k].shape[0] for k in (5, 0)] == [1, 4]
    np.testing.assert_allclose(
        saved['u_K'], _prior(config, training_images, rng.ANALYSIS_DRAW, 1, PRIOR_KEY), atol=5e-7
    )
    np.testing.assert_array_equal(saved['noise_keys'], _key_data(NOISE_KEY, 1))
    # Each of the 4 branches as one unbranched chain: the root's noise above level 5, then the
    # noise of branch i, fold_in(root, i).
    root = jax.random.wrap_key_data(saved['noise_keys'][0])
    branches = [jax.random.fold_in(root, i) for i in range(4)]
    states = _chain(
        mu,
        np.repeat(saved['u_K'], 4, axis=0),
        config.model.K,
        config.sampling.delta,
        lambda k: _noise([root] * 4 if k > 5 else branches, k, (8, 8, 1)),
    )
    # Float32 chains in programs of other batch shapes; measured at levels 5 and 0, on values
    # up to 4.3 and 7.3: 7.7e-6 and 2.5e-5 with the test session's compilation (conftest).
    np.testing.assert_allclose(states[5], np.repeat(tree[5], 4, axis=0), atol=1e-4)
    np.testing.assert_allclose(states[0], tree[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(tree[0][0], tree[0][1], atol=1e-3)
    assert (out / 'hierarchical.png').exists()


def test_nearest_neighbours_of_the_first_samples(analysis_config, workdir, training_images):
    config = analysis_config
    probing.nearest_neighbours(config, str(workdir))
    sample.sample(config, str(workdir))
    saved = np.load(_out(workdir, 'nearest_neighbours') / 'nearest_neighbours.npz')
    np.testing.assert_array_equal(
        saved['images'], np.load(workdir / 'samples' / 'samples.npz')['images'][:2]
    )
    training = training_images.astype(np.float64) / 255
    samples = saved['images'].astype(np.float64) / 255
    d = np.sqrt(((samples[:, None] - training[None]) ** 2).sum(axis=(2, 3, 4)))
    nearest = np.argsort(d, axis=1, kind='stable')[:, :2]
    np.testing.assert_array_equal(saved['indices'], nearest)
    np.testing.assert_allclose(saved['distances'], np.take_along_axis(d, nearest, 1), rtol=1e-12)
    np.testing.assert_array_equal(saved['neighbours'], training_images[nearest])
    assert (_out(workdir, 'nearest_neighbours') / 'nearest_neighbours.png').exists()


def test_input_gradients_match_finite_differences(analysis_config, workdir, mu, training_images):
    config = analysis_config
    probing.input_gradients(config, str(workdir))
    out = _out(workdir, 'input_gradients')
    saved = np.load(out / 'input_gradients.npz')
    grads, inputs = saved['gradients'], saved['inputs']
    levels = [1, 5, 10]
    assert grads.shape == (2, 3, 8, 8, 1) and list(saved['levels']) == levels
    assert [tuple(p) for p in saved['pixels']] == [(4, 4), (2, 6)]
    x = (
        training_images[rng.prior_picks(config.seed, rng.ANALYSIS_DRAW, 1, len(training_images))]
        / 255.0
    )
    t = np.asarray(
        heat.heat_times(config.model.K, config.model.blur_sigma_min, config.model.blur_sigma_max),
        np.float64,
    )
    np.testing.assert_allclose(
        inputs, numpy_reference.heat(np.repeat(x, 3, axis=0), t[levels]), atol=5e-7
    )
    # Four-point central differences, (μ(u − 2h) − 8μ(u − h) + 8μ(u + h) − μ(u + 2h)) / 12h, of
    # μ(u, k)[i, j] along the pixel itself and a neighbour, at every level and pixel.
    h = 5e-3
    steps = np.array([-2, -1, 1, 2], np.float32) * h
    errors = []
    for p, (i, j) in enumerate(saved['pixels']):
        for level, (k, u) in enumerate(zip(levels, inputs)):
            bumps = np.zeros((8,) + u.shape, np.float32)
            bumps[:4, i, j, 0], bumps[4:, i + 1, j, 0] = steps, steps
            m = mu(u + bumps, k)[:, i, j, 0].astype(np.float64).reshape(2, 4)
            differences = (m[:, 0] - 8 * m[:, 1] + 8 * m[:, 2] - m[:, 3]) / (12 * h)
            errors.append(differences - grads[p, level, [i, i + 1], j, 0])
    # Measured 2.1e-4 (gradients up to 6.3); at a neighbouring level k ± 1 the differences
    # are at least 2.2 off.
    assert np.abs(errors).max() < 1e-3
    assert (out / 'input_gradients.png').exists()


def test_psd_heat_from_below_and_diffusion_at_its_matched_floor(analysis_config, tmp_path):
    config = analysis_config
    forward_process.psd(config, str(tmp_path))
    out = _out(tmp_path, 'psd')
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
        assert np.sum(data_psd > floor * (1 + 1e-9)) == np.sum(heat_psd >= saved['sigma'] ** 2)
    # At k = K the floor dominates: unit white noise scaled by (1 − ᾱ)/ᾱ lies on top of the data.
    noisy = np.array(saved['levels'][-1]['diffusion_psd'])
    np.testing.assert_allclose(np.mean(noisy - data_psd), floor, rtol=0.1)  # measured 3.8e-2
    energy = np.array(saved['energy_by_blur'])
    assert energy.shape == (config.model.K, 7)
    assert np.all(np.diff(energy, axis=0) <= 1e-9)
    assert (out / 'psd.png').exists() and (out / 'energy_vs_blur.png').exists()


def test_prior_overlap_matches_brute_force_and_falls_with_blur(
    analysis_config, tmp_path, training_images
):
    config = analysis_config
    forward_process.prior_overlap(config, str(tmp_path))
    out = _out(tmp_path, 'prior_overlap')
    results = json.loads((out / 'prior_overlap.json').read_text())['results']
    nats = np.array([r['L_K_nats'] for r in results])
    assert [r['blur_sigma_max'] for r in results] == [0.5, 1.0, 2.0, 4.0]
    assert np.all(nats >= 0) and np.all(np.diff(nats) <= 1e-3)  # F(t) only shrinks distances
    np.testing.assert_allclose(
        [r['L_K_bits_per_dim'] for r in results], nats / (64 * np.log(2)), rtol=1e-12
    )
    # L_K ≤ log N − logsumexp_i(−KL[N(F u0, σ²) ‖ N(F x_i, δ²)]) for each σ_B,max, in float64.
    test_source = data.make_source(config, split='test')
    test_images = test_source.load(np.arange(len(test_source)))
    sigma, delta, n = config.model.sigma, config.sampling.delta, 64
    expected = []
    for blur_sigma_max in (0.5, 1.0, 2.0, 4.0):
        t_K = blur_sigma_max**2 / 2
        train_u = numpy_reference.heat(training_images / 255.0, t_K).reshape(-1, n)
        test_u = numpy_reference.heat(test_images / 255.0, t_K).reshape(-1, n)
        kl = 0.5 * (n * sigma**2 / delta**2 - n + 2 * n * np.log(delta / sigma)) + (
            (test_u[:, None] - train_u[None]) ** 2
        ).sum(-1) / (2 * delta**2)
        expected.append(np.mean(np.log(len(train_u)) - scipy.special.logsumexp(-kl, axis=1)))
    np.testing.assert_allclose(nats, expected, rtol=2e-6)  # measured 3.0e-7
    assert (out / 'prior_overlap.png').exists()


def test_delta_grid_columns_are_chains_from_one_start_and_noise(
    analysis_config, workdir, mu, training_images
):
    config = analysis_config
    variants.delta_grid(config, str(workdir))
    out = _out(workdir, 'delta_grid')
    saved = np.load(out / 'delta_grid.npz')
    samples, u_K, keys = saved['images'], saved['u_K'], saved['noise_keys']
    assert samples.shape == (2, 3, 8, 8, 1) and list(saved['deltas']) == [0.0, 0.0125, 0.05]
    np.testing.assert_allclose(
        u_K, _prior(config, training_images, rng.ANALYSIS_DRAW, 2, PRIOR_KEY), atol=5e-7
    )
    np.testing.assert_array_equal(keys, _key_data(NOISE_KEY, 2))
    noise_keys = jax.random.wrap_key_data(keys)
    for column, delta in enumerate((0.0, 0.0125, 0.05)):
        expected = _chain(
            mu, u_K, config.model.K, delta, lambda k: _noise(noise_keys, k, (8, 8, 1))
        )[0]
        np.testing.assert_allclose(samples[:, column], _grey(expected), atol=1)
    for column in (1, 2):
        assert not np.array_equal(samples[:, column], samples[:, 0])
    assert Image.open(out / 'delta_grid.png').size[0] > 4 * 64


def test_trajectory_gradients_are_taken_at_the_chains_states(
    analysis_config, workdir, mu, training_images
):
    config = analysis_config
    probing.trajectory_gradients(config, str(workdir))
    out = _out(workdir, 'trajectory_gradients')
    saved = np.load(out / 'trajectory_gradients.npz')
    grads, states = saved['gradients'], saved['states']
    levels = [10, 5, 1]  # level_fractions (0.1, 0.5, 1.0) of K = 10, level K first
    assert list(saved['levels']) == levels and tuple(saved['pixel']) == (4, 4)
    assert grads.shape == states.shape == (2, 3, 8, 8, 1)
    np.testing.assert_allclose(
        saved['u_K'], _prior(config, training_images, rng.ANALYSIS_DRAW, 2, PRIOR_KEY), atol=5e-7
    )
    np.testing.assert_array_equal(saved['noise_keys'], _key_data(NOISE_KEY, 2))
    keys = jax.random.wrap_key_data(saved['noise_keys'])
    chain = _chain(
        mu,
        saved['u_K'],
        config.model.K,
        config.sampling.delta,
        lambda k: _noise(keys, k, (8, 8, 1)),
    )
    # Measured 3.5e-5 on values up to 6.8 (float32 chains in programs of other batch shapes).
    np.testing.assert_allclose(
        states, np.stack([chain[k] for k in levels], axis=1), rtol=1e-4, atol=5e-5
    )
    # Four-point central differences of μ(u_k, k)[4, 4] at the chain's states, along the pixel
    # itself and its neighbour below, as in the input_gradients test.
    h = 5e-3
    steps = np.array([-2, -1, 1, 2], np.float32) * h
    errors = []
    for row in range(2):
        for level, k in enumerate(levels):
            u = states[row, level]
            bumps = np.zeros((8,) + u.shape, np.float32)
            bumps[:4, 4, 4, 0], bumps[4:, 5, 4, 0] = steps, steps
            m = mu(u + bumps, k)[:, 4, 4, 0].astype(np.float64).reshape(2, 4)
            differences = (m[:, 0] - 8 * m[:, 1] + 8 * m[:, 2] - m[:, 3]) / (12 * h)
            errors.append(differences - grads[row, level, [4, 5], 4, 0])
    assert np.abs(errors).max() < 1e-3  # measured 1.4e-4 (gradients up to 5.1)
    # The state matters: the other chain's gradients at the same level are at least 0.18 off.
    assert min(np.abs(grads[0, level] - grads[1, level]).max() for level in range(3)) > 1e-2
    assert (out / 'trajectory_gradients.png').exists()


def _rings(h, w):
    """Contour ⌊2 S ρ⌋ of each DCT coefficient, S = max(H, W), ρ = √((n/2H)² + (m/2W)²), in
    integers: ⌊√((nSW)² + (mSH)²) / (HW)⌋."""
    s = max(h, w)
    return np.array(
        [
            [math.isqrt((n * s * w) ** 2 + (m * s * h) ** 2) // (h * w) for m in range(w)]
            for n in range(h)
        ]
    )


@pytest.mark.parametrize('h, w', [(8, 8), (6, 8), (16, 12), (5, 7), (32, 32)])
def test_frequency_rings_follow_the_contour_rule(h, w):
    np.testing.assert_array_equal(spectra.frequency_rings(h, w), _rings(h, w))


def test_frequency_partition_bins_the_dct_as_radial_psd(analysis_config, tmp_path, training_images):
    config = analysis_config
    forward_process.frequency_partition(config, str(tmp_path))
    out = _out(tmp_path, 'frequency_partition')
    saved = np.load(out / 'frequency_partition.npz')
    rings = _rings(8, 8)
    np.testing.assert_array_equal(saved['rings'], np.where((rings >= 1) & (rings < 8), rings, -1))
    image = training_images[
        rng.prior_picks(config.seed, rng.ANALYSIS_DRAW, 1, len(training_images))
    ][0]
    np.testing.assert_array_equal(saved['image'], image)
    power = scipy.fft.dctn(image[..., 0] / 255.0, norm='ortho') ** 2
    # The job's float32 DCT: measured 5.5e-7 (power up to 5.5) and 1.4e-8 for the contour means.
    np.testing.assert_allclose(saved['power'], power, rtol=0, atol=2e-6)
    psd = [power[rings == r].mean() for r in range(1, 8)]
    np.testing.assert_allclose(saved['psd'], psd, rtol=0, atol=1e-7)
    np.testing.assert_allclose(saved['frequencies'], (np.arange(1, 8) + 0.5) / 16)
    assert (out / 'frequency_partition.png').exists()
