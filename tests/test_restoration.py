"""Restoration (deblurring, super-resolution) against references written here: brute-force
float64 DCT and block-mean matrices, a float64 numpy consistency step, the statistics of the
start state, the exact posterior mean of a small training set in place of the network (which
must restore a degraded training image to itself), and --mode=restore on a model far from the
identity with every bad input refused before anything is written."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import posterior_oracle as oracle
import pytest
import scipy.fft
from conftest import write_checkpoint
from numpy_reference import heat as heat64
from PIL import Image

from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import heat
from ihdm_jax import loading
from ihdm_jax import main
from ihdm_jax import processes
from ihdm_jax import programs
from ihdm_jax import restoration
from ihdm_jax import rng
from ihdm_jax import samplers
from ihdm_jax.evaluation import quality


def _dct_matrix(n):
    """The orthonormal DCT-II matrix of length n from scipy."""
    return scipy.fft.dct(np.eye(n), axis=0, norm='ortho')


def _lam(h, w):
    return np.pi**2 * ((np.arange(h)[:, None] / h) ** 2 + (np.arange(w)[None, :] / w) ** 2)


@pytest.mark.parametrize('n, r', [(4, 2), (4, 4), (8, 2)])
def test_the_block_mean_scales_each_low_dct_frequency_by_its_box_response(n, r):
    """In the DCT bases, the block mean maps the high-resolution frequency m < n to D(m)/√r
    times the low-resolution frequency m, and nothing else (brute force, float64)."""
    mean = np.kron(np.eye(n), np.full((1, r), 1.0 / r))  # (n, rn)
    in_dct = _dct_matrix(n) @ mean @ _dct_matrix(r * n).T
    np.testing.assert_allclose(
        in_dct[:, :n], np.diag(restoration.box_response(n, r)) / np.sqrt(r), atol=1e-12
    )


def test_placed_low_resolution_coefficients_are_the_box_filtered_ones():
    """ŷ = r DCT(block mean of x) equals D_h ⊗ D_w ⊙ x̂ for an x without frequencies above the
    low-resolution image's (so without aliasing)."""
    r, h = 2, 4
    coefficients = np.zeros((1, 8, 8, 1))
    coefficients[0, :h, :h, 0] = np.random.default_rng(0).normal(size=(h, h))
    x = scipy.fft.idctn(coefficients, axes=(1, 2), norm='ortho')
    placed = np.asarray(restoration.place(restoration.box_downsample(x, r), r))
    gain = np.zeros((8, 8))
    gain[:h, :h] = np.outer(restoration.box_response(h, r), restoration.box_response(h, r))
    np.testing.assert_allclose(placed[0, ..., 0], gain * coefficients[0, ..., 0], atol=2e-6)


