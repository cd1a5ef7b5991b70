"""Checks of the config, the data and the workdir before any work starts.

Every failure is a UserError: one message that names the bad value and says what was expected.
The command line prints it without a traceback and exits with status 1.
"""

import datetime
import difflib
import json
import os
import tempfile

from configs import default

TFDS_IMAGE_SIZES = {'mnist': 28, 'cifar10': 32}
FOLDER_DATASETS = ('afhq', 'ffhq', 'lsun_church')
DATASETS = ('digits',) + tuple(TFDS_IMAGE_SIZES) + FOLDER_DATASETS
CHANNELS = {'digits': 1, 'mnist': 1, 'cifar10': 3}  # image folders are converted as configured

# Settings that define a training run; a workdir refuses to continue a run with other values.
# Everything else (n_iters, frequencies, data_dir, sampling, evaluation, analysis) may change.
RUN_KEYS = ('seed', 'data', 'model', 'optim', 'training.batch_size')
# Settings a checkpoint's parameters depend on, checked by the jobs that only read the run.
MODEL_KEYS = ('data', 'model')
_FREE_KEYS = ('data.data_dir', 'data.test_dir')


class UserError(Exception):
    """A mistake in the input that the user can fix; the message says what and how."""


def _flatten(tree, prefix=''):
    flat = {}
    for name, value in tree.items():
        if hasattr(value, 'items'):
            flat.update(_flatten(value, f'{prefix}{name}.'))
        else:
            flat[f'{prefix}{name}'] = value
    return flat


def unknown_key(key, known=None):
    """A message saying that config.<key> does not exist, or None if it does."""
    known = known or _flatten(default.get_default_config())
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' Did you mean config.{close[0]}?' if close else ''
    return f'config.{key} is not a config key (the keys are those of configs/default.py).{hint}'


def check_keys(config):
    """Every key of configs/default.py is in `config` and no other.

    Types need no check here: ml_collections refuses a value of another type, both in config
    files built on the defaults and in command-line overrides.
    """
    given, known = _flatten(config), _flatten(default.get_default_config())
    for key in given:
        message = unknown_key(key, known)
        if message:
            raise UserError(message)
    missing = sorted(set(known) - set(given))
    if missing:
        raise UserError(f'The config lacks config.{missing[0]}: build configs on '
                        'configs/default.get_default_config().')


def _require(ok, message):
    if not ok:
        raise UserError(message)


def check_values(config):
    """Ranges and choices of the model, data, training and sampling settings."""
    d, m, t, o, s = config.data, config.model, config.training, config.optim, config.sampling
    _require(d.dataset in DATASETS,
             f'config.data.dataset={d.dataset!r} is not known; expected one of {DATASETS}.')
    _require(d.num_channels in (1, 3),
             f'config.data.num_channels={d.num_channels} must be 1 (grayscale) or 3 (RGB).')
    _require(m.K >= 1, f'config.model.K={m.K} must be at least 1 (the number of blur levels).')
    _require(m.sigma >= 0, f'config.model.sigma={m.sigma} is negative; expected σ ≥ 0.')
    _require(s.delta >= 0, f'config.sampling.delta={s.delta} is negative; expected δ ≥ 0.')
    _require(m.blur_sigma_min > 0, f'config.model.blur_sigma_min={m.blur_sigma_min} must be '
             '> 0 (the schedule is log-spaced).')
    _require(m.blur_sigma_min < m.blur_sigma_max,
             f'config.model.blur_sigma_min={m.blur_sigma_min} must be smaller than '
             f'config.model.blur_sigma_max={m.blur_sigma_max}.')
    levels = len(m.channel_mult)
    _require(levels >= 1, 'config.model.channel_mult is empty; expected one multiplier per '
             'U-Net level, e.g. (1, 2, 2, 2).')
    _require(d.image_size >= 1 and d.image_size % 2 ** (levels - 1) == 0,
             f'config.data.image_size={d.image_size} must be a positive multiple of '
             f'{2 ** (levels - 1)}: the U-Net halves it {levels - 1} times '
             f'(config.model.channel_mult={tuple(m.channel_mult)}).')
    _require(all(0 <= a < levels for a in m.attention_levels),
             f'config.model.attention_levels={tuple(m.attention_levels)} must be U-Net levels '
             f'in 0..{levels - 1}.')
    _require(m.model_channels >= 32 and m.model_channels % 32 == 0 and
             all(c >= 1 for c in m.channel_mult),
             f'config.model.model_channels={m.model_channels} must be a multiple of 32 (the '
             'GroupNorm groups), and every channel multiplier ≥ 1.')
    _require(m.num_res_blocks >= 1,
             f'config.model.num_res_blocks={m.num_res_blocks} must be at least 1.')
    _require(0 <= m.dropout < 1, f'config.model.dropout={m.dropout} must be in [0, 1).')
    _require(0 <= m.ema_rate < 1, f'config.model.ema_rate={m.ema_rate} must be in [0, 1).')
    _require(m.downsample in ('conv', 'avgpool'),
             f"config.model.downsample={m.downsample!r}; expected 'conv' or 'avgpool'.")
    _require(m.dtype in ('float32', 'bfloat16'),
             f"config.model.dtype={m.dtype!r}; expected 'float32' or 'bfloat16'.")
    for name in ('batch_size', 'snapshot_freq', 'log_freq', 'sampling_freq'):
        _require(t[name] >= 1, f'config.training.{name}={t[name]} must be at least 1.')
    _require(t.n_iters >= 0, f'config.training.n_iters={t.n_iters} must be ≥ 0.')
    for name in ('num_samples', 'batch_size'):
        _require(s[name] >= 1, f'config.sampling.{name}={s[name]} must be at least 1.')
    _require(o.lr > 0, f'config.optim.lr={o.lr} must be > 0.')
    _require(o.warmup >= 0, f'config.optim.warmup={o.warmup} must be ≥ 0.')
    _require(o.grad_clip > 0, f'config.optim.grad_clip={o.grad_clip} must be > 0.')


