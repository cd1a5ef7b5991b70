"""Orbax checkpoints of the training state under <workdir>/checkpoints, and the run's config.

Every process calls `save` and `restore`; orbax coordinates the writes. Saves are asynchronous:
`save` returns once the arrays are copied off the devices, and files are written in the
background; a save is complete once orbax renames its folder to the step number. Restoring
places the arrays on the shardings of the given abstract state, so a run can resume on a
different device count.
"""

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ihdm_jax import parallel
from ihdm_jax import validation

MAX_TO_KEEP = 3
UNREADABLE = 'checkpoints_unreadable'  # where checkpoints that fail to restore are moved


def make_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager of <workdir>/checkpoints that keeps the newest MAX_TO_KEEP checkpoints.

    The caller decides when to save. Folders of saves that never finished (a killed job) are
    named in a warning and removed.
    """
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if not name.isdigit():
                logging.warning('Ignoring and removing %s: a checkpoint save that did not finish.',
                                os.path.join(directory, name))
    options = ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state):
    """Starts writing `state` as checkpoint `step`; returns once the arrays are off the devices."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _set_aside(manager: ocp.CheckpointManager, steps):
    """Moves the checkpoints `steps` to <workdir>/checkpoints_unreadable/ (process 0 moves)."""
    directory = pathlib.Path(manager.directory)
    aside = directory.parent / UNREADABLE
    if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            while target.exists():
                target = target.with_name(target.name + '_')
            (directory / str(step)).rename(target)
    multihost_utils.sync_global_devices('ihdm_jax checkpoints set aside')
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """The newest checkpoint that restores, placed on abstract_state's shardings; None if none.

    A checkpoint that fails to restore while an older one restores is corrupt or incomplete: it
    is named in a warning and moved to <workdir>/checkpoints_unreadable/. If none restores,
    nothing is moved and a UserError says why.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as error:  # orbax and tensorstore raise many types for bad files
            failed.append((step, error))
            continue
        for bad, error in failed:
            logging.warning('Checkpoint %s cannot be read (%s: %s); skipping it and moving it '
                            'to %s.', os.path.join(manager.directory, str(bad)),
                            type(error).__name__, str(error).splitlines()[0],
                            os.path.join(os.path.dirname(manager.directory), UNREADABLE))
        if failed:
            _set_aside(manager, [bad for bad, _ in failed])
        return state
    if failed:
        step, error = failed[0]
        raise validation.UserError(
            f'No checkpoint in {manager.directory} can be restored (steps '
            f'{[s for s, _ in failed]}); checkpoint {step}: {type(error).__name__}: '
            f'{str(error).splitlines()[0]}\nIf the config changed, pass the config these '
            'checkpoints were written with; if they are damaged, move them away to start afresh.')
    return None


def save_config(config, workdir: str):
    """Writes the resolved config to <workdir>/config.json (process 0 only)."""
    if not parallel.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
        f.write('\n')
