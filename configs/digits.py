"""scikit-learn's 8x8 digits at 16x16: the default job, a few minutes on a 2-core laptop CPU.

The 1797 digits ship inside scikit-learn, so nothing is downloaded. 16x16 is the smallest power
of two above 8 at which the U-Net still has two resolution levels (16 and 8, attention in the
middle at 8x8) and the heat equation has room to blur a stroke into a smooth blob.

Sized for a short CPU run: 32 channels at both levels in 16 GroupNorm groups (two channels per
group: with the original's 32 groups, one channel per group cancels the time embedding and the
network cannot tell the levels apart; docs/processes.md), no dropout (2000 steps do not overfit
1500 images), lr 1e-3. blur_sigma_max = 5 px leaves a coarse blob of a training digit in the
prior draw, so a short run already gives varied digits; at the paper's ratio (20 px on 28 px,
about 11 px here) it mostly draws a few classes. δ = 0.01 gave cleaner strokes than 0.0125 or
0.02 at this training length.

Training uses the first 1500 digits; the last 297 are the test split of --mode=eval (data.py).
FID (--mode=fid) compares 1000 samples with the 1500 training digits.
"""

from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'digits'
    config.data.image_size = 16
    config.data.num_channels = 1

    model = config.model
    model.K = 50
    model.blur_sigma_max = 5.0
    model.model_channels = 32
    model.num_groups = 16
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

    evaluation = config.evaluation
    evaluation.batch_size = 64  # Inception at 299x299 holds about 2.5 GB per 64 images on CPU
    evaluation.num_passes = 20  # 297 test digits x 20 passes: about 120 draws of each level
    evaluation.fid_num_samples = 1000
    evaluation.deltas = (0.005, 0.01, 0.0125, 0.02)

    # The blob left at σ_B,max = 5 px fixes the digit within the first levels: split early.
    config.analysis.split_fractions = (0.95, 0.85, 0.7)
    config.analysis.blur_sigma_maxes = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 16.0)  # up to the image size
    return config
