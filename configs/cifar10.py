"""CIFAR-10 32x32 (paper Tables 1-2)."""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'cifar10'
    config.data.image_size = 32
    config.data.num_channels = 3

    model = config.model
    model.K = 200
    model.blur_sigma_max = 24.0
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attention_levels = (2, 3)  # 8x8, 4x4
    model.dropout = 0.1
    model.ema_rate = 0.999

    config.training.batch_size = 128
    config.training.n_iters = 400_000
    config.optim.lr = 2e-4
    # The original code sums the squared error over pixels (mean over the batch), so the
    # gradient clip at 1.0 is nearly always active there.
    config.sampling.delta = 0.01325
    return config
