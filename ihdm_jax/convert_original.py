"""Imports a checkpoint of the original PyTorch code into a workdir of this project.

    python -m ihdm_jax.convert_original --checkpoint=PATH.pth --config=CONFIG --workdir=DIR

The original training script saves a torch pickle {'model': the state_dict of its
DataParallel-wrapped U-Net (keys 'module.…'), 'ema': {'decay', 'num_updates', 'shadow_params': a
list in model.parameters() order}, 'optimizer': Adam's state_dict, 'step': int}. This writes
<workdir>/config.json and a checkpoint at the same step: the raw and EMA weights, and Adam's
moments where the file holds them (otherwise they start at zero, with a warning). Every --mode
of ihdm_jax.main, training included, then runs on the workdir.

--config must describe the checkpoint's U-Net (config.data.num_channels and config.model's
model_channels, channel_mult, num_res_blocks, attention_levels, downsample; the original's
conv_resample=False is downsample='avgpool'). Everything is checked before anything is written;
a failure ends with one line, `Error: ...`, and exit status 1. Needs torch, for this step only:
pip install 'ihdm_jax[original]'.
"""

import io
import sys

import jax
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ihdm_jax import checkpoint
from ihdm_jax import command_line
from ihdm_jax import errors
from ihdm_jax import parallel
from ihdm_jax import state as state_lib
from ihdm_jax import storage
from ihdm_jax import validation
from ihdm_jax import workdir as workdir_lib

_MAX_LISTED = 5  # mismatches named in the error

