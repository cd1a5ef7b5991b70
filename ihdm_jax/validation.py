"""Checks of a config's keys and values, before any work starts.

Every failure is an errors.UserError: one message that names the bad value and says what was
expected. The checks of the data, of the workdir and of each mode's own settings live with the
code that reads them (data.check, workdir.check, each job's `check`).
"""

import difflib
import math

from ihdm_jax import defaults
from ihdm_jax import errors
from ihdm_jax import processes
from ihdm_jax import samplers


def flatten(tree, prefix=''):
    flat = {}
    for name, value in tree.items():
        if hasattr(value, 'items'):
            flat.update(flatten(value, f'{prefix}{name}.'))
        else:
            flat[f'{prefix}{name}'] = value
    return flat


def unknown_key(key, known=None):
    """A message saying that config.<key> does not exist, or None if it does."""
    known = known or flatten(defaults.get_default_config())
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' Did you mean config.{close[0]}?' if close else ''
    return f'config.{key} is not a config key (the keys are those of ihdm_jax/defaults.py).{hint}'


def _element_types_match(value, default) -> bool:
    """Whether a tuple setting holds the kind of elements its default holds (ints where floats
    are expected are fine; ml_collections itself checks only that it is a tuple)."""
    if not isinstance(default, tuple) or not default:
        return True
    if not isinstance(value, tuple):
        return False
    if isinstance(default[0], tuple):
        return all(_element_types_match(v, default[0]) for v in value)
    kinds = (int, float) if isinstance(default[0], float) else (type(default[0]),)
    return all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)


def check_keys(config):
    """Every key of ihdm_jax/defaults.py is in `config` and no other, tuple settings hold
    elements of the defaults' kind (ml_collections checks the other types), and no float is
    infinite or NaN."""
    given, known = flatten(config), flatten(defaults.get_default_config())
    for key, value in given.items():
        message = unknown_key(key, known)
        if message:
            raise errors.UserError(message)
        require(
            _element_types_match(value, known[key]),
            f'config.{key}={value!r} must be a tuple like the default {known[key]!r} (on the '
            f'command line: --config.{key}="{known[key]!r}").',
        )
    for key, value in given.items():
        floats = [v for v in _leaves(value) if isinstance(v, float)]
        require(
            all(math.isfinite(v) for v in floats),
            f'config.{key}={value!r} must be finite.',
        )
    missing = sorted(set(known) - set(given))
    if missing:
        raise errors.UserError(
            f'The config lacks config.{missing[0]}: build configs on '
            'ihdm_jax.defaults.get_default_config().'
        )


def _leaves(value):
    """The numbers of a setting, inside tuples (of tuples) too."""
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def require(ok, message):
    if not ok:
        raise errors.UserError(message)


