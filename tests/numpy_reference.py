"""Float64 references written independently of the package, shared by the tests."""

import numpy as np
import scipy.fft


def heat(u, t):
    """Alg. 3 with scipy's DCT, per image and channel, for non-square images too.

    t is a scalar or one value per image.
    """
    _, h, w, _ = u.shape
    lam = np.pi**2 * ((np.arange(h)[:, None] / h) ** 2 + (np.arange(w)[None, :] / w) ** 2)
    coeffs = scipy.fft.dctn(np.asarray(u, np.float64), axes=(1, 2), norm='ortho')
    t = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    return scipy.fft.idctn(coeffs * np.exp(-lam[None, :, :, None] * t), axes=(1, 2), norm='ortho')


def low_rank_fid(features1, features2) -> float:
    """FID in float64 without a matrix square root, for fewer samples than dimensions.

    With centred samples A_i (n_i x d) and sigma_i = A_i^T A_i / (n_i - 1), the non-zero
    eigenvalues of sigma1 sigma2 are the squared singular values of M = A1 A2^T / sqrt(c),
    c = (n1 - 1)(n2 - 1), so tr (sigma1 sigma2)^(1/2) is the nuclear norm of M.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = len(f1) - 1, len(f2) - 1
    diff = f1.mean(0) - f2.mean(0)
    trace_sqrt = np.linalg.svd(a1 @ a2.T / np.sqrt(c1 * c2), compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2 * trace_sqrt)