# nnx module names -> the original's (improved-diffusion) module names.
_TOP = {
    'temb_dense1': 'time_embed.0',
    'temb_dense2': 'time_embed.2',
    'stem': 'input_blocks.0.0',
    'out_norm': 'out.0',
    'out_conv': 'out.2',
}
_MIDDLE = {'mid_res1': 'middle_block.0', 'mid_attn': 'middle_block.1', 'mid_res2': 'middle_block.2'}
_RESBLOCK = {
    'norm1': 'in_layers.0',
    'conv1': 'in_layers.2',
    'temb_proj': 'emb_layers.1',
    'norm2': 'out_layers.0',
    'conv2': 'out_layers.3',
    'skip': 'skip_connection',
}
_ATTENTION = {'norm': 'norm', 'qkv': 'qkv', 'proj': 'proj_out'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def original_name(path: tuple, config) -> str:
    """The original state_dict name (without 'module.') of the nnx parameter at `path`.

    The original numbers its blocks in order: input_blocks[0] is the stem, then each level's
    ResBlocks ([ResBlock, Attention] at attention levels) and a Downsample ('op') between levels;
    output_blocks holds each decoder level's num_res_blocks + 1 blocks, the last of which ends
    with the Upsample ('conv') at every level but 0.
    """
    m = config.model
    per_level = m.num_res_blocks + 1
    num_levels = len(m.channel_mult)
    *module, leaf = path
    head = module[0]

    def block(rest):  # a ResAttnBlock's submodules
        if rest[0] == 'res':
            return f'0.{_RESBLOCK[rest[1]]}'
        return f'1.{_ATTENTION[rest[1]]}'

    if head in _TOP:
        name = _TOP[head]
    elif head in _MIDDLE:
        table = _ATTENTION if head == 'mid_attn' else _RESBLOCK
        name = f'{_MIDDLE[head]}.{table[module[1]]}'
    elif head == 'encoder':
        name = f'input_blocks.{1 + module[1] * per_level + module[2]}.{block(module[3:])}'
    elif head == 'downsample':
        name = f'input_blocks.{1 + module[1] * per_level + m.num_res_blocks}.0.op'
    elif head == 'decoder':
        index = (num_levels - 1 - module[1]) * per_level + module[2]
        name = f'output_blocks.{index}.{block(module[3:])}'
    elif head == 'upsample':
        level = module[1] + 1
        index = (num_levels - 1 - level) * per_level + m.num_res_blocks
        name = f'output_blocks.{index}.{2 if level in m.attention_levels else 1}.conv'
    else:
        raise ValueError(f'No original name for the U-Net parameter {path}.')
    return f'{name}.{_LEAF[leaf]}'


def _is_conv1d(name: str) -> bool:
    """The original's attention uses 1-D convolutions: weights (out, in, 1)."""
    return name.rsplit('.', 2)[-2] in ('qkv', 'proj_out')


def original_shape(name: str, shape: tuple) -> tuple:
    """The shape the original stores for an nnx parameter of `shape`."""
    if len(shape) == 4:  # conv kernel (kh, kw, in, out) -> (out, in, kh, kw) or (out, in, 1)
        return (shape[3], shape[2], 1) if _is_conv1d(name) else (shape[3], shape[2], *shape[:2])
    if len(shape) == 2:  # dense kernel (in, out) -> (out, in)
        return shape[::-1]
    return shape


def to_flax(name: str, array: np.ndarray) -> np.ndarray:
    """An original parameter in this U-Net's layout (the inverse of original_shape)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 3 and _is_conv1d(name):
        return array[:, :, 0].T[None, None]
    if array.ndim == 2:
        return array.T
    return array


def _names(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def expected_parameters(config) -> dict:
    """{original name: (nnx path, original shape)} of config's U-Net."""
    params = state_lib.abstract_params(config, parallel.make_mesh())
    expected = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _names(path)
        name = original_name(path, config)
        expected[name] = (path, original_shape(name, tuple(leaf.shape)))
    return expected


def _read(path: str) -> dict:
    """The pickle's contents as numpy: model {name: array}, ema [arrays], adam, step."""
    if not storage.isfile(path):
        raise errors.UserError(f'--checkpoint={path}: no such file.')
    try:
        import torch  # only this conversion needs torch
    except ImportError:
        raise errors.UserError(
            'Converting an original checkpoint needs torch: pip install '
            "'ihdm_jax[original]' (or pip install torch)."
        ) from None
    try:
        # The original saves only tensors, numbers and containers, which the safe loader reads.
        raw = torch.load(
            io.BytesIO(storage.read_bytes(path)), map_location='cpu', weights_only=True
        )
    except Exception as error:  # not a torch file, damaged, or holding arbitrary objects
        cause = str(error).strip().split('. ')[0].splitlines()
        raise errors.UserError(
            f'--checkpoint={path} cannot be read as a checkpoint of the original code, which '
            f'holds only tensors, numbers and containers ({type(error).__name__}: '
            f'{cause[0] if cause else ""}).'
        ) from None
    expected = "a dict with 'model', 'ema' and 'step' (and 'optimizer'), as the original code saves"
    what = f'--checkpoint={path} is not a checkpoint of the original code: expected {expected}'
    if not isinstance(raw, dict) or not {'model', 'ema', 'step'} <= set(raw):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise errors.UserError(f'{what}, got {got}.')
    model, ema = raw['model'], raw['ema']
    if not isinstance(model, dict) or not all(torch.is_tensor(v) for v in model.values()):
        raise errors.UserError(f"{what}; its 'model' is not a state_dict of tensors.")
    if not isinstance(ema, dict) or not isinstance(ema.get('shadow_params'), (list, tuple)):
        raise errors.UserError(f"{what}; its 'ema' has no list 'shadow_params'.")

    def numpy(tensor):
        return tensor.detach().to(torch.float32).numpy()

    names = [name.removeprefix('module.') for name in model]
    shadow = ema['shadow_params']
    if len(shadow) != len(names) or any(
        tuple(s.shape) != tuple(p.shape) for s, p in zip(shadow, model.values())
    ):
        raise errors.UserError(
            f"--checkpoint={path}: the EMA's {len(shadow)} shadow parameters "
            f"do not match the model's {len(names)} parameters in order and "
            'shape.'
        )
    try:
        step = int(raw['step'])
    except (TypeError, ValueError, RuntimeError):
        raise errors.UserError(f"{what}; its 'step' is {raw['step']!r}, not a number.") from None
    weights = {n: numpy(v) for n, v in zip(names, model.values())}
    adam = _adam_state(raw.get('optimizer'), names, numpy)
    if adam is not None:
        for name, moment in adam['mu'].items():
            if moment.shape != weights[name].shape or adam['nu'][name].shape != moment.shape:
                raise errors.UserError(
                    f"--checkpoint={path}: Adam's moments of {name} are "
                    f'{tuple(moment.shape)}, the parameter '
                    f'{tuple(weights[name].shape)}.'
                )
    return {
        'path': path,
        'step': step,
        'model': weights,
        'ema': {n: numpy(v) for n, v in zip(names, shadow)},
        'ema_decay': ema.get('decay'),
        'adam': adam,
    }


def _adam_state(optimizer, names, numpy) -> dict:
    """{'step', 'mu': {name: exp_avg}, 'nu': {name: exp_avg_sq}, 'hyper'} for the parameters
    that have Adam state; None if the file has none."""
    if not isinstance(optimizer, dict) or not optimizer.get('state'):
        return None
    indices = [i for group in optimizer.get('param_groups', []) for i in group['params']]
    position = {index: n for n, index in enumerate(indices)}
    mu, nu, steps = {}, {}, set()
    for index, entry in optimizer['state'].items():
        if position.get(index, len(names)) >= len(names) or 'exp_avg' not in entry:
            continue
        name = names[position[index]]
        mu[name], nu[name] = numpy(entry['exp_avg']), numpy(entry['exp_avg_sq'])
        steps.add(int(entry['step']))
    if not mu:
        return None
    group = optimizer['param_groups'][0]
    return {
        'step': max(steps),
        'mu': mu,
        'nu': nu,
        'hyper': {key: group.get(key) for key in ('lr', 'betas', 'eps', 'weight_decay')},
    }


def check_shapes(config, original: dict, expected: dict):
    """The config's U-Net has exactly the checkpoint's parameters, name by name and shape by
    shape; otherwise a UserError listing the first mismatches (shapes first, then modules that
    only one side has)."""
    model = original['model']
    shapes = [
        f'{name} is {tuple(array.shape)} in the checkpoint, {expected[name][1]} in the config'
        for name, array in model.items()
        if name in expected and expected[name][1] != tuple(array.shape)
    ]

    def modules(names):
        return list(dict.fromkeys(name.rsplit('.', 1)[0] for name in names))

    only_checkpoint = modules(name for name in model if name not in expected)
    only_config = modules(name for name in expected if name not in model)
    problems = (
        shapes
        + [f'{name} only in the checkpoint' for name in only_checkpoint]
        + [f'{name} only in the config' for name in only_config]
    )
    if problems:
        more = f' (and {len(problems) - _MAX_LISTED} more)' if len(problems) > _MAX_LISTED else ''
        m = config.model
        raise errors.UserError(
            f"--checkpoint={original['path']} does not match the config's U-Net "
            f'(num_channels={config.data.num_channels}, model_channels={m.model_channels}, '
            f'channel_mult={tuple(m.channel_mult)}, num_res_blocks={m.num_res_blocks}, '
            f'attention_levels={tuple(m.attention_levels)}, downsample={m.downsample!r}): '
            f'{"; ".join(problems[:_MAX_LISTED])}{more}.'
        )


def _tree(abstract, names: dict, values: dict):
    """`abstract` (an nnx.State of ShapeDtypeStructs) filled with the original `values`;
    names: {nnx path: original name}."""

    def fill(path, leaf):
        name = names[_names(path)]
        return to_flax(name, values[name]).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def train_state(config, original: dict, expected: dict) -> state_lib.TrainState:
    """The TrainState of the original checkpoint (numpy leaves)."""
    abstract = state_lib.abstract_params(config, parallel.make_mesh())
    names = {path: name for name, (path, _) in expected.items()}
    params = _tree(abstract, names, original['model'])
    ema_params = _tree(abstract, names, original['ema'])
    step = np.int32(original['step'])

    adam = original['adam']
    if adam is None:
        logging.warning(
            "%s holds no Adam state: Adam's moments start at zero (and its bias "
            'correction afresh); the learning-rate schedule continues at step %d.',
            original['path'],
            step,
        )
        adam_count, mu, nu = np.int32(0), None, None
    else:
        missing = [name for name in original['model'] if name not in adam['mu']]
        if missing:
            logging.warning(
                '%s holds Adam state for %d of %d parameters; the moments of the '
                'others (first: %s) start at zero.',
                original['path'],
                len(adam['mu']),
                len(original['model']),
                missing[0],
            )
        zeros = {name: np.zeros_like(a) for name, a in original['model'].items()}
        adam_count = np.int32(adam['step'])
        mu = _tree(abstract, names, {**zeros, **adam['mu']})
        nu = _tree(abstract, names, {**zeros, **adam['nu']})
    _warn_if_different(config, adam['hyper'] if adam else {}, original)

    def fill(s):
        if isinstance(s, optax.ScaleByAdamState):
            return optax.ScaleByAdamState(
                count=adam_count, mu=s.mu if mu is None else mu, nu=s.nu if nu is None else nu
            )
        if isinstance(s, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count=step)
        return s

    opt_state = jax.tree.map(
        fill,
        state_lib.make_optimizer(config).init(params),
        is_leaf=lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState)),
    )
    return state_lib.TrainState(
        step=step, params=params, ema_params=ema_params, opt_state=jax.device_get(opt_state)
    )


