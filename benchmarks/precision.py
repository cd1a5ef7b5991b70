"""The cost of bfloat16 compute in loss: a trained checkpoint's Alg. 1 loss with the U-Net run in
float32 and in bfloat16, on the same parameters, images, levels k and noise ε.

  python -m benchmarks.precision --config=configs/digits.py --workdir=runs/digits

Uses the EMA parameters of the newest checkpoint in --workdir and the first --num_images
training images, each with --draws draws of (k, ε); prints the mean loss per compute dtype and
the relative difference, and optionally writes them as JSON.
"""

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import measure
from ihdm_jax import checkpoint
from ihdm_jax import data
from ihdm_jax import objective
from ihdm_jax import parallel
from ihdm_jax import schedule
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1500, 'Training images evaluated.')
_BATCH = flags.DEFINE_integer('batch', 250, 'Images per call.')
_DRAWS = flags.DEFINE_integer('draws', 10, 'Draws of (k, ε) per image.')
_JSON = flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).')
flags.mark_flags_as_required(['config', 'workdir'])

DTYPES = ('float32', 'bfloat16')


def mean_loss(config, params, images, batch, draws):
    """The mean Alg. 1 loss over `images` and `draws` draws of (k, ε) per batch, with the U-Net
    in config.model.dtype; the draws depend only on the batch and draw index."""
    graphdef = state_lib.model_graphdef(config)
    t = schedule.from_config(config).t

    @jax.jit
    def losses(params, u0, key):
        k_key, eps_key = jax.random.split(key)
        k = jax.random.randint(k_key, (u0.shape[0],), 1, config.model.K + 1)
        eps = jax.random.normal(eps_key, u0.shape)
        return objective.alg1_loss(
            lambda u, k: unet.apply(graphdef, params, u, k, train=False),
            u0,
            k,
            eps,
            t,
            config.model.sigma,
        )

    values = [
        losses(params, images[i : i + batch], jax.random.key(i * draws + d))
        for i in range(0, len(images), batch)
        for d in range(draws)
    ]
    return float(np.mean(np.concatenate(jax.device_get(values))))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    measure.check_new_file(_JSON.value)
    config = _CONFIG.value
    params, step = checkpoint.restore_ema_params(
        config, _WORKDIR.value, parallel.make_mesh(jax.devices()[:1])
    )
    source = data.make_source(config)
    n = min(_NUM_IMAGES.value, len(source))
    images = source.load(np.arange(n)).astype(np.float32) / 255.0
    results = {}
    for dtype in DTYPES:
        config.model.dtype = dtype
        results[dtype] = mean_loss(config, params, images, _BATCH.value, _DRAWS.value)
    rel = results['bfloat16'] / results['float32'] - 1.0
    print(
        f'{_WORKDIR.value} checkpoint {step}, {n} images x {_DRAWS.value} draws: loss float32 '
        f'{results["float32"]:.6f}, bfloat16 {results["bfloat16"]:.6f} ({100 * rel:+.2f}%)'
    )
    if _JSON.value:
        measure.write_json(
            _JSON.value,
            dict(
                **measure.device_info(),
                command=measure.command(__spec__.name),
                workdir=_WORKDIR.value,
                step=step,
                num_images=n,
                draws=_DRAWS.value,
                loss=results,
                bfloat16_relative_difference=rel,
            ),
        )


if __name__ == '__main__':
    app.run(main)
