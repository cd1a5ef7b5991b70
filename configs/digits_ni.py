"""Non-isotropic noise (after Voleti et al., "Score-based denoising diffusion with
non-isotropic Gaussian noise models") on the digits of configs/digits.py: the same data, U-Net,
steps, batch and optimiser (docs/processes.md).

DDPM's schedule (T = 1000, β linear from 1e-4 to 0.02) with the noise drawn as V(c ⊙ z),
c(λ) ∝ (λ + c0)^(−γ/2) scaled to mean square 1 over the frequencies. γ = 1, c0 = 1 are our
choice (the paper does not fix one spectrum): on 16x16 images the DC term gets 18 times the
variance of the highest frequency, so the noise is coarse like the images themselves.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.process = 'non_isotropic'
    config.model.K = 1000  # T
    config.model.noise_gamma = 1.0
    config.model.noise_c0 = 1.0
    # One sample grid, at the end: a 1000-level chain of 64 samples takes minutes on a CPU.
    config.training.sampling_freq = 2000
    return config
