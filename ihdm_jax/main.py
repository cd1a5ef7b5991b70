"""Command line: python -m ihdm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10.

--mode is train (the default), sample or summary.

Multi-process jobs: under srun (several tasks) or on a TPU pod the processes find each other by
themselves (--multihost forces that detection); processes started by hand pass
--coordinator_address, --num_processes and --process_id.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'summary'], 'What to do.')
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
    config = _CONFIG.value
    if _MODE.value == 'summary':
        from ihdm_jax.models import unet
        print(unet.summary(config))
        return
    if not _WORKDIR.value:
        raise app.UsageError(f'--mode={_MODE.value} needs --workdir.')
    from ihdm_jax import parallel
    from ihdm_jax import train
    parallel.initialize(multihost=_MULTIHOST.value, coordinator_address=_COORDINATOR.value,
                        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    if _MODE.value == 'train':
        train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == 'sample':
        train.sample_and_save(config, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
