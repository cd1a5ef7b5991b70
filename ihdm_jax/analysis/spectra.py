"""Power spectra of images under the heat and the diffusion forward processes (Sec. 3.3,
App. B.6)."""

import jax
import jax.numpy as jnp
import numpy as np

from ihdm_jax import heat


def radial_psd(images):
    """1-D power spectral density: mean squared 2-D DCT coefficient over equal-frequency contours.

    The DCT coefficient (n, m) of an H x W image has frequency ρ = √((n/2H)² + (m/2W)²) cycles per
    pixel; contour r holds the coefficients with ⌊2 max(H, W) ρ⌋ = r (App. B.6, Fig. 10). The DC
    term and the corner beyond the last full ring are left out.

    Args:
      images: (B, H, W, C).
    Returns:
      (frequencies, psd): contour centres in cycles per pixel and the mean power on each,
      averaged over images and channels; both of length max(H, W) − 1.
    """
    _, h, w, _ = images.shape
    power = np.mean(np.square(np.asarray(heat.dct_2d(images), np.float64)), axis=(0, 3))
    ring = frequency_rings(h, w)
    rings = np.arange(1, max(h, w))
    psd = np.array([power[ring == r].mean() for r in rings])
    return (rings + 0.5) / (2 * max(h, w)), psd


def frequency_rings(h, w):
    """The contour ⌊2 max(H, W) ρ⌋ of each DCT coefficient (n, m) of an H x W image (radial_psd,
    Fig. 10), (H, W) int; radial_psd averages contours 1..max(H, W) − 1."""
    size = max(h, w)
    n = np.arange(h)[:, None] * size / h
    m = np.arange(w)[None, :] * size / w
    return np.floor(np.sqrt(n**2 + m**2)).astype(int)


def power_law_exponent(frequencies, psd, max_frequency=0.25, num_bins=16):
    """α of the least-squares fit psd ∝ 1/f^α on a log-log scale.

    The spectrum is first averaged (geometrically) in log-spaced frequency bins so that every
    octave weighs the same in the fit, and cut at `max_frequency` cycles per pixel (half the
    Nyquist frequency by default), above which camera optics and compression suppress power.
    """
    keep = frequencies <= max_frequency
    log_f, log_p = np.log(frequencies[keep]), np.log(psd[keep])
    edges = np.linspace(log_f[0], log_f[-1], num_bins + 1)
    which = np.clip(np.digitize(log_f, edges) - 1, 0, num_bins - 1)
    filled = [b for b in range(num_bins) if np.any(which == b)]
    centres = [log_f[which == b].mean() for b in filled]
    values = [log_p[which == b].mean() for b in filled]
    slope, _ = np.polyfit(centres, values, 1)
    return -slope


def diffusion_forward(x, noise, alpha_bar):
    """The variance-preserving diffusion forward process: √ᾱ x + √(1 − ᾱ) ε (for comparison)."""
    return jnp.sqrt(alpha_bar) * x + jnp.sqrt(1.0 - alpha_bar) * noise


def dct_energy_by_blur(image, blur_sigmas):
    """Squared DCT coefficients of F(t) u against σ_B = √(2t), per frequency contour (Fig. 9).

    Returns:
      (frequencies, energy): energy[i, r] is the mean squared coefficient of contour r after
      blurring with blur_sigmas[i].
    """
    rows = []
    blur = jax.jit(heat.heat_forward)
    for s in blur_sigmas:
        frequencies, psd = radial_psd(blur(image, s**2 / 2))
        rows.append(psd)
    return frequencies, np.stack(rows)


def matched_alpha_bar(data_psd, blurred_psd, sigma):
    """ᾱ of the diffusion step that has drowned as many frequencies as a heat level (Sec. 3.3).

    Under q(u_k | u0) = N(F(t_k) u0, σ²I) a frequency is lost once its blurred power falls below
    the noise power σ² (App. B.5, Fig. 9). The diffusion x_t = √ᾱ x + √(1 − ᾱ) ε, seen at the
    data's scale as x_t/√ᾱ = x + √((1 − ᾱ)/ᾱ) ε, has the flat noise floor c = (1 − ᾱ)/ᾱ and
    loses the frequencies whose data power lies below c. c is set so that as many frequency
    contours of the data stay above c as contours of F(t_k) u0 stay above σ² (c = σ² when the
    heat level has lost none): for a decreasing spectrum both processes then keep the same low
    frequencies. ᾱ = 1/(1 + c).

    Args:
      data_psd: the radial PSD of the data, per frequency contour.
      blurred_psd: the radial PSD of F(t_k) u0 on the same contours.
      sigma: the training noise σ.
    """
    kept = int(np.sum(np.asarray(blurred_psd) >= sigma**2))
    descending = np.sort(np.asarray(data_psd, np.float64))[::-1]
    floor = descending[kept] if kept < len(descending) else sigma**2
    return 1.0 / (1.0 + float(floor))
