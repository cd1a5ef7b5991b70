"""Command line: python -m ihdm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10.

--mode is train (the default), sample, summary, an evaluation (eval, fid, sweep_delta) or an
analysis (same_init, share_noise, interpolate, hierarchical, psd, input_gradients, prior_overlap,
nearest_neighbours); see README.md.

Multi-process jobs: under srun (several tasks) or on a TPU pod the processes find each other by
themselves (--multihost forces that detection); processes started by hand pass
--coordinator_address, --num_processes and --process_id.
"""

import importlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ihdm_jax import validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
# --mode -> (module, function); the function takes (config, workdir).
JOBS = {
    'train': ('ihdm_jax.train', 'train_and_evaluate'),
    'sample': ('ihdm_jax.train', 'sample_and_save'),
    'eval': ('ihdm_jax.evaluate', 'likelihood'),
    'fid': ('ihdm_jax.evaluate', 'fid'),
    'sweep_delta': ('ihdm_jax.evaluate', 'sweep_delta'),
    'same_init': ('ihdm_jax.analysis.jobs', 'same_init'),
    'share_noise': ('ihdm_jax.analysis.jobs', 'share_noise'),
    'interpolate': ('ihdm_jax.analysis.jobs', 'interpolate'),
    'hierarchical': ('ihdm_jax.analysis.jobs', 'hierarchical'),
    'psd': ('ihdm_jax.analysis.jobs', 'psd'),
    'input_gradients': ('ihdm_jax.analysis.jobs', 'input_gradients'),
    'prior_overlap': ('ihdm_jax.analysis.jobs', 'prior_overlap'),
    'nearest_neighbours': ('ihdm_jax.analysis.jobs', 'nearest_neighbours'),
}
_MODE = flags.DEFINE_enum('mode', 'train', list(JOBS) + ['summary'], 'What to do.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Continue training in a workdir whose config.json differs from --config in settings that '
    'define the run (the old file is kept as config.<time>.json).')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Start jax.distributed with cluster auto-detection (TPU pods, SLURM).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for processes started by hand.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index.")
flags.mark_flags_as_required(['config'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config, mode, workdir = _CONFIG.value, _MODE.value, _WORKDIR.value
    try:
        validation.check_config(config)
        if mode == 'summary':
            from ihdm_jax.models import unet
            print(unet.summary(config))
            return
        if not workdir:
            raise validation.UserError(f'--mode={mode} needs --workdir.')
        validation.check_data(config)
        if mode in ('fid', 'sweep_delta'):
            from ihdm_jax.evaluation import fid
            fid.resolve_weights(config.evaluation.inception_weights or None)
        from ihdm_jax import parallel
        parallel.initialize(multihost=_MULTIHOST.value, coordinator_address=_COORDINATOR.value,
                            num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
        validation.check_workdir(config, workdir, training=mode == 'train',
                                 allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        module, function = JOBS[mode]
        getattr(importlib.import_module(module), function)(config, workdir)
    except validation.UserError as error:
        sys.exit(f'Error: {error}')


def _parse_flags(argv):
    """absl's flag parsing, with one line for each mistake instead of usage text or traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # a bad flag value, or a config file that fails to load
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        sys.exit(f'Error: {lines[0]} {lines[-1]}' if 'Traceback' in str(error) else
                 f'Error: {lines[0]}')
    except AttributeError:  # ml_collections' answer to an override of a key the config lacks
        for arg in argv[1:]:
            if arg.startswith('--config.'):
                message = validation.unknown_key(arg[len('--config.'):].split('=')[0])
                if message:
                    sys.exit(f'Error: {message} (in {arg})')
        raise


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