def test_consistency_of_a_blur_against_a_float64_reference():
    """The frequencies with e^{−λ(t−t*)} n ≤ σ take e^{−λ(t−t*)} ŷ plus noise to σ; the others
    keep u's coefficients."""
    generator = np.random.default_rng(1)
    x, u, eps = generator.uniform(size=(3, 2, 8, 8, 1))
    d = restoration.Degradation((8, 8), blur_sigma=1.5, noise=0.004)
    y = heat64(x, d.t_star) + d.noise * generator.normal(size=x.shape)
    sigma, t = 0.01, 0.7  # below t* = 1.125: some frequencies are not measured
    n = np.hypot(d.noise, restoration.QUANTISATION)
    ratio = np.exp(-_lam(8, 8) * (t - d.t_star))[None, :, :, None]
    replace = n * ratio <= sigma
    assert 0 < replace.sum() < 64
    dct = lambda z: scipy.fft.dctn(z, axes=(1, 2), norm='ortho')  # noqa: E731
    top_up = np.sqrt(np.maximum(sigma**2 - (n * ratio) ** 2, 0))
    expected = np.where(replace, ratio * dct(y) + top_up * dct(eps), dct(u))
    expected = scipy.fft.idctn(expected, axes=(1, 2), norm='ortho')
    out = d.consistency(u, t, y, sigma, sigma, eps)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_a_blurred_start_state_has_the_training_states_statistics():
    """From y = F(t*) x + n, the start state at t ≥ t* has every DCT coefficient distributed
    as the training state's, N(F(t) x, σ²) (4000 draws of the noise of y and of the state)."""
    sigma, draws, t = 0.01, 4000, 1.0
    x = oracle.digits(1)
    d = restoration.Degradation((8, 8), blur_sigma=1.0, noise=0.006)
    keys = jax.random.split(jax.random.key(3), 2)
    n = np.hypot(d.noise, restoration.QUANTISATION)  # the rounding, drawn here as noise
    y = heat64(x, d.t_star) + n * np.asarray(jax.random.normal(keys[0], (draws, 8, 8, 1)))
    eps = jax.random.normal(keys[1], (draws, 8, 8, 1))
    u = jax.jit(lambda y, e: d.consistency(sigma * e, t, y, sigma, sigma, e))(y, eps)
    coefficients = scipy.fft.dctn(np.asarray(u, np.float64), axes=(1, 2), norm='ortho')
    expected = scipy.fft.dctn(heat64(x, t)[0], axes=(0, 1), norm='ortho')
    assert np.abs(coefficients.mean(axis=0) - expected).max() < 5 * sigma / np.sqrt(draws)
    np.testing.assert_allclose(coefficients.var(axis=0), sigma**2, rtol=0.12)


def _upsampled64(y, r):
    """x̃ in float64: r DCT(y) on the low frequencies divided by D_h ⊗ D_w, then its block
    means set to y."""
    b, h, w, c = y.shape
    coefficients = np.zeros((b, r * h, r * w, c))
    gain = np.outer(restoration.box_response(h, r), restoration.box_response(w, r))
    low = r * scipy.fft.dctn(y, axes=(1, 2), norm='ortho')
    coefficients[:, :h, :w] = low / gain[None, :, :, None]
    smooth = scipy.fft.idctn(coefficients, axes=(1, 2), norm='ortho')
    means = smooth.reshape(b, h, r, w, r, c).mean(axis=(2, 4))
    return smooth + np.repeat(np.repeat(y - means, r, axis=1), r, axis=2)


def test_upsampling_gives_back_an_image_without_frequencies_above_the_low_resolution():
    """x̃ of the block means of an x with only the low-resolution image's frequencies is x."""
    coefficients = np.zeros((1, 8, 8, 1))
    coefficients[0, :4, :4, 0] = np.random.default_rng(5).normal(size=(4, 4))
    x = scipy.fft.idctn(coefficients, axes=(1, 2), norm='ortho')
    d = restoration.Degradation((8, 8), upsample=2)
    np.testing.assert_allclose(
        np.asarray(d.upsampled(restoration.box_downsample(x, 2))), x, atol=1e-5
    )


@pytest.mark.parametrize('t, top_up', [(0.0, 0.0), (1.3, 0.01)])
def test_super_resolution_consistency_is_the_projection_onto_the_block_means(t, top_up):
    """ILVR's step changes u by a block-constant image (an orthogonal projection), after which
    the block means are those of F(t) x̃ + top_up ε: y itself at t = 0."""
    generator = np.random.default_rng(2)
    u, eps = generator.normal(size=(2, 2, 8, 8, 1))
    y = generator.uniform(size=(2, 2, 2, 1))
    d = restoration.Degradation((8, 8), upsample=4)
    out = np.asarray(d.consistency(u, t, y, 0.01, top_up, eps), np.float64)
    change = (out - u).reshape(2, 2, 4, 2, 4, 1)
    np.testing.assert_allclose(change - change[:, :, :1, :, :1], 0.0, atol=1e-5)
    target = heat64(_upsampled64(y, 4), t) + top_up * eps
    means = lambda z: z.reshape(2, 2, 4, 2, 4, 1).mean(axis=(2, 4))  # noqa: E731
    np.testing.assert_allclose(means(out), means(target), atol=1e-5)
    if t == 0:
        np.testing.assert_allclose(means(out), y, atol=1e-6)