def check_values(config):
    """Ranges and choices of the model, data, training and sampling settings."""
    d, m, t, o, s = config.data, config.model, config.training, config.optim, config.sampling
    require(
        d.num_channels in (1, 3),
        f'config.data.num_channels={d.num_channels} must be 1 (grayscale) or 3 (RGB).',
    )
    require(d.cache_mb >= 0, f'config.data.cache_mb={d.cache_mb} is negative; expected MiB ≥ 0.')
    require(
        0 < m.beta_min < m.beta_max < 1,
        f'config.model.beta_min={m.beta_min} and '
        f'config.model.beta_max={m.beta_max} must satisfy 0 < beta_min < beta_max < 1.',
    )
    require(0 < m.blur_d_min <= 1, f'config.model.blur_d_min={m.blur_d_min} must be in (0, 1].')
    require(
        m.noise_gamma >= 0 and m.noise_c0 > 0,
        f'config.model.noise_gamma={m.noise_gamma} '
        f'must be ≥ 0 and config.model.noise_c0={m.noise_c0} > 0.',
    )
    require(m.K >= 1, f'config.model.K={m.K} must be at least 1 (the number of blur levels).')
    require(m.sigma >= 0, f'config.model.sigma={m.sigma} is negative; expected σ ≥ 0.')
    require(s.delta >= 0, f'config.sampling.delta={s.delta} is negative; expected δ ≥ 0.')
    require(
        m.blur_sigma_min > 0,
        f'config.model.blur_sigma_min={m.blur_sigma_min} must be > 0 (the schedule is log-spaced).',
    )
    require(
        m.blur_sigma_min < m.blur_sigma_max,
        f'config.model.blur_sigma_min={m.blur_sigma_min} must be smaller than '
        f'config.model.blur_sigma_max={m.blur_sigma_max}.',
    )
    levels = len(m.channel_mult)
    require(
        levels >= 1,
        'config.model.channel_mult is empty; expected one multiplier per '
        'U-Net level, e.g. (1, 2, 2, 2).',
    )
    require(
        d.image_size >= 1 and d.image_size % 2 ** (levels - 1) == 0,
        f'config.data.image_size={d.image_size} must be a positive multiple of '
        f'{2 ** (levels - 1)}: the U-Net halves it {levels - 1} times '
        f'(config.model.channel_mult={tuple(m.channel_mult)}).',
    )
    require(
        all(0 <= a < levels for a in m.attention_levels),
        f'config.model.attention_levels={tuple(m.attention_levels)} must be U-Net levels '
        f'in 0..{levels - 1}.',
    )
    require(
        m.num_groups >= 1
        and m.model_channels >= m.num_groups
        and m.model_channels % m.num_groups == 0
        and all(c >= 1 for c in m.channel_mult),
        f'config.model.model_channels={m.model_channels} must be a multiple of '
        f'config.model.num_groups={m.num_groups} (the GroupNorm groups, ≥ 1), and every channel '
        'multiplier ≥ 1.',
    )
    require(
        m.num_res_blocks >= 1, f'config.model.num_res_blocks={m.num_res_blocks} must be at least 1.'
    )
    require(0 <= m.dropout < 1, f'config.model.dropout={m.dropout} must be in [0, 1).')
    require(0 <= m.ema_rate < 1, f'config.model.ema_rate={m.ema_rate} must be in [0, 1).')
    require(
        m.downsample in ('conv', 'avgpool'),
        f"config.model.downsample={m.downsample!r}; expected 'conv' or 'avgpool'.",
    )
    require(
        m.dtype in ('float32', 'bfloat16'),
        f"config.model.dtype={m.dtype!r}; expected 'float32' or 'bfloat16'.",
    )
    for name in ('batch_size', 'snapshot_freq', 'log_freq', 'sampling_freq'):
        require(t[name] >= 1, f'config.training.{name}={t[name]} must be at least 1.')
    require(
        t.max_to_keep >= 1,
        f'config.training.max_to_keep={t.max_to_keep} must be at '
        'least 1 (a run resumes from the newest checkpoint).',
    )
    require(
        t.keep_period >= 0,
        f'config.training.keep_period={t.keep_period} must be ≥ 0 (0 keeps no milestones).',
    )
    require(t.n_iters >= 0, f'config.training.n_iters={t.n_iters} must be ≥ 0.')
    for name in ('num_samples', 'batch_size'):
        require(s[name] >= 1, f'config.sampling.{name}={s[name]} must be at least 1.')
    _check_classes(config)
    require(o.lr > 0, f'config.optim.lr={o.lr} must be > 0.')
    require(o.warmup >= 0, f'config.optim.warmup={o.warmup} must be ≥ 0.')
    require(o.grad_clip > 0, f'config.optim.grad_clip={o.grad_clip} must be > 0.')


def _check_classes(config):
    """model.num_classes and the settings of conditional models (docs/conditional.md)."""
    m, t, s = config.model, config.training, config.sampling
    require(
        m.num_classes >= 0,
        f'config.model.num_classes={m.num_classes} must be ≥ 0 (0 = unconditional).',
    )
    require(
        0 <= t.label_dropout < 1,
        f'config.training.label_dropout={t.label_dropout} must be in [0, 1).',
    )
    require(s.guidance >= 0, f'config.sampling.guidance={s.guidance} must be ≥ 0.')
    if not m.num_classes:
        require(
            not s.labels and s.guidance == 1.0,
            f'config.sampling.labels={tuple(s.labels)!r} and config.sampling.guidance='
            f'{s.guidance} are for conditional models; config.model.num_classes=0 is '
            'unconditional (set it to the number of classes and train).',
        )
    check_labels(s.labels, m.num_classes, 'config.sampling.labels')


def check_labels(labels, num_classes: int, what: str):
    """Every label is a class index 0..num_classes − 1 or −1 (none)."""
    labels = tuple(labels)
    require(
        all(
            isinstance(c, int) and not isinstance(c, bool) and -1 <= c < num_classes for c in labels
        ),
        f'{what}={labels!r} must hold class indices 0..{num_classes - 1} (or −1: no class).',
    )


def require_unconditional(config, mode: str):
    """errors.UserError for a conditional model in a mode that does not take labels."""
    require(
        not config.model.num_classes,
        f'--mode={mode} is not defined for a conditional model (config.model.num_classes='
        f'{config.model.num_classes}): its chains run vmapped per example, which the batch-wise '
        'guidance of a conditional model does not reach.',
    )


def check_config(config):
    """All checks of the config alone."""
    check_keys(config)
    check_values(config)
    processes.check(config)
    samplers.check(config)
