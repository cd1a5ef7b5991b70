"""FFHQ 128x128 (paper Tables 1-2)."""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'ffhq'
    config.data.image_size = 128
    config.data.num_channels = 3

    model = config.model
    model.K = 200
    model.blur_sigma_max = 128.0
    model.channel_mult = (1, 2, 3, 4, 5)
    model.num_res_blocks = 2
    model.attention_levels = (2, 3, 4)  # 32x32, 16x16, 8x8
    model.dropout = 0.1
    model.ema_rate = 0.999  # original code: 0.9999

    config.training.batch_size = 32
    config.optim.lr = 2e-5  # original code: 2e-4
    config.sampling.delta = 0.0125
    # FID as the paper (App. B.3): reference statistics of the entire data set (all 70k
    # FFHQ images: data_dir and test_dir as two parts of it, or both the same folder).
    config.evaluation.fid_reference = ('train', 'test')
    return config
