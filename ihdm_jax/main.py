"""Command line: python -m ihdm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10.

--mode is train (the default), sample, restore, summary, an evaluation (eval, fid,
sweep_delta) or an analysis (same_init, share_noise, interpolate, hierarchical, delta_grid, psd,
frequency_partition, input_gradients, trajectory_gradients, prior_overlap, nearest_neighbours);
see README.md. Any config value can be overridden as --config.KEY=VALUE.

Every check (the config, the data, the mode's settings and files, the workdir) runs before the
job writes anything; a failure ends with one line, `Error: ...`, and exit status 1.

Multi-process jobs: under srun (several tasks) or on a TPU pod the processes find each other by
themselves (--multihost forces that detection); processes started by hand pass
--coordinator_address, --num_processes and --process_id.
"""

import contextlib
import dataclasses
import sys
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from ihdm_jax import checkpoint
from ihdm_jax import command_line
from ihdm_jax import data
from ihdm_jax import errors
from ihdm_jax import lock
from ihdm_jax import parallel
from ihdm_jax import processes
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib
from ihdm_jax.jobs import evaluate
from ihdm_jax.jobs import forward_process
from ihdm_jax.jobs import probing
from ihdm_jax.jobs import restore
from ihdm_jax.jobs import sample
from ihdm_jax.jobs import train
from ihdm_jax.jobs import variants
from ihdm_jax.models import unet


def _no_check(config):
    del config


@dataclasses.dataclass(frozen=True)
class Job:
    run: Callable  # (config, workdir)
    check: Callable = _no_check  # (config) -> None; raises errors.UserError
    workdir: str = 'trained'  # 'trained': needs a checkpoint; 'train', 'results': is written


JOBS = {
    'train': Job(train.train, train.check, workdir='train'),
    'sample': Job(sample.sample, sample.check),
    'eval': Job(evaluate.likelihood, evaluate.check_eval),
    'fid': Job(evaluate.fid, evaluate.check_fid),
    'sweep_delta': Job(evaluate.sweep_delta, evaluate.check_sweep_delta),
    'restore': Job(restore.restore, restore.check),
    'same_init': Job(variants.same_init, variants.check_rows_columns),
    'share_noise': Job(variants.share_noise, variants.check_rows_columns),
    'interpolate': Job(variants.interpolate, variants.check_interpolate),
    'hierarchical': Job(variants.hierarchical, variants.check_hierarchical),
    'delta_grid': Job(variants.delta_grid, variants.check_delta_grid),
    'input_gradients': Job(probing.input_gradients, probing.check_input_gradients),
    'trajectory_gradients': Job(probing.trajectory_gradients, probing.check_trajectory_gradients),
    'nearest_neighbours': Job(probing.nearest_neighbours, probing.check_nearest_neighbours),
    'psd': Job(forward_process.psd, forward_process.check_psd, workdir='results'),
    'prior_overlap': Job(
        forward_process.prior_overlap, forward_process.check_prior_overlap, workdir='results'
    ),
    'frequency_partition': Job(
        forward_process.frequency_partition,
        forward_process.check_frequency_partition,
        workdir='results',
    ),
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', list(JOBS) + ['summary'], 'What to do.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change',
    False,
    'Continue training in a workdir whose config.json differs from --config in settings that '
    'define the run (the old file is kept as config.<time>.json).',
)
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Start jax.distributed with cluster auto-detection (TPU pods, SLURM).'
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for processes started by hand.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index.")


def run(config, mode, workdir, **options):
    """Checks everything `mode` needs, then runs its job; errors.JobError if a check fails."""
    validation.check_config(config)
    processes.check_mode(config, mode)
    if mode == 'summary':
        print(unet.summary(config))
        return
    if not workdir:
        raise errors.UserError(f'--mode={mode} needs --workdir.')
    data.check(config)
    data.resolve_classes(config)
    job = JOBS[mode]
    parallel.initialize(
        multihost=options.get('multihost', False),
        coordinator_address=options.get('coordinator_address'),
        num_processes=options.get('num_processes'),
        process_id=options.get('process_id'),
    )
    job.check(config)
    workdir_lib.check(
        config, workdir, job.workdir, allow_config_change=options.get('allow_config_change', False)
    )
    checkpoint.quiet_orbax()
    # Training holds the workdir's lock; the other jobs only read checkpoints and may run beside it.
    with lock.WorkdirLock(workdir) if job.workdir == 'train' else contextlib.nullcontext():
        data.prepare(config)
        parallel.use_compilation_cache(config, workdir)
        job.run(config, workdir)


def main(argv):
    if len(argv) > 1:
        sys.exit(f'Error: unexpected arguments {argv[1:]}; flags look like --name=value.')
    config = _CONFIG.value
    parallel.use_cpu_cores([config.training.batch_size, config.sampling.batch_size])
    try:
        run(
            config,
            _MODE.value,
            _WORKDIR.value,
            multihost=_MULTIHOST.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        )
    except errors.JobError as error:
        sys.exit(f'Error: {error}')
    except KeyboardInterrupt:
        sys.exit(f'Error: interrupted (Ctrl-C) during --mode={_MODE.value}.')


if __name__ == '__main__':
    app.run(main, flags_parser=command_line.parse_flags)
