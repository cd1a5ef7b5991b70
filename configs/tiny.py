"""A very small setting for tests: 8x8 grayscale digits and a one-level U-Net."""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'digits'
    config.data.image_size = 8
    config.data.num_channels = 1

    model = config.model
    model.K = 10
    model.blur_sigma_max = 4.0
    model.model_channels = 32
    # One level, attention in the middle block only: the tests compile this model's programs
    # many times over, a third faster than with a second, attended level.
    model.channel_mult = (1,)
    model.num_res_blocks = 1
    model.attention_levels = ()
    model.dropout = 0.1

    training = config.training
    training.batch_size = 8
    training.n_iters = 20
    training.snapshot_freq = 10
    training.log_freq = 5
    training.sampling_freq = 10

    config.optim.lr = 1e-3
    config.optim.warmup = 5
    config.sampling.num_samples = 8
    config.sampling.batch_size = 8

    evaluation = config.evaluation
    evaluation.batch_size = 8
    evaluation.num_passes = 5
    evaluation.train_chunk = 640  # the 1500 training digits in three parts
    evaluation.fid_num_samples = 8
    return config
