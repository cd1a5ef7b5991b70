"""Image quality against a reference: PSNR, SSIM (Wang et al., IEEE TIP 2004) and the share of
energy at high frequencies, for images in [0, 1] (N, H, W, C), per image, float64 numpy."""

import numpy as np
import scipy.fft
import scipy.ndimage

SSIM_WINDOW = 7  # a uniform 7 x 7 window, as scikit-image's default
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x, reference) -> np.ndarray:
    """10 log10(1 / MSE) in dB of each image (peak 1)."""
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    mse = np.mean(np.square(x - reference), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / mse)


def ssim(x, reference) -> np.ndarray:
    """The mean structural similarity of each image over its channels and the window centres
    at least 3 pixels from the border: l·c·s of local means, variances (unbiased) and
    covariance over 7 x 7 windows, C1 = (0.01)², C2 = (0.03)² for a data range of 1."""
    x, y = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    n = SSIM_WINDOW**2

    def local_mean(z):
        return scipy.ndimage.uniform_filter(z, size=(1, SSIM_WINDOW, SSIM_WINDOW, 1))

    mx, my = local_mean(x), local_mean(y)
    unbiased = n / (n - 1)
    vx = unbiased * (local_mean(x * x) - mx * mx)
    vy = unbiased * (local_mean(y * y) - my * my)
    cxy = unbiased * (local_mean(x * y) - mx * my)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (SSIM_WINDOW - 1) // 2
    return s[:, pad:-pad, pad:-pad, :].mean(axis=(1, 2, 3))


def high_frequency_energy(x, cutoff: float = 0.5) -> np.ndarray:
    """The energy of each image's DCT coefficients (n, m) with n/H + m/W >= cutoff (the upper
    half of the frequencies at the default), per pixel."""
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape
    coefficients = scipy.fft.dctn(x, axes=(1, 2), norm='ortho')
    high = (np.arange(h)[:, None] / h + np.arange(w)[None, :] / w) >= cutoff
    return np.square(coefficients)[:, high].sum(axis=(1, 2)) / (h * w)
