"""Blurring diffusion (Hoogeboom & Salimans, ICLR 2023, arXiv 2209.05557) on the digits of
configs/digits.py: the same data, U-Net, steps, batch and optimiser (docs/processes.md).

The process (their Sec. 4 and the App. A pseudo-code): the cosine schedule with log SNR in
[−10, 10], d_t(λ) = (1 − d_min) exp(−λ τ_t) + d_min with d_min = 0.001 and τ_t = σ_B(t)²/2,
σ_B(t) = σ_B,max sin²(πt/2); continuous t in training, ε-prediction; 1000 sampling steps
(model.K). σ_B,max: their CIFAR-10 value is 20 px on 32 px images; 10 px on these 16 px images
keeps exp(−λ τ_1) of every frequency as it is on CIFAR-10 (λ τ scales as (σ_B,max/size)²).
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.process = 'blurring'
    config.model.K = 1000  # sampling steps and ELBO levels
    config.model.blur_sigma_max = 10.0
    config.model.blur_d_min = 0.001
    # One sample grid, at the end: a 1000-level chain of 64 samples takes minutes on a CPU.
    config.training.sampling_freq = 2000
    return config
