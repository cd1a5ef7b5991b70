"""docs/processes.md's digits table: each forward process trained on the digits U-Net with a
given number of GroupNorm groups, its bits/dim on the held-out digits, its FID and its share of
saturated checkerboard samples.

  python -m benchmarks.processes --out=runs/processes --reference_stats=FILE \
      [--runs=heat:16,ddpm:16,blurring:16,ni:16,heat:32,ddpm:32,blurring:32] [--quick]

Each entry PROCESS:GROUPS runs docs/processes.md's commands as subprocesses, as a user would:
`python -m ihdm_jax.main` with PROCESS's config and --config.model.num_groups=GROUPS in the
workdir <out>/<process>_<groups>groups (training), then --mode=eval and --mode=fid against
--reference_stats (config.evaluation.fid_train_stats: written there first if the file does not
exist), and records the commands and their wall times in the workdir's processes_runs.json. A
workdir that has that file is not run again: its row is read from its outputs, so an interrupted
benchmark goes on where it stopped. The diffusion processes sample with 100 ancestral steps
instead of their 1000 levels, at training and for FID. Prints the table and writes processes.json,
processes.md and processes.png (the first 16 FID samples of each run, one row per run) in --out.
--quick trains 20 steps and draws 64 samples, only to check that the script works.
"""

import functools
import json
import os
import types

import numpy as np
from absl import app
from absl import flags

from benchmarks import measure
from ihdm_jax import images
from ihdm_jax import plots

DIFFUSION_STEPS = ['--config.sampling.steps=100']
CONFIGS = {  # process: (config, its extra arguments)
    'heat': ('configs/digits.py', []),
    'ddpm': ('configs/digits_ddpm.py', DIFFUSION_STEPS),
    'blurring': ('configs/digits_blurring.py', DIFFUSION_STEPS),
    'ni': ('configs/digits_ni.py', DIFFUSION_STEPS),
}
QUICK = ['--config.training.n_iters=20', '--config.training.log_freq=10']
QUICK += ['--config.sampling.num_samples=8', '--config.sampling.batch_size=8']
QUICK += ['--config.evaluation.fid_num_samples=64', '--config.evaluation.num_passes=1']
# A sample is a checkerboard above this mean |difference| of neighbouring pixels (of 255): random
# 0/255 pixels score 127.5, the 1500 training digits at most 35.
CHECKERBOARD = 100
RUNS_FILE = 'processes_runs.json'  # a workdir's commands and their wall times
SHOWN = 16  # samples per run in processes.png


def neighbour_difference(samples: np.ndarray) -> np.ndarray:
    """The mean absolute difference between horizontally and vertically neighbouring pixels of
    each uint8 NHWC image, on the 0-255 scale: 255 for a 0/255 checkerboard, 0 for a flat image."""
    x = samples.astype(np.float64)
    horizontal = np.abs(np.diff(x, axis=2))
    vertical = np.abs(np.diff(x, axis=1))
    return (horizontal.sum((1, 2, 3)) + vertical.sum((1, 2, 3))) / (
        horizontal[0].size + vertical[0].size
    )


def parse_run(entry: str):
    """(process, groups) of PROCESS:GROUPS."""
    process, _, groups = entry.partition(':')
    if process not in CONFIGS or not groups.isdigit() or int(groups) < 1:
        raise app.UsageError(
            f'--runs entry {entry!r} is not PROCESS:GROUPS with PROCESS one of '
            f'{", ".join(CONFIGS)} and GROUPS a positive integer.'
        )
    return process, int(groups)


