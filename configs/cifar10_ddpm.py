"""DDPM on CIFAR-10 32x32 with Ho et al.'s settings ("Denoising Diffusion Probabilistic
Models", NeurIPS 2020; Sec. 4 and App. B).

Sec. 4: T = 1000, β linear from β_1 = 1e-4 to β_T = 0.02, L_simple (ε-prediction).
App. B: the U-Net with 128 base channels, multipliers (1, 2, 2, 2), two residual blocks per
resolution and self-attention at 16x16 (35.7 M parameters), dropout 0.1, Adam at lr 2e-4,
batch 128, 800k steps, EMA decay 0.9999, random horizontal flips. Warm-up over 5000 steps and
gradient clipping at 1.0 are those of their released code.
"""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'cifar10'
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True

    model = config.model
    model.process = 'ddpm'
    model.K = 1000  # T
    model.beta_min = 1e-4
    model.beta_max = 0.02
    model.model_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attention_levels = (1,)  # 16x16
    model.dropout = 0.1
    model.ema_rate = 0.9999

    config.training.batch_size = 128
    config.training.n_iters = 800_000
    config.optim.lr = 2e-4
    config.optim.warmup = 5000
    config.optim.grad_clip = 1.0
    return config
