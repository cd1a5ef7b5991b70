"""Spectra, input gradients and nearest neighbours against natural images and analytic facts."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import skimage.color
import skimage.data

from ihdm_jax import heat
from ihdm_jax.analysis import probes
from ihdm_jax.analysis import spectra


def _gray(name):
    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = skimage.color.rgb2gray(img)
    img = np.asarray(img, np.float32)
    return (img / img.max())[None, :, :, None]


# The colour photographs. (The grey 'camera' photo, mostly smooth sky and grass, fits α ≈ 2.6.)
@pytest.mark.parametrize('name', ['astronaut', 'coffee', 'chelsea', 'rocket'])
def test_natural_images_follow_a_power_law(name):
    alpha = spectra.power_law_exponent(*spectra.radial_psd(_gray(name)))
    assert 1.5 <= alpha <= 2.5, alpha


def test_white_noise_is_flat_and_a_single_cosine_lands_on_its_ring():
    noise = np.random.default_rng(0).normal(size=(8, 64, 64, 1)).astype(np.float32)
    assert abs(spectra.power_law_exponent(*spectra.radial_psd(noise))) < 0.2
    coeffs = np.zeros((1, 32, 32, 1))
    coeffs[0, 3, 4, 0] = 1.0  # radius exactly 5
    cosine = scipy.fft.idctn(coeffs, axes=(1, 2), norm='ortho').astype(np.float32)
    freqs, psd = spectra.radial_psd(cosine)
    assert np.argmax(psd) == 4 and np.isclose(freqs[4], 5.5 / 64)


def test_heat_approaches_the_spectrum_from_below_and_diffusion_from_above():
    x = _gray('camera')[:, :256:2, :256:2]
    _, base = spectra.radial_psd(x)
    _, blurred = spectra.radial_psd(heat.heat_forward(x, 2.0))
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    _, noisy = spectra.radial_psd(spectra.diffusion_forward(x, noise, 0.9) / np.sqrt(0.9))
    assert np.all(blurred <= base * (1 + 1e-4))
    assert np.all(noisy[-20:] > base[-20:])


def test_dct_energy_decays_with_blur():
    x = _gray('camera')[:, :256:4, :256:4]
    _, energy = spectra.dct_energy_by_blur(x, [0.5, 2.0, 8.0])
    assert energy.shape == (3, 63)
    assert np.all(np.diff(energy, axis=0) <= 1e-9)


def test_matched_diffusion_floor_keeps_the_contours_that_heat_keeps():
    f = np.linspace(0.02, 0.5, 24)
    data_psd = 1e-3 * f**-2.0
    sigma = 0.01
    for t in (0.0, 0.5, 2.0, 8.0, 100.0):
        blurred = data_psd * np.exp(-4 * np.pi**2 * f**2 * t)  # the heat kernel's decay of power
        alpha_bar = spectra.matched_alpha_bar(data_psd, blurred, sigma)
        floor = (1 - alpha_bar) / alpha_bar  # the white-noise power of x + √((1 − ᾱ)/ᾱ) ε
        np.testing.assert_array_equal(data_psd > floor * (1 + 1e-9), blurred >= sigma**2)
    assert spectra.matched_alpha_bar(data_psd, data_psd, sigma) == pytest.approx(1 / (1 + 1e-4))
    # A spectrum that is not decreasing: one contour kept, so the floor lets one through.
    assert spectra.matched_alpha_bar([1.0, 4.0, 0.5], [1e-3, 1e-5, 1e-6], sigma) == 0.5


def test_heat_input_gradients_are_symmetric_local_and_sum_to_one():
    u = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 24, 24, 1)), jnp.float32)
    sigma_b = 2.0

    def fn(x):
        return heat.heat_forward(x, sigma_b**2 / 2)

    p, q = (10, 12, 0), (13, 9, 0)
    g_p = np.asarray(probes.input_gradient(fn, u, p))
    g_q = np.asarray(probes.input_gradient(fn, u, q))
    np.testing.assert_allclose(g_p[q], g_q[p], atol=1e-7)  # F(t) is symmetric
    np.testing.assert_allclose(g_p.sum(), 1.0, atol=1e-5)  # F(t) preserves the mean
    ii, jj = np.meshgrid(np.arange(24), np.arange(24), indexing='ij')
    far = np.hypot(ii - p[0], jj - p[1]) > 4 * sigma_b
    assert np.abs(g_p[..., 0][far]).sum() < 1e-3  # local: a Gaussian of width σ_B
    assert g_p[p] == g_p.max()


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(3)
    train = rng.uniform(size=(50, 4, 4, 1))
    samples = rng.uniform(size=(6, 4, 4, 1))
    d = ((samples[:, None] - train[None]) ** 2).sum(axis=(2, 3, 4))
    expected = np.argsort(d, axis=1)[:, :3]
    np.testing.assert_array_equal(
        probes.nearest_neighbours(samples, train, 3, chunk_size=7), expected
    )