def measure_run(process, groups, out, stats, quick):
    """Trains, evaluates and samples one run, or reads the runs of a workdir that has them
    (RUNS_FILE): its row (a dict) and its FID samples."""
    config, extra = CONFIGS[process]
    workdir = os.path.join(out, f'{process}_{groups}groups')
    done = os.path.join(workdir, RUNS_FILE)
    if os.path.exists(done):
        with open(done) as fp:
            row = json.load(fp)
    else:
        args = [f'--config={config}', f'--workdir={workdir}']
        args += [f'--config.model.num_groups={groups}'] + extra + (QUICK if quick else [])
        fid_args = [f'--config.evaluation.fid_train_stats={stats}']
        row = {'process': process, 'config': config, 'groups': groups, 'commands': []}
        for mode, more in (('train', []), ('eval', []), ('fid', fid_args)):
            seconds, _, shown = measure.run_main(args + [f'--mode={mode}'] + more)
            row[f'{mode}_wall_s'] = seconds
            row['commands'].append(shown)
        with open(done, 'w') as fp:
            json.dump(row, fp, indent=2)
    with open(os.path.join(workdir, 'eval', 'likelihood.json')) as fp:
        likelihood = json.load(fp)
    with open(os.path.join(workdir, 'eval', 'fid.json')) as fp:
        fid = json.load(fp)
    with np.load(os.path.join(workdir, 'eval', 'fid_samples.npz')) as saved:
        samples = saved['images']
    differences = neighbour_difference(samples)
    row.update(
        {key: likelihood[key] for key in ('bits_per_dim', 'offset', 'L_K', 'sum_L_k', 'L_0')},
        step=fid['step'],
        fid=fid['fid'],
        num_samples=fid['num_samples'],
        checkerboards=float(np.mean(differences > CHECKERBOARD)),
        max_neighbour_difference=float(differences.max()),
    )
    return row, samples


def markdown(rows) -> str:
    lines = [
        '| process | config | groups | step | training | bits/dim (test) | FID | checkerboards |',
        '|---|---|---:|---:|---:|---|---:|---:|',
    ]
    for r in rows:
        terms = (
            f'{r["bits_per_dim"]:.3f} = {r["offset"]:g} + L_K {r["L_K"]:.3f} '
            f'+ Σ L_k {r["sum_L_k"]:.3f} + L_0 {r["L_0"]:.3f}'
        )
        lines.append(
            f'| {r["process"]} | {r["config"]} | {r["groups"]} | {r["step"]} '
            f'| {r["train_wall_s"]:.0f} s | {terms} '
            f'| {r["fid"]:.2f} | {100 * r["checkerboards"]:.0f}% |'
        )
    return '\n'.join(lines)


def save_figure(path, rows, samples, title):
    """The first SHOWN FID samples of each run, one labelled row per run."""
    shown = np.concatenate([s[:SHOWN] for s in samples])
    size = shown.shape[1]
    labels = [
        f'{r["process"]}, {r["groups"]} groups: FID {r["fid"]:.1f}, '
        f'{100 * r["checkerboards"]:.0f}% checkerboards'
        for r in rows
    ]
    plots.save_canvas(
        path,
        images.grid(shown, SHOWN),
        title,
        yticks=list(zip(images.tile_centres(len(rows), size), labels)),
    )


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to ihdm_jax.main, which defines --workdir too)."""
    return types.SimpleNamespace(
        out=flags.DEFINE_string('out', None, 'Folder of the workdirs and results.'),
        runs=flags.DEFINE_list(
            'runs',
            ['heat:16', 'ddpm:16', 'blurring:16', 'ni:16', 'heat:32', 'ddpm:32', 'blurring:32'],
            'PROCESS:GROUPS entries.',
        ),
        stats=flags.DEFINE_string('reference_stats', None, 'Reference statistics (.npz).'),
        quick=flags.DEFINE_bool('quick', False, 'A short run to check the script: not comparable.'),
    )


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not f.out.value or not f.stats.value:
        raise app.UsageError('--out and --reference_stats are required.')
    entries = [parse_run(entry) for entry in f.runs.value]
    results = os.path.join(f.out.value, 'processes.json')
    measure.check_new_file(results)
    info = measure.device_info()
    info['devices'] = 'one per core'  # ihdm_jax.main's, not this process's one device
    rows, samples = [], []
    for process, groups in entries:
        row, drawn = measure_run(process, groups, f.out.value, f.stats.value, f.quick.value)
        rows.append(row)
        samples.append(drawn)
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(measure.describe(info))
    print(table)
    measure.write_json(results, dict(info, command=measure.command(__spec__.name), rows=rows))
    with open(os.path.join(f.out.value, 'processes.md'), 'w') as fp:
        fp.write(table + '\n')
    steps = sorted({r['step'] for r in rows})
    save_figure(
        os.path.join(f.out.value, 'processes.png'),
        rows,
        samples,
        f'FID samples of the digits U-Net (32 channels) after {"/".join(map(str, steps))} steps',
    )


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
