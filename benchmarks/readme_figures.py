"""Reruns the figures README.md quotes for the digits job, on this machine and the current code.

  python -m benchmarks.readme_figures [--quick] [--parts=summary,train,...] [--json=PATH]
      [--keep=DIR]

Runs README.md's own command lines as subprocesses, as a user would: --mode=summary, training
configs/digits.py in a new temporary workdir, then --mode=sample, --mode=psd,
--mode=prior_overlap and the other analysis modes of README's table on it, training the σ = 0
model and its --mode=trajectory_gradients, and two 20-step launches sharing a new compilation
cache. --keep=DIR runs in DIR instead of a temporary folder and keeps the workdirs (and the
analyses' pictures that README shows). Prints
each figure, the value README.md quotes now (read from its text; "not found": its wording
changed and FIGURES must follow), the value measured now and its run, then each run's command.
Other work on the machine slows every time down; README's times are from an idle CPU.
--quick trains 20 steps with smaller sample grids, only to check that the script works.
"""

import functools
import json
import os
import re
import tempfile
import types

from absl import app
from absl import flags

from benchmarks import measure

PARTS = ('summary', 'train', 'sample', 'psd', 'prior_overlap', 'analyses', 'sigma0', 'cache')
ANALYSES = {  # the other analysis modes of README's table, with README's arguments
    'same_init': [],
    'share_noise': [],
    'interpolate': [],
    'hierarchical': [],
    'delta_grid': ['--config.analysis.num_rows=4'],
    'frequency_partition': [],
    'input_gradients': [],
    'trajectory_gradients': ['--config.analysis.num_rows=2'],
    'nearest_neighbours': [],
}
SIGMA0 = ['--config.model.sigma=0', '--config.sampling.delta=0']

QUICK = ['--config.training.n_iters=20', '--config.training.log_freq=10']
QUICK += ['--config.sampling.num_samples=8', '--config.sampling.batch_size=8']
# part: {key: (figure, format of the value now, regex of README.md's value in its text with the
# whitespace collapsed)}. A regex that no longer matches shows "not found": README's wording
# changed, and this must follow. The losses, loss_<step>, come from LOSSES and the run's log.
FIGURES = {
    'summary': {'params_M': ('U-Net parameters (M)', '.2f', r'groups, ([\d.]+) M parameters')},
    'train': {
        'wall_s': ('training run, wall time', 'min', r'took \*\*(\d+ min \d+ s)\*\* of wall'),
        'train_s': ('training steps (s)', '.0f', r'the training steps ([\d.]+) s at'),
        'steps_per_s': ('training steps/s', '.1f', r'([\d.]+) steps/s, compilation'),
        'compile_s': ('compilation (s)', '.1f', r'steps/s, compilation ([\d.]+) s'),
        'sampling_s': ('four sample grids (s)', '.0f', r'four sample grids ([\d.]+) s'),
    },
    'sample': {'sample_wall_s': ('--mode=sample (s)', '.0f', r'sample` another ([\d.]+) s')},
    'psd': {
        'alpha': ('PSD power-law exponent α', '.2f', r'spectrum fits α = ([\d.]+)'),
        'psd_s': ('--mode=psd (s)', '.0f', r'`psd` (?:took )?(\d+) s'),
    },
    'prior_overlap': {
        'prior_overlap_s': ('--mode=prior_overlap (s)', '.0f', r'`prior_overlap` (\d+) s'),
        'L_K_0.5': ('L_K at σ_B,max 0.5 (bits/dim)', '.2g', r'from ([\d.]+) bits/dim at σ'),
        'L_K_5': ('L_K at σ_B,max 5 (bits/dim)', '.2g', r"to ([\d.]+) at the model's σ"),
        'L_K_16': ('L_K at σ_B,max 16 (bits/dim)', '.2g', r'and ([\d.]+) at 16'),
    },
    'analyses': {
        f'{mode}_s': (f'--mode={mode} (s)', '.0f', rf'`{mode}` (?:took )?(\d+) s')
        for mode in ANALYSES
    },
    'sigma0': {
        'sigma0_wall_s': (
            'σ = 0 model, training wall time',
            'min',
            r'0 model \(2000 steps, (\d+ min \d+ s)\)',
        ),
    },
    'cache': {
        'cache_wall_s_1': ('launch 1, wall (s)', '.0f', r'took (\d+) s and \d+ s: the training'),
        'cache_wall_s_2': ('launch 2, wall (s)', '.0f', r'took \d+ s and (\d+) s: the training'),
        'cache_compile_s_1': ('launch 1, compilation (s)', '.1f', r'step compiled in ([\d.]+) s'),
        'cache_compile_s_2': ('launch 2, compilation (s)', '.1f', r'and loaded in ([\d.]+) s'),
        'cache_grid_s_1': ('launch 1, first grid (s)', '.1f', r'grid took ([\d.]+) s and'),
        'cache_grid_s_2': ('launch 2, first grid (s)', '.1f', r'grid took [\d.]+ s and ([\d.]+)'),
    },
}
LOSSES = r'The loss went ((?:[\d.]+ \((?:step )?\d+\)(?: → )?)+)'


