"""scikit-learn's 8x8 digits at 16x16: the default job, a few minutes on a 2-core laptop CPU.

The 1797 digits ship inside scikit-learn, so nothing is downloaded. 16x16 is the smallest power
of two above 8 at which the U-Net still has two resolution levels (16 and 8, attention in the
middle at 8x8) and the heat equation has room to blur a stroke into a smooth blob.

Sized for a short CPU run: 32 channels at both levels (the fewest the 32-group GroupNorm allows),
no dropout (2000 steps do not overfit 1797 images), lr 1e-3. blur_sigma_max = 5 px leaves a
coarse blob of a training digit in the prior draw, so a short run already gives varied digits; at
the paper's ratio (20 px on 28 px, about 11 px here) it mostly draws a few classes. δ = 0.01
gave cleaner strokes than 0.0125 or 0.02 at this training length.
"""

from configs import default


def get_config():
    config = default.get_default_config()
    config.data.dataset = 'digits'
    config.data.image_size = 16
    config.data.num_channels = 1

    model = config.model
    model.K = 50
    model.blur_sigma_max = 5.0
    model.model_channels = 32
    model.channel_mult = (1, 1)
    model.num_res_blocks = 1
    model.attention_levels = ()
    model.dropout = 0.0
    model.ema_rate = 0.999

    training = config.training
    training.batch_size = 32
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.log_freq = 100
    training.sampling_freq = 500

    config.optim.lr = 1e-3
    config.optim.warmup = 200

    config.sampling.delta = 0.01
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    return config