@pytest.mark.parametrize('r', [2, 4])
def test_super_resolution_starts_where_the_missing_frequencies_fall_below_sigma(r):
    """The lowest frequency a low-resolution image lacks is n = H/r, λ_c = π²/r²: the first time
    of a fine grid with e^{−λ_c t} ≤ σ."""
    sigma, times = 0.01, np.linspace(0.0, 20.0, 2001)
    d = restoration.Degradation((16, 16), upsample=r)
    start = restoration.start_index(times, d.log_gain(), d.coefficient_noise(), sigma)
    assert times[start] >= np.log(1 / sigma) * r**2 / np.pi**2 > times[start - 1]


@pytest.mark.parametrize(
    'settings', [{'blur_sigma': 1.0}, {'blur_sigma': 2.0}, {'upsample': 2}, {'upsample': 4}]
)
def test_the_exact_posterior_mean_restores_a_degraded_training_image_to_itself(config, settings):
    """With E[u_0 | u_κ] of six training digits as the network, every degraded digit (8-bit
    rounded) comes back: exactly without consistency; with it, to within the rounding that the
    measured frequencies carry. Measured: 0 and at most 0.0075 (blur), 0.0020 (block mean)."""
    sigma, images = 0.01, oracle.digits(6)
    c = oracle.continuous(config, sigma)
    method = samplers.from_config(processes.from_config(c), c)
    chain = programs.Chain(method, oracle.posterior_mean_residual(images, sigma), sigma)
    d = restoration.Degradation((8, 8), **settings)
    start, times = programs.restoration_start(c, d)
    y = np.round(np.asarray(d.apply(images)) * 255) / 255
    keys = rng.example_keys(jax.random.key(0), len(y))
    for consistency, tolerance in ((False, 1e-3), (True, 0.01 if d.upsample == 1 else 0.003)):
        out = jax.jit(
            lambda y, k: programs.restore_chains(d, consistency, start, times, sigma, chain, y, k)
        )(y, keys)
        assert np.abs(np.asarray(out) - images).max() < tolerance


def test_psnr_and_ssim_agree_with_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio
    from skimage.metrics import structural_similarity

    generator = np.random.default_rng(4)
    x = generator.uniform(size=(3, 16, 16, 2))
    y = np.clip(x + 0.1 * generator.normal(size=x.shape), 0, 1)
    np.testing.assert_allclose(
        quality.ssim(y, x),
        [structural_similarity(a, b, channel_axis=-1, data_range=1.0) for a, b in zip(x, y)],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        quality.psnr(y, x), [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]
    )


@pytest.fixture(scope='module')
def inputs(trained, tmp_path_factory):
    """Test digits of the tiny config blurred by σ_y = 1 px, as an .npz, with the clean ones."""
    folder = tmp_path_factory.mktemp('restore_inputs')
    model = loading.load(str(trained))
    clean = data.make_source(model.config, 'test').load(np.arange(6))
    d = restoration.Degradation((8, 8), blur_sigma=1.0)
    blurred = np.round(np.clip(np.asarray(d.apply(clean / 255.0)), 0, 1) * 255).astype(np.uint8)
    np.savez(folder / 'blurred.npz', images=blurred)
    np.savez(folder / 'clean.npz', images=clean)
    return folder, blurred, clean


def _restore_config(config, inputs, **settings):
    folder = inputs[0]
    config = config.copy_and_resolve_references()
    config.restore.input = str(folder / 'blurred.npz')
    config.restore.reference = str(folder / 'clean.npz')
    config.restore.blur_sigma = 1.0
    config.restore.num_samples = 2
    config.restore.update(settings)
    return config


