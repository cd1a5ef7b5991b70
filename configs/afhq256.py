"""AFHQ 256x256 (paper Tables 1-2)."""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'afhq'
    config.data.image_size = 256
    config.data.num_channels = 3
    config.data.random_flip = True  # the paper; the original code's AFHQ configs: False

    model = config.model
    model.K = 200
    model.blur_sigma_max = 128.0
    model.channel_mult = (1, 2, 3, 4, 5)
    model.num_res_blocks = 2  # original code: 3
    model.attention_levels = (2, 3, 4)  # 64x64, 32x32, 16x16
    model.dropout = 0.1  # original code: 0.3
    model.ema_rate = 0.9999

    config.training.batch_size = 32
    config.training.n_iters = 400_000
    config.optim.lr = 2e-5  # original code's config file: 1e-4
    config.sampling.delta = 0.01275
    # FID as the paper (App. B.3): reference statistics of the entire data set (AFHQ's
    # train/ and val/: data_dir and test_dir).
    config.evaluation.fid_reference = ('train', 'test')
    config.evaluation.fid_num_samples = 10_000  # the paper's count at 256x256
    return config
