"""Orbax checkpoints of the training state under <workdir>/checkpoints, and orbax's logging.

Every process calls `save` and the restores; orbax coordinates the writes. Saves are
asynchronous: `save` returns once the arrays are copied off the devices and the files are
written in the background. A save is complete once orbax marks it finished: on a local disk it
renames the save's temporary folder to the step number; on Cloud Storage, where a rename copies
every file, it writes into the step's folder and adds its commit file last. Which saves are
complete and which did not finish is orbax's judgement (orbax.checkpoint.path.step), here as in
orbax's manager.
Restoring places the arrays on the shardings of the given abstract tree, so a run can resume on
a different device count. Jobs that only read a run restore the EMA parameters alone.
"""

import logging as std_logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ihdm_jax import errors
from ihdm_jax import state as state_lib
from ihdm_jax import storage

MAX_TO_KEEP = 3
UNREADABLE = 'checkpoints_unreadable'  # where checkpoints that fail to restore are moved


class _OrbaxInfoFilter(std_logging.Filter):
    """Drops orbax's INFO records (a few dozen per checkpoint); its warnings and errors pass,
    without their tracebacks (a failed save ends the job with one line that names it). Also
    drops asyncio's "Task exception was never retrieved" for orbax's tasks: after a failed
    restore, orbax leaves tasks holding the error it raised, and asyncio logs each with a
    traceback whenever they are garbage-collected, long after the failure was reported."""

    def filter(self, record):
        if record.name == 'asyncio' and f'{os.sep}orbax{os.sep}' in record.getMessage():
            return False
        orbax = f'{os.sep}orbax{os.sep}' in record.pathname
        if orbax:
            record.exc_info = record.exc_text = None
        return record.levelno >= std_logging.WARNING or not orbax


def quiet_orbax():
    """Installs _OrbaxInfoFilter on absl's handler (once), for the rest of the process."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OrbaxInfoFilter) for f in handler.filters):
        handler.addFilter(_OrbaxInfoFilter())


def _directory(workdir: str) -> str:
    absolute = workdir if storage.is_remote(workdir) else os.path.abspath(workdir)
    return storage.join(absolute, 'checkpoints')


def _complete_steps(directory: str) -> list:
    """The steps of the complete checkpoints in `directory`, oldest first."""
    return sorted(ocp.path.step.checkpoint_steps(directory))


def steps_on_disk(workdir: str) -> list:
    """The steps of the complete checkpoints in `workdir`, oldest first."""
    return _complete_steps(_directory(workdir))


def make_manager(
    workdir: str,
    max_to_keep: int = MAX_TO_KEEP,
    keep_period: int = 0,
    remove_unfinished: bool = False,
) -> ocp.CheckpointManager:
    """A manager of <workdir>/checkpoints that keeps the newest `max_to_keep` checkpoints and,
    with keep_period > 0, every checkpoint whose step is a multiple of `keep_period`.

    The caller decides when to save. With remove_unfinished, which only the job holding the
    workdir's lock (ihdm_jax.lock) may pass, folders of saves that never finished (a killed job)
    are named in a warning and removed; other jobs leave them, as they may be a live job's save.
    """
    directory = _directory(workdir)
    if remove_unfinished:
        for unfinished in ocp.path.step.all_temporary_paths(directory):
            logging.warning(
                'Ignoring and removing %s: a checkpoint save that did not finish.',
                os.fspath(unfinished.get()),
            )
    policies = ocp.checkpoint_managers
    kept = [policies.LatestN(max_to_keep)] + (
        [policies.EveryNSteps(keep_period)] if keep_period else []
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(kept),
        enable_async_checkpointing=True,
        cleanup_tmp_directories=remove_unfinished,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_state_handler())


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's pytree handler, except that each replicated array is written whole by one replica.

    By default (on CPU and TPU) orbax slices every replicated array over its replicas and each
    replica writes a slice. For a state of hundreds of small arrays the slicing costs far more
    than it saves: the first save of configs/tiny.py's state on 8 devices took 12.4 s (200 slice
    programs compiled), each later one 1.0 s; written by one replica, 0.26 s and 0.12 s.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        *[
            (ty, ocp.type_handlers.get_type_handler(ty))
            for ty in ocp.type_handlers.supported_types()
        ],
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Saver:
    """Asynchronous saves that fail loudly: a save whose background writing failed (e.g. a full
    disk) raises errors.SaveFailed at the next `check`, naming the step and the cause."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.pending = None  # the step of the save being written

    def save(self, step: int, state):
        # orbax waits for the previous save before starting one; waiting here names its failure.
        self.check(wait=True)
        self.pending = step
        try:
            self.manager.save(step, args=ocp.args.PyTreeSave(state), force=True)
        except Exception as error:  # e.g. the step's folder cannot be created
            raise self._failed(error) from None

    def check(self, wait=False):
        """Raises errors.SaveFailed if the pending save failed; with wait, waits for it first.

        orbax's finalize thread swallows the error it logs (check_for_errors stays silent) and
        keeps it for wait_until_finished, which is called here once the save is no longer in
        progress, so that a failure stops training at the next check.
        """
        if self.pending is None:
            return
        try:
            if wait or not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
                self.pending = None
        except Exception as error:  # orbax re-raises whatever the writing thread raised
            raise self._failed(error) from None

    def _failed(self, error) -> errors.SaveFailed:
        cause = str(error).strip().splitlines()
        return errors.SaveFailed(
            f'Saving checkpoint {self.pending} in {self.manager.directory} failed '
            f'({type(error).__name__}: {cause[0] if cause else ""}). Training stopped; the '
            f'checkpoints already there are intact (newest: {_newest(self.manager)}).'
        )

    def close(self):
        """Closes the manager; a failed save has been reported by `check` already."""
        try:
            self.manager.close()
        except Exception as error:  # the failure `check` raised, or one behind another error
            logging.debug('Closing the checkpoint manager: %s', error)


