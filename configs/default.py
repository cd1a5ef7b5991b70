"""Defaults shared by every config; each config file overrides what its setting needs."""

import ml_collections


def get_default_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'cifar10'  # digits | mnist | cifar10 | afhq | ffhq | lsun_church
    data.data_dir = ''  # image folder (afhq, ffhq, lsun_church) or tfds data_dir; '' = default
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = False

    config.model = model = ml_collections.ConfigDict()
    model.K = 200
    model.sigma = 0.01  # training noise σ (Eq. 4)
    model.blur_sigma_min = 0.5
    model.blur_sigma_max = 24.0
    model.model_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attention_levels = (2, 3)  # U-Net levels (0 = full resolution) with self-attention
    model.dropout = 0.1
    model.downsample = 'conv'  # 'conv' (strided 3x3, the original code) | 'avgpool' (the paper's text)
    model.dtype = 'float32'  # U-Net compute dtype: 'float32' | 'bfloat16' (params stay float32)
    model.ema_rate = 0.999

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 400_000
    training.snapshot_freq = 10_000
    training.log_freq = 100
    training.sampling_freq = 10_000

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.delta = 0.0125  # sampling noise δ (Eq. 8)
    sampling.num_samples = 64
    sampling.batch_size = 64

    return config
