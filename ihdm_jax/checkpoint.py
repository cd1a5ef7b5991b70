"""Orbax checkpoints of the training state under <workdir>/checkpoints, and the run's config.

Every process calls `save` and `restore`; orbax coordinates the writes. Saves are asynchronous:
`save` returns once the arrays are copied off the devices, and files are written in the
background. Restoring places the arrays on the shardings of the given abstract state, so a run
can resume on a different device count.
"""

import json
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ihdm_jax import parallel

MAX_TO_KEEP = 3


def make_manager(workdir: str, snapshot_freq: int) -> ocp.CheckpointManager:
    """A manager that keeps the newest MAX_TO_KEEP checkpoints, saved every snapshot_freq steps
    and when the job is being preempted."""
    policy = checkpoint_managers.AnySavePolicy([
        checkpoint_managers.FixedIntervalPolicy(snapshot_freq),
        checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, save_decision_policy=policy,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
    """Saves `state` as checkpoint `step` if the policy (or `force`) says so."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """The newest checkpoint restored onto abstract_state's shardings, or None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def save_config(config, workdir: str):
    """Writes the resolved config to <workdir>/config.json (process 0 only)."""
    if not parallel.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
        f.write('\n')
