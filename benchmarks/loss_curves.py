"""Compares the training loss of runs (e.g. bfloat16 against float32) step by step.

  python -m benchmarks.loss_curves --runs=runs/digits,runs/digits_bf16 \
      --labels=float32,bfloat16 --out=docs/bf16_vs_f32_digits

Reads `train/loss` (the mean over each log_freq steps) from each workdir's TensorBoard events,
and writes OUT.png (the curves and their relative difference from the first run) and OUT.json
(the curves, and for every run after the first its mean absolute and relative difference from
the first over their common steps, and the last values).
"""

import io
import struct

import matplotlib
import numpy as np
from absl import app
from absl import flags
from tensorboardX.proto import event_pb2

from benchmarks import measure
from ihdm_jax import storage

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

_RUNS = flags.DEFINE_list('runs', None, 'Workdirs: the reference run, then the others.')
_LABELS = flags.DEFINE_list('labels', None, 'A legend label per run.')
_TAG = flags.DEFINE_string('tag', 'train/loss', 'The scalar to compare.')
_OUT = flags.DEFINE_string('out', None, 'Output path without extension (.png and .json).')
flags.mark_flags_as_required(['runs', 'labels', 'out'])


def read_scalars(workdir, tag):
    """{step: value} of one scalar from the TensorBoard event files in workdir/tensorboard."""
    folder = storage.join(workdir, 'tensorboard')
    names = [n for n in storage.listdir(folder) if n.startswith('events.out.tfevents.')]
    if not names:
        raise FileNotFoundError(f'No TensorBoard events in {folder}.')
    values = {}
    for name in names:
        fp = io.BytesIO(storage.read_bytes(storage.join(folder, name)))
        while header := fp.read(12):  # length (uint64) and its CRC (uint32)
            (length,) = struct.unpack('<Q', header[:8])
            event = event_pb2.Event.FromString(fp.read(length))
            fp.read(4)  # the record's CRC
            for value in event.summary.value:
                if value.tag == tag and value.HasField('simple_value'):
                    values[event.step] = value.simple_value
    if not values:
        raise ValueError(f'No {tag!r} scalars in {folder}.')
    return values


def gap(reference, other):
    """How far `other` is from `reference` over their common steps: the mean absolute and relative
    difference, the mean signed relative difference (a bias) and the largest relative one."""
    steps = sorted(set(reference) & set(other))
    ref = np.array([reference[s] for s in steps])
    oth = np.array([other[s] for s in steps])
    return dict(
        steps=steps,
        mean_abs_diff=float(np.mean(np.abs(oth - ref))),
        mean_rel_diff=float(np.mean(np.abs(oth - ref) / np.abs(ref))),
        mean_signed_rel_diff=float(np.mean((oth - ref) / np.abs(ref))),
        max_rel_diff=float(np.max(np.abs(oth - ref) / np.abs(ref))),
        final_step=steps[-1],
        final=[float(ref[-1]), float(oth[-1])],
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    runs, labels = _RUNS.value, _LABELS.value
    if len(runs) < 2 or len(labels) != len(runs):
        raise ValueError(
            f'--runs takes two or more workdirs and --labels one label each, got '
            f'{runs} and {labels}.'
        )
    for ext in ('.png', '.json'):
        measure.check_new_file(_OUT.value + ext)
    curves = [read_scalars(run, _TAG.value) for run in runs]
    gaps = [gap(curves[0], curve) for curve in curves[1:]]

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw=dict(height_ratios=(3, 1.5))
    )
    for i, (curve, label) in enumerate(zip(curves, labels)):
        steps = sorted(curve)
        top.plot(steps, [curve[s] for s in steps], marker='.', color=f'C{i}', label=label)
    bottom.axhline(0.0, color='C0', linewidth=0.8)
    for i, (curve, label, g) in enumerate(zip(curves[1:], labels[1:], gaps), start=1):
        rel = [100 * (curve[s] - curves[0][s]) / curves[0][s] for s in g['steps']]
        bottom.plot(
            g['steps'],
            rel,
            marker='.',
            color=f'C{i}',
            label=f'{label}: mean |diff| {g["mean_abs_diff"]:.2g} '
            f'({100 * g["mean_rel_diff"]:.1f}%)',
        )
    top.set_yscale('log')
    top.set_ylabel(f'{_TAG.value}\n(mean over the logged interval)')
    top.legend()
    bottom.set_ylabel(f'difference from\n{labels[0]} (%)')
    bottom.set_xlabel('step')
    bottom.legend(fontsize='small')
    fig.tight_layout()
    storage.write_with(_OUT.value + '.png', fig.savefig, format='png', dpi=120)
    measure.write_json(
        _OUT.value + '.json',
        dict(
            command=measure.command(__spec__.name),
            runs=runs,
            labels=labels,
            tag=_TAG.value,
            curves={label: {str(s): c[s] for s in sorted(c)} for label, c in zip(labels, curves)},
            gaps={label: g for label, g in zip(labels[1:], gaps)},
        ),
    )
    for label, g in zip(labels[1:], gaps):
        print(
            f'{label} vs {labels[0]}, {len(g["steps"])} common steps '
            f'{g["steps"][0]}..{g["steps"][-1]}: mean |difference| {g["mean_abs_diff"]:.3g}, '
            f'mean relative {100 * g["mean_rel_diff"]:.2f}% (signed '
            f'{100 * g["mean_signed_rel_diff"]:+.2f}%), max relative '
            f'{100 * g["max_rel_diff"]:.2f}%; step {g["final_step"]}: {labels[0]} '
            f'{g["final"][0]:.6f}, {label} {g["final"][1]:.6f}'
        )


if __name__ == '__main__':
    app.run(main)
