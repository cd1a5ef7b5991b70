"""MNIST 28x28 (paper Tables 1-2)."""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'mnist'
    config.data.image_size = 28
    config.data.num_channels = 1

    model = config.model
    model.K = 100
    model.blur_sigma_max = 20.0
    model.channel_mult = (1, 2, 2)
    model.num_res_blocks = 4
    model.attention_levels = (2,)  # 7x7
    model.dropout = 0.1
    model.ema_rate = 0.999

    config.training.batch_size = 128
    config.optim.lr = 1e-4  # original code: 2e-4
    config.sampling.delta = 0.0125
    return config
