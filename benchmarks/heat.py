"""Throughput of the heat operator F(t)u for both DCT backends.

  python -m benchmarks.heat [--sizes=32,64,128,256] [--batch=64] [--json=heat.json]

Prints a markdown table (median time per call of the jitted operator on a batch of RGB images,
after compilation) and optionally writes the same figures as JSON.
"""

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from benchmarks import measure
from ihdm_jax import heat

_SIZES = flags.DEFINE_list('sizes', ['32', '64', '128', '256'], 'Image sizes (square).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per call.')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Channels per image.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed windows; the median is reported.')
_MIN_WINDOW = flags.DEFINE_float('min_window', 0.05, 'Seconds each timed window lasts at least.')
_JSON = flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    measure.check_new_file(_JSON.value)
    info = measure.device_info()
    rows = []
    for size in map(int, _SIZES.value):
        u = jax.random.uniform(jax.random.key(0), (_BATCH.value, size, size, _CHANNELS.value))
        t = jnp.linspace(0.1, size**2 / 8, _BATCH.value)
        for backend in heat.BACKENDS:
            fn = jax.jit(lambda u, t, backend=backend: heat.heat_forward(u, t, backend))
            seconds = measure.time_call(
                fn, u, t, repeats=_REPEATS.value, min_window=_MIN_WINDOW.value
            )
            rows.append(
                dict(
                    size=size,
                    backend=backend,
                    batch=_BATCH.value,
                    ms_per_call=seconds * 1e3,
                    images_per_s=_BATCH.value / seconds,
                )
            )
    print(measure.describe(info))
    print(f'F(t)u on a batch of {_BATCH.value} images with {_CHANNELS.value} channels\n')
    print('| size | backend | ms / call | images / s |')
    print('|---:|---|---:|---:|')
    for r in rows:
        print(
            f'| {r["size"]} | {r["backend"]} | {r["ms_per_call"]:.3f} | {r["images_per_s"]:,.0f} |'
        )
    if _JSON.value:
        measure.write_json(
            _JSON.value, dict(**info, command=measure.command(__spec__.name), results=rows)
        )


if __name__ == '__main__':
    app.run(main)
