"""A run's workdir: its config.json, what it must hold for a job, and how a config differs
from the run's.

The checkpoints themselves are orbax's (checkpoint.py); the lock of a training job is lock.py's.
"""

import datetime
import json
import os
import pathlib

import ml_collections

from ihdm_jax import checkpoint
from ihdm_jax import defaults
from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import storage
from ihdm_jax import validation

CONFIG_FILE = 'config.json'

# Settings that define a training run; a workdir refuses to continue a run with other values.
# Everything else (n_iters, frequencies, data_dir, sampling, evaluation, analysis) may change.
RUN_KEYS = ('seed', 'data', 'model', 'optim', 'training.batch_size')
# Settings a checkpoint's parameters depend on, checked by the jobs that only read the run.
MODEL_KEYS = ('data', 'model')
_FREE_KEYS = ('data.data_dir', 'data.test_dir', 'data.cache_mb')


def _like_default(value, default):
    """JSON's lists back into the tuples of the defaults (nested ones included)."""
    if isinstance(default, tuple) and isinstance(value, list):
        inner = default[0] if default else None
        return tuple(_like_default(v, inner) for v in value)
    return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of <workdir>/config.json on top of the defaults, checked."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.isfile(path):
        raise errors.UserError(
            f'{path} does not exist: {workdir} is not a workdir of ihdm_jax '
            '(train with ihdm_jax.main, or convert an original checkpoint '
            'with ihdm_jax.convert_original).'
        )
    try:
        saved = validation.flatten(json.loads(storage.read_text(path)))
    except (OSError, ValueError, AttributeError) as error:
        raise errors.UserError(f'{path} cannot be read ({error}).') from None
    config = defaults.get_default_config()
    known = validation.flatten(config)
    for key, value in saved.items():
        message = validation.unknown_key(key, known)
        if message:
            raise errors.UserError(f'{path}: {message}')
        *parents, leaf = key.split('.')
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = _like_default(value, known[key])
    validation.check_config(config)
    return config


def _jsonable(value):
    return json.loads(json.dumps(value)) if value is not None else None


def config_differences(config, workdir: str, training: bool) -> list:
    """(key, value in config.json, value now) for each setting that defines the run (RUN_KEYS
    when training, MODEL_KEYS otherwise) and differs; [] without a config.json."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        return []
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, ValueError) as error:
        raise errors.UserError(
            f'{path} cannot be read ({error}); restore it or use a new --workdir.'
        ) from None
    now = validation.flatten(json.loads(config.to_json_best_effort()))
    # A key that config.json lacks (added to ihdm_jax/defaults.py after the run) has its default.
    before = {
        **validation.flatten(json.loads(defaults.get_default_config().to_json_best_effort())),
        **validation.flatten(saved),
    }
    keys = RUN_KEYS if training else MODEL_KEYS
    in_scope = [
        k
        for k in set(now) | set(before)
        if any(k == p or k.startswith(p + '.') for p in keys) and k not in _FREE_KEYS
    ]
    return [
        (k, before.get(k), now.get(k))
        for k in sorted(in_scope)
        if _jsonable(before.get(k)) != _jsonable(now.get(k))
    ]


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check(config, workdir: str, use: str, allow_config_change=False):
    """The workdir suits the job, checked without writing anything.

    use='train': the workdir can be created or written and holds no run of another config
    (RUN_KEYS; allow_config_change lets training continue with new values). use='results': it
    can be created or written. use='trained': it holds a checkpoint trained with the same
    MODEL_KEYS settings.
    """
    if storage.is_remote(workdir):
        storage.check_reachable(workdir, '--workdir')
    elif use in ('train', 'results'):
        existing = _nearest_existing(pathlib.Path(workdir).absolute())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = 'is not a directory' if not existing.is_dir() else 'cannot be written'
            raise errors.UserError(
                f'--workdir={workdir} cannot be written ({existing} {what}); '
                'choose a directory you can write to.'
            )
    if use == 'results':
        return
    if use == 'trained' and not checkpoint.steps_on_disk(workdir):
        where = 'does not exist' if not storage.exists(workdir) else 'holds no checkpoint'
        raise errors.UserError(
            f'--workdir={workdir} {where}: train first (--mode=train), or '
            'point --workdir at a trained run.'
        )
    training = use == 'train'
    changed = config_differences(config, workdir, training)
    if not changed or (training and allow_config_change):
        return
    saved_path = storage.join(workdir, CONFIG_FILE)
    lines = '\n'.join(
        f'  config.{k}: {before!r} in {saved_path}, {now!r} now' for k, before, now in changed
    )
    how = (
        'Use a new --workdir, or pass --allow_config_change to continue this run with the '
        'new values.'
        if training
        else 'Pass the config that trained this run (its values are in config.json).'
    )
    raise errors.UserError(
        f'--workdir={workdir} holds a run of a different config:\n{lines}\n{how}'
    )


def save_config(config, workdir: str):
    """Writes the resolved config to <workdir>/config.json atomically (process 0 only).

    A config.json with other run settings (a run continued with --allow_config_change) is kept
    as config.<time>.json.
    """
    if not parallel.is_main_process():
        return
    storage.makedirs(workdir)
    path = storage.join(workdir, CONFIG_FILE)
    if config_differences(config, workdir, training=True):
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        storage.rename(path, storage.join(workdir, f'config.{stamp}.json'))
    tmp = f'{path}.tmp'
    storage.write_text(
        tmp, json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + '\n'
    )
    storage.rename(tmp, path)