def test_restore_writes_the_restorations_that_load_restore_returns(
    config, trained, inputs, tmp_path
):
    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    c = _restore_config(config, inputs)
    main.run(c, 'restore', str(workdir))
    saved = np.load(workdir / 'restore' / 'restored.npz')
    assert saved['restorations'].shape == (6, 2, 8, 8, 1)
    np.testing.assert_array_equal(saved['inputs'], inputs[1])
    for name in ('grid.png', 'metrics.json', 'mean/00005.png'):
        assert (workdir / 'restore' / name).is_file()
    model = loading.restore(c, str(workdir))
    again = model.restore(inputs[1], rng.sample_key(c.seed), blur_sigma=1.0, num_samples=2)
    np.testing.assert_array_equal(saved['restorations'], np.round(np.clip(again, 0, 1) * 255))
    # The untrained network moves the images far from the inputs: the chain ran.
    assert np.abs(again[:, 0] - again[:, 1]).max() > 0.05
    with pytest.raises(errors.UserError, match='num_samples=0 must be at least 1'):
        model.restore(inputs[1], rng.sample_key(c.seed), blur_sigma=1.0, num_samples=0)


def _bad_inputs(folder):
    rgb = folder / 'rgb.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    (folder / 'empty').mkdir(exist_ok=True)
    np.savez(folder / 'other.npz', pixels=np.zeros((1, 8, 8, 1), np.uint8))
    np.savez(folder / 'small.npz', images=np.zeros((2, 3, 3, 1), np.uint8))
    np.savez(folder / 'three.npz', images=np.zeros((2, 4, 4, 3), np.uint8))
    np.savez(folder / 'two.npz', images=np.zeros((2, 8, 8, 1), np.uint8))
    return {
        'rgb': ({'input': str(rgb), 'reference': ''}, 'RGB image'),
        'empty folder': ({'input': str(folder / 'empty')}, 'without image files'),
        'missing': ({'input': str(folder / 'nothing.npz')}, 'does not exist'),
        'no images array': ({'input': str(folder / 'other.npz')}, 'no array `images`'),
        'size': (
            {'input': str(folder / 'small.npz'), 'blur_sigma': 0.0, 'upsample': 2},
            'expected (N, 4, 4, 1)',
        ),
        'channels': (
            {'input': str(folder / 'three.npz'), 'blur_sigma': 0.0, 'upsample': 2},
            'the model takes 1',
        ),
        'factor': ({'blur_sigma': 0.0, 'upsample': 3}, 'does not divide'),
        'both': ({'upsample': 2}, 'not both or neither'),
        'neither': ({'blur_sigma': 0.0}, 'not both or neither'),
        'zero factor': ({'upsample': 0}, 'not both or neither'),
        'blur beyond the levels': ({'blur_sigma': 6.0}, 'σ_B,max = 4.0'),
        'noise': ({'noise': 0.05}, 'exceeds the training noise'),
        'samples': ({'num_samples': 0}, 'at least 1'),
        'reference': ({'reference': str(folder / 'two.npz')}, 'one for each input'),
    }


def test_every_bad_input_is_refused_before_anything_is_written(config, trained, inputs):
    """One errors.UserError naming the bad value, and the workdir unchanged."""
    folder = inputs[0]
    before = sorted(os.listdir(trained))
    for settings, message in _bad_inputs(folder).values():
        c = _restore_config(config, inputs, **settings)
        with pytest.raises(errors.UserError, match=re.escape(message)):
            main.run(c, 'restore', str(trained))
    c = _restore_config(config, inputs)
    c.model.process = 'ddpm'
    with pytest.raises(errors.UserError, match='--mode=restore is not defined'):
        main.run(c, 'restore', str(trained))
    assert sorted(os.listdir(trained)) == before


def test_a_continuous_model_restores_through_its_sampler(config, tmp_path):
    """heat_continuous at 3 DDIM steps: the restoration starts at a point of the 3-step grid."""
    c = oracle.continuous(config, 0.01, sampler='ddim', steps=3)
    workdir = write_checkpoint(c, tmp_path / 'continuous', 3)
    model = loading.restore(c, workdir)
    x = oracle.digits(2).astype(np.float32)
    y = np.asarray(heat.heat_forward(jnp.asarray(x), 0.5))
    out = model.restore(y, jax.random.key(0), blur_sigma=1.0, num_samples=1)
    assert out.shape == (2, 1, 8, 8, 1) and np.isfinite(out).all()