def check_config(config):
    """All checks of the config alone."""
    check_keys(config)
    check_values(config)


def check_data(config):
    """The training data named by config.data exists and has the configured image size."""
    d = config.data
    if d.dataset in CHANNELS:
        _require(d.num_channels == CHANNELS[d.dataset],
                 f'config.data.num_channels={d.num_channels} does not match {d.dataset}, whose '
                 f'images have {CHANNELS[d.dataset]} channel(s).')
    if d.dataset in FOLDER_DATASETS:
        _require(d.data_dir, f'config.data.dataset={d.dataset!r} reads image files: set '
                 '--config.data.data_dir to the folder that holds them.')
        _require(os.path.isdir(d.data_dir),
                 f'config.data.data_dir={d.data_dir!r} does not exist. Download {d.dataset} and '
                 'point --config.data.data_dir at its folder of training images (README.md, '
                 '"CIFAR-10 and the other paper settings").')
    elif d.dataset in TFDS_IMAGE_SIZES:
        native = TFDS_IMAGE_SIZES[d.dataset]
        _require(d.image_size == native,
                 f'config.data.image_size={d.image_size} does not match {d.dataset}, whose '
                 f'images are {native}x{native}; set --config.data.image_size={native}.')
        import tensorflow_datasets as tfds
        builder = tfds.builder(d.dataset, data_dir=d.data_dir or None)
        _require(builder.is_prepared(),
                 f'The tfds data set {d.dataset!r} is not prepared in {builder.data_dir}. '
                 'Prepare it once on a machine with TensorFlow: tfds build '
                 f'{d.dataset} --file_format=array_record (then copy it here or set '
                 '--config.data.data_dir to the tfds data directory).')


def _differences(config, saved, keys):
    now, before = _flatten(config), _flatten(saved)
    in_scope = [k for k in set(now) | set(before)
                if any(k == p or k.startswith(p + '.') for p in keys) and k not in _FREE_KEYS]
    return [(k, before.get(k), now.get(k)) for k in sorted(in_scope)
            if _jsonable(before.get(k)) != _jsonable(now.get(k))]


def _jsonable(value):
    return json.loads(json.dumps(value)) if value is not None else None


def check_workdir(config, workdir, training, allow_config_change=False):
    """The workdir can be written and does not hold a run of another config.

    Training compares the RUN_KEYS settings with <workdir>/config.json; other jobs compare the
    MODEL_KEYS settings. With allow_config_change, training goes on with the new values and
    keeps the old config.json as config.<time>.json.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise UserError(f'--workdir={workdir} cannot be written ({error.strerror}); choose a '
                        'directory you can write to.') from None
    saved_path = os.path.join(workdir, 'config.json')
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = json.load(f)
    changed = _differences(config, saved, RUN_KEYS if training else MODEL_KEYS)
    if not changed:
        return
    if training and allow_config_change:
        import jax
        if jax.process_index():
            return
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        os.replace(saved_path, os.path.join(workdir, f'config.{stamp}.json'))
        return
    lines = '\n'.join(f'  config.{k}: {before!r} in {saved_path}, {now!r} now'
                      for k, before, now in changed)
    how = ('Use a new --workdir, or pass --allow_config_change to continue this run with the '
           'new values.' if training else
           'Pass the config that trained this run (its values are in config.json).')
    raise UserError(f'--workdir={workdir} holds a run of a different config:\n{lines}\n{how}')