def readme_values(text):
    """{key: README.md's value as written} for each regex of FIGURES that matches, and loss_<step>
    for each step of its sentence 'The loss went 0.0256 (step 100) → ...'."""
    text = ' '.join(text.split())
    regexes = {key: f[2] for figures in FIGURES.values() for key, f in figures.items()}
    found = {key: m[1] for key, regex in regexes.items() if (m := re.search(regex, text))}
    if losses := re.search(LOSSES, text):
        for value, step in re.findall(r'([\d.]+) \((?:step )?(\d+)\)', losses[1]):
            found[f'loss_{step}'] = value
    return found


def parse_train_log(log):
    """The figures of a training run's log: its time by phase, steps/s, the time of its first
    sample grid and the loss of each logged step."""
    out = {f'loss_{s}': float(v) for s, v in re.findall(r'step (\d+): loss ([\d.e+-]+|nan)', log)}
    summary = re.search(
        r'Steps \d+ to \d+ in \S+: training steps ([\d.]+) s \(([\d.]+) steps/s\), '
        r'compilation ([\d.]+) s, sampling ([\d.]+) s',
        log,
    )
    if summary is None:
        raise ValueError('The log has no line "Steps A to B in ...": did the run finish?')
    keys = ('train_s', 'steps_per_s', 'compile_s', 'sampling_s')
    out.update(zip(keys, map(float, summary.groups())))
    if grid := re.search(r'\(sampling: ([\d.]+) s\)', log):
        out['grid_s'] = float(grid[1])
    return out


def run(args, tmp):
    """measure.run_main with the temporary folder shown as <tmp>."""
    seconds, output, shown = measure.run_main(args)
    return seconds, output, shown.replace(tmp, '<tmp>')


def measure_all(parts, quick, tmp):
    """{key: measured value} and {part: command} of the chosen parts, run in a folder `tmp`."""
    base = ['--config=configs/digits.py', f'--workdir={tmp}/digits'] + (QUICK if quick else [])
    got, commands = {}, {}
    if 'summary' in parts:
        _, out, commands['summary'] = run(base + ['--mode=summary'], tmp)
        got['params_M'] = int(re.search(r'parameters: (\d+)', out)[1]) / 1e6
    if 'train' in parts:
        got['wall_s'], log, commands['train'] = run(base, tmp)
        got.update(parse_train_log(log))
    if 'sample' in parts:
        got['sample_wall_s'], _, commands['sample'] = run(base + ['--mode=sample'], tmp)
    for mode in ('psd', 'prior_overlap'):
        if mode in parts:
            got[f'{mode}_s'], _, commands[mode] = run(base + [f'--mode={mode}'], tmp)
            with open(os.path.join(tmp, 'digits', 'analysis', mode, f'{mode}.json')) as fp:
                result = json.load(fp)
            if mode == 'psd':
                got['alpha'] = result['power_law_exponent']
            else:
                for r in result['results']:
                    got[f'L_K_{r["blur_sigma_max"]:g}'] = r['L_K_bits_per_dim']
    for mode, args in ANALYSES.items() if 'analyses' in parts else ():
        got[f'{mode}_s'], _, commands[f'analyses: {mode}'] = run(
            base + [f'--mode={mode}'] + args, tmp
        )
    if 'sigma0' in parts:
        sigma0 = ['--config=configs/digits.py', f'--workdir={tmp}/digits_sigma0', *SIGMA0]
        sigma0 += QUICK if quick else []
        got['sigma0_wall_s'], _, commands['sigma0'] = run(sigma0, tmp)
        gradients = ['--mode=trajectory_gradients', '--config.analysis.num_rows=2']
        gradients += ['--config.analysis.gradient_linthresh=0.002']
        _, _, commands['sigma0: trajectory_gradients'] = run(sigma0 + gradients, tmp)
    for i in (1, 2) if 'cache' in parts else ():
        args = ['--config=configs/digits.py', f'--workdir={tmp}/digits_{i}']
        args += ['--config.training.n_iters=20', f'--config.compilation_cache_dir={tmp}/cache']
        got[f'cache_wall_s_{i}'], log, shown = run(args, tmp)
        commands['cache'] = shown.replace(f'digits_{i}', 'digits_N') + '  (twice)'
        got.update({f'cache_{key}_{i}': value for key, value in parse_train_log(log).items()})
    return got, commands


