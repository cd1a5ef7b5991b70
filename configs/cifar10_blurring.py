"""Blurring diffusion on CIFAR-10 32x32 (Hoogeboom & Salimans, "Blurring Diffusion Models",
ICLR 2023, arXiv 2209.05557).

The process, from the paper: the cosine noise schedule with log SNR clipped to [−10, 10] and
the frequency scaling d_t(λ) = (1 − d_min) exp(−λ τ_t) + d_min with τ_t = σ_B(t)²/2,
σ_B(t) = σ_B,max sin²(πt/2) (Sec. 4 and the pseudo-code of App. A), d_min = 0.001, and
σ_B,max = 20, their CIFAR-10 setting (experiments section); continuous t in training,
ε-prediction, 1000 sampling steps. The U-Net and the optimiser are Ho et al.'s CIFAR-10 ones
(configs/cifar10_ddpm.py), the baseline the paper compares with.
"""

from configs import cifar10_ddpm


def get_config():
    config = cifar10_ddpm.get_config()
    config.model.process = 'blurring'
    config.model.K = 1000  # sampling steps and ELBO levels
    config.model.blur_sigma_max = 20.0
    config.model.blur_d_min = 0.001
    return config
