"""FID between two image sets, as clean-fid's "clean" mode computes it.

    python -m ihdm_jax.fid A B [--inception_weights=PATH] [--batch_size=N] [--save_stats=PATH]

A and B are each an .npz with key `images` (uint8 NHWC), a folder of image files, or an .npz of
statistics (keys mu, sigma) written by --save_stats. --save_stats writes the statistics of A; with
it, B may be left out to only compute them. Prints `FID: <value>`.

The Inception weights come from --inception_weights, else $IHDM_INCEPTION_WEIGHTS, else
~/.cache/ihdm_jax/inception-2015-12-05.npz (see ihdm_jax.evaluation.inception to make them).
"""

import sys

from absl import app
from absl import flags

from ihdm_jax import errors
from ihdm_jax.evaluation import frechet

_WEIGHTS = flags.DEFINE_string(
    'inception_weights',
    None,
    f'Converted Inception weights (.npz); default ${frechet.WEIGHTS_ENV}, then the cache file.',
)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per Inception batch.')
_SAVE_STATS = flags.DEFINE_string('save_stats', None, 'Write the statistics of A to this .npz.')


def main(argv):
    inputs = argv[1:]
    if len(inputs) != 2 and not (len(inputs) == 1 and _SAVE_STATS.value):
        raise app.UsageError(f'Expected two inputs A B (or one with --save_stats), got {inputs}')
    try:
        # Every input is read before the network is built, so that a bad one fails early.
        saved = [frechet.is_statistics(path) for path in inputs]
        sources = [
            frechet.load_statistics(path) if is_stats else frechet.load_images(path)
            for path, is_stats in zip(inputs, saved)
        ]
        if not all(saved):
            features = frechet.InceptionFeatures(
                frechet.resolve_weights(_WEIGHTS.value), _BATCH_SIZE.value
            )
        stats = [
            source if is_stats else frechet.statistics(features(source, description=path))
            for path, source, is_stats in zip(inputs, sources, saved)
        ]
        if _SAVE_STATS.value:
            frechet.save_statistics(_SAVE_STATS.value, *stats[0])
            print(f'Saved the statistics of {inputs[0]} to {_SAVE_STATS.value}')
        if len(stats) == 2:
            print(f'FID: {frechet.frechet_distance(*stats[0], *stats[1])}')
    except errors.UserError as error:
        sys.exit(f'Error: {error}')


if __name__ == '__main__':
    app.run(main)