def rows(readme, got, commands):
    """The table's rows, (figure, README's value, the value now, part), of the parts that ran; the
    losses at README's steps and at each step the run logged."""
    steps = sorted({int(k[5:]) for k in [*readme, *got] if k.startswith('loss_')})
    losses = {f'loss_{s}': (f'loss at step {s}', '.4f') for s in steps}
    out = []
    ran = {command.split(':')[0] for command in commands}
    for part, figures in {**FIGURES, 'train': {**FIGURES['train'], **losses}}.items():
        for key, (figure, fmt, *regex) in figures.items() if part in ran else ():
            value = got.get(key)
            if value is not None and fmt == 'min':
                value = '{} min {:02d} s'.format(*divmod(round(value), 60))
            elif value is not None:
                value = format(value, fmt)
            quoted = readme.get(key, 'not found' if regex else '–')
            out.append((figure, quoted, value or '–', part))
    return out


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to the other benchmarks, which define --json too)."""
    return types.SimpleNamespace(
        parts=flags.DEFINE_list('parts', list(PARTS), f'What to run, of {",".join(PARTS)}.'),
        quick=flags.DEFINE_bool('quick', False, 'A short run to check the script: not comparable.'),
        json=flags.DEFINE_string('json', None, 'Write the results as JSON here (a new file).'),
        keep=flags.DEFINE_string('keep', None, 'Run in this new folder and keep it.'),
    )


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if unknown := set(f.parts.value) - set(PARTS):
        raise app.UsageError(f'--parts: unknown {sorted(unknown)}; choose from {PARTS}.')
    measure.check_new_file(f.json.value)
    if f.keep.value and os.path.exists(f.keep.value):
        raise app.UsageError(f'--keep={f.keep.value} exists; give a new folder.')
    info = measure.device_info()  # the CPU and its load average before the runs start
    info['devices'] = 'one per core'  # ihdm_jax.main's, not this process's one device
    with open(os.path.join(measure.ROOT, 'README.md')) as fp:
        readme = readme_values(fp.read())
    if f.keep.value:
        os.makedirs(f.keep.value)
        got, commands = measure_all(f.parts.value, f.quick.value, os.path.abspath(f.keep.value))
    else:
        with tempfile.TemporaryDirectory(prefix='readme_figures_') as tmp:
            got, commands = measure_all(f.parts.value, f.quick.value, tmp)
    table = rows(readme, got, commands)
    print(measure.describe(info))
    if f.quick.value:
        print('--quick: 20 steps, 8 samples: the train and sample figures are NOT comparable.')
    if not any(key.startswith('loss_') for key in readme):
        print('README.md: no sentence "The loss went ..." found; LOSSES must follow its wording.')
    print('\n| figure | README.md | now | run |\n|---|---:|---:|---|')
    print('\n'.join(f'| {a} | {b} | {c} | {d} |' for a, b, c, d in table))
    print('\nThe runs (<tmp>: a new temporary folder):\n')
    print('\n'.join(f'- {part}: `{command}`' for part, command in commands.items()))
    if f.json.value:
        keys = ('figure', 'readme', 'now', 'run')
        payload = dict(info, command=measure.command(__spec__.name), quick=f.quick.value)
        payload.update(measured=got, rows=[dict(zip(keys, row)) for row in table], runs=commands)
        measure.write_json(f.json.value, payload)


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
