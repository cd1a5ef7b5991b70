"""Sample quality against cost: FID and wall time against network evaluations, for one trained
workdir and a list of samplers.

  python -m benchmarks.samplers --workdir=runs/digits_continuous \
      --runs=ancestral:50,ddim:5,ddim:10,ddim:20,ddim:50 [--num_samples=1000] \
      --reference_stats=FILE [--out=DIR]
  python -m benchmarks.samplers --combine=DIR1/samplers.json,DIR2/samplers.json --out=DIR

Each entry of --runs is SAMPLER:STEPS[:ETA] (config.sampling.sampler, .steps, .eta; steps 0 =
every level of the process). For each, the EMA model of the workdir's newest checkpoint draws
--num_samples samples as --mode=fid does (after one compiled batch, so the time is sampling
alone), and --mode=fid's evaluator takes their FID against the reference statistics of
--reference_stats (config.evaluation.fid_train_stats: written there first if the file does not
exist; the statistics of a --mode=fid run, eval/train_stats_*.npz, can be given). Network
evaluations per sample = the sampler's steps. Prints a table and, with --out, writes samplers.json,
samplers.md, samplers.png (FID against network evaluations, one line per sampler) and a grid
of 64 samples of each entry, samples_<sampler>_<steps>[_<eta>].png. --combine draws the rows of
several such runs (e.g. of different processes) in one samplers.png in --out.
"""

import functools
import json
import os
import time
import types

from absl import app
from absl import flags
from matplotlib.figure import Figure

from benchmarks import measure
from ihdm_jax import data
from ihdm_jax import images
from ihdm_jax import loading
from ihdm_jax import rng
from ihdm_jax import storage
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.jobs import evaluate


def _define_flags():
    """The command line's flags, defined only when this module runs as a script (so that the
    tests can import it next to ihdm_jax.main, which defines --workdir too)."""
    return types.SimpleNamespace(
        workdir=flags.DEFINE_string('workdir', None, 'The trained workdir.'),
        runs=flags.DEFINE_list('runs', None, 'SAMPLER:STEPS[:ETA] entries.'),
        num=flags.DEFINE_integer('num_samples', 1000, 'Samples per entry.'),
        stats=flags.DEFINE_string('reference_stats', None, 'Reference statistics (.npz).'),
        out=flags.DEFINE_string('out', None, 'Folder for the table, plot and sample grids.'),
        combine=flags.DEFINE_list('combine', None, 'samplers.json files to plot together.'),
    )


def parse_run(entry: str, config):
    """The config of entry SAMPLER:STEPS[:ETA] (checked as the jobs check theirs)."""
    parts = entry.split(':')
    if len(parts) not in (2, 3):
        raise app.UsageError(f'--runs entry {entry!r} is not SAMPLER:STEPS[:ETA].')
    config = config.copy_and_resolve_references()
    config.sampling.sampler, config.sampling.steps = parts[0], int(parts[1])
    if len(parts) == 3:
        config.sampling.eta = float(parts[2])
    validation.check_config(config)
    return config


def label(config) -> str:
    s = config.sampling
    eta = f' η={s.eta:g}' if s.sampler == 'ddim' else ''
    return f'{s.sampler}{eta}'


def measure_run(model, config, workdir, source):
    """(network evaluations per sample, seconds, FID, samples) of one entry."""
    evaluator = evaluate.FidEvaluator(config, workdir, model.mesh, source)
    key = rng.sample_key(config.seed)
    evaluator.sampler.draw(model.params, source, config.sampling.batch_size, key)  # compiles
    start = time.perf_counter()
    samples = evaluator.samples(model.params, config.sampling.delta)
    seconds = time.perf_counter() - start
    return evaluator.sampler.steps, seconds, evaluator(samples), samples


def plot(path, rows, title):
    fig = Figure(figsize=(6, 4.2), dpi=100, layout='constrained')
    ax = fig.add_subplot()
    for name in dict.fromkeys(row['label'] for row in rows):
        points = sorted((r['nfe'], r['fid']) for r in rows if r['label'] == name)
        ax.plot(*zip(*points), marker='o', label=name)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('network evaluations per sample')
    ax.set_ylabel('FID')
    ax.set_title(title, fontsize=9)
    ax.legend()
    storage.write_with(path, fig.savefig, format='png')


def combine(paths, out):
    """One plot of the rows of several samplers.json, each labelled with its run's process."""
    rows = []
    for path in paths:
        run = json.loads(storage.read_text(path))
        process = workdir_lib.read_config(run['workdir']).model.process
        rows += [row | dict(label=f'{process}: {row["label"]}') for row in run['rows']]
    storage.makedirs(out)
    num = {json.loads(storage.read_text(path))['num_samples'] for path in paths}
    plot(os.path.join(out, 'samplers.png'), rows, f'FID of {"/".join(map(str, num))} samples')


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if f.combine.value:
        if not f.out.value:
            raise app.UsageError('--combine needs --out.')
        combine(f.combine.value, f.out.value)
        return
    for name, flag in (('workdir', f.workdir), ('runs', f.runs), ('reference_stats', f.stats)):
        if not flag.value:
            raise app.UsageError(f'--{name} is required.')
    workdir = f.workdir.value
    base = workdir_lib.read_config(workdir)
    base.evaluation.fid_num_samples = f.num.value
    base.evaluation.fid_train_stats = f.stats.value
    configs = [parse_run(entry, base) for entry in f.runs.value]
    model = loading.restore(base, workdir)
    source = data.make_source(base)
    if f.out.value:
        storage.makedirs(f.out.value)
    rows = []
    for config in configs:
        nfe, seconds, fid, samples = measure_run(model, config, workdir, source)
        s = config.sampling
        rows.append(
            dict(label=label(config), sampler=s.sampler, eta=s.eta, steps=s.steps, nfe=nfe)
            | dict(seconds=seconds, fid=fid)
        )
        print(f'{label(config)}, {nfe} steps: FID {fid:.2f}, {seconds:.1f} s', flush=True)
        if f.out.value:
            eta = f'_{s.eta:g}' if s.sampler == 'ddim' else ''
            name = f'samples_{s.sampler}_{nfe}{eta}.png'
            images.save_grid(os.path.join(f.out.value, name), samples[:64])
    title = (
        f'{base.model.process}, {base.data.dataset}, checkpoint {model.step}: '
        f'FID of {f.num.value} samples'
    )
    table = [
        f'{title}, δ = {base.sampling.delta}\n',
        '| sampler | network evaluations | FID | sampling time (s) |',
        '|---|---:|---:|---:|',
    ] + [f'| {r["label"]} | {r["nfe"]} | {r["fid"]:.2f} | {r["seconds"]:.1f} |' for r in rows]
    print('\n'.join(table))
    if f.out.value:
        measure.write_json(
            os.path.join(f.out.value, 'samplers.json'),
            dict(
                **measure.device_info(),
                workdir=workdir,
                step=model.step,
                num_samples=f.num.value,
                rows=rows,
            ),
        )
        storage.write_text(os.path.join(f.out.value, 'samplers.md'), '\n'.join(table) + '\n')
        plot(os.path.join(f.out.value, 'samplers.png'), rows, title)


if __name__ == '__main__':
    app.run(functools.partial(main, f=_define_flags()))