def _newest(manager):
    steps = _complete_steps(manager.directory)
    return steps[-1] if steps else 'none'


def _set_aside(manager: ocp.CheckpointManager, steps):
    """Moves the checkpoints `steps` to <workdir>/checkpoints_unreadable/ (process 0 moves).

    If the move fails, every process raises errors.UserError: left in place, an unreadable
    checkpoint would count for orbax among the newest ones it keeps, and orbax would refuse to
    save its step again.
    """
    directory = os.fspath(manager.directory)
    aside = storage.join(storage.parent(directory), UNREADABLE)
    cause = None  # why process 0's move failed
    if jax.process_index() == 0:
        try:
            for step in steps:
                target = storage.join(aside, str(step))
                while storage.exists(target):
                    target += '_'
                storage.move_tree(storage.join(directory, str(step)), target)
        except Exception as error:  # e.g. no permission to write or delete there
            lines = str(error).strip().splitlines()
            cause = f'{type(error).__name__}: {lines[0] if lines else ""}'
    failed = cause is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if failed:
        raise errors.UserError(
            f'Checkpoints {sorted(steps)} in {directory} cannot be read, and moving them to '
            f'{aside} failed ({cause or "the cause is in the error of process 0"}). Move or '
            'delete them, then launch again.'
        )
    manager.reload()


def _restore_newest(manager: ocp.CheckpointManager, restore):
    """(restore(step), step) for the newest checkpoint that restores; (None, None) if none.

    A checkpoint that fails to restore while an older one restores is corrupt or incomplete: it
    is named in a warning and moved to <workdir>/checkpoints_unreadable/. If none restores,
    nothing is moved and a UserError says why.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(step)
        except Exception as error:  # orbax and tensorstore raise many types for bad files
            failed.append((step, error))
            continue
        for bad, error in failed:
            logging.warning(
                'Checkpoint %s cannot be read (%s: %s); skipping it and moving it to %s.',
                storage.join(manager.directory, str(bad)),
                type(error).__name__,
                str(error).splitlines()[0],
                storage.join(storage.parent(manager.directory), UNREADABLE),
            )
        if failed:
            _set_aside(manager, [bad for bad, _ in failed])
        return restored, step
    if failed:
        step, error = failed[0]
        raise errors.UserError(
            f'No checkpoint in {manager.directory} can be restored (steps '
            f'{[s for s, _ in failed]}); checkpoint {step}: {type(error).__name__}: '
            f'{str(error).splitlines()[0]}. If the config changed, pass the config these '
            'checkpoints were written with; if they are damaged, move them away to start afresh.'
        )
    return None, None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Checkpoint `step`, placed on abstract_state's shardings."""
    return manager.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        ),
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """The newest checkpoint that restores, placed on abstract_state's shardings; None if none."""
    state, _ = _restore_newest(manager, lambda step: restore(manager, step, abstract_state))
    return state


def restore_ema_params(config, workdir: str, mesh):
    """(EMA parameters, step) of the newest checkpoint in `workdir`, replicated over `mesh`.

    Only the EMA parameters are read (an orbax partial restore), not the optimizer state.
    """
    target = {'ema_params': state_lib.abstract_params(config, mesh)}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        target,
    )
    manager = make_manager(workdir)
    try:
        restored, step = _restore_newest(
            manager,
            lambda step: manager.restore(
                step,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            ),
        )
    finally:
        manager.close()
    if restored is None:
        raise errors.UserError(
            f'No checkpoint in {_directory(workdir)}: train first (--mode=train).'
        )
    return restored['ema_params'], step