def _warn_if_different(config, hyper, original):
    ours = {'lr': config.optim.lr, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0}
    if original['step'] < config.optim.warmup:
        del ours['lr']  # the original stores the warmed-up rate of its last step
    for key, value in hyper.items():
        if (
            key in ours
            and value is not None
            and not np.allclose(np.asarray(value, float), ours[key])
        ):
            logging.warning(
                "The original run's Adam %s was %s; training here goes on with %s.",
                key,
                value,
                ours[key],
            )
    decay = original['ema_decay']
    if decay is not None and not np.isclose(decay, config.model.ema_rate):
        logging.warning(
            "The original run's EMA decay was %s; training here goes on with "
            'config.model.ema_rate=%s.',
            decay,
            config.model.ema_rate,
        )


def convert(config, checkpoint_path: str, workdir: str) -> int:
    """Checks everything, then writes <workdir>/config.json and the checkpoint; its step."""
    validation.check_config(config)
    validation.require(
        not config.model.num_classes,
        f'config.model.num_classes={config.model.num_classes}: the original code trains '
        'unconditional models only; convert with num_classes=0.',
    )
    workdir_lib.check(config, workdir, 'train')
    if checkpoint.steps_on_disk(workdir):
        raise errors.UserError(
            f'--workdir={workdir} holds checkpoints already (steps '
            f'{checkpoint.steps_on_disk(workdir)}); convert into a new '
            '--workdir.'
        )
    original = _read(checkpoint_path)
    expected = expected_parameters(config)
    check_shapes(config, original, expected)
    state = train_state(config, original, expected)

    mesh = parallel.make_mesh()
    workdir_lib.save_config(config, workdir)
    saver = checkpoint.Saver(checkpoint.make_manager(workdir))
    try:
        saver.save(original['step'], jax.device_put(state, parallel.replicated(mesh)))
        saver.check(wait=True)
    finally:
        saver.close()
    logging.info('Converted %s (step %d) into %s.', checkpoint_path, original['step'], workdir)
    return original['step']


def _main():
    # Defined here, not on import, so that this module and ihdm_jax.main load in one process.
    checkpoint_flag = flags.DEFINE_string(
        'checkpoint', None, "The original code's checkpoint (.pth)."
    )
    config_flag = config_flags.DEFINE_config_file(
        'config', None, 'Config file describing its U-Net.', lock_config=True
    )
    workdir_flag = flags.DEFINE_string('workdir', None, 'New workdir to write.')

    def run(argv):
        if len(argv) > 1:
            sys.exit(f'Error: unexpected arguments {argv[1:]}; flags look like --name=value.')
        for name, flag in (('checkpoint', checkpoint_flag), ('workdir', workdir_flag)):
            if not flag.value:
                sys.exit(
                    f'Error: --{name} is required (python -m ihdm_jax.convert_original '
                    '--checkpoint=PATH.pth --config=CONFIG --workdir=DIR).'
                )
        try:
            step = convert(config_flag.value, checkpoint_flag.value, workdir_flag.value)
        except errors.JobError as error:
            sys.exit(f'Error: {error}')
        print(f'Converted {checkpoint_flag.value} (step {step}) into {workdir_flag.value}.')

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == '__main__':
    _main()
