"""ihdm_jax.convert_original against the original PyTorch network's own outputs.

The fixture (tests/fixtures/original_checkpoint, 5.5 MB) was made with the original PyTorch
code (github.com/AaltoML/generative-inverse-heat-dissipation): its U-Net at the settings of
model.json (16x16 RGB, 32 channels, multipliers (1, 2), attention at the second level, 0.70 M
parameters) with random weights, saved as its training script saves a checkpoint (model, ema,
optimizer, step 1234) in checkpoint.pth, and in io.npz the original network's f(u, k) for the
fixed inputs u, k with the EMA weights (f_ema) and the raw weights (f_model).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import ROOT
from PIL import Image

from ihdm_jax import checkpoint
from ihdm_jax import convert_original
from ihdm_jax import errors
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import state as state_lib
from ihdm_jax.models import unet

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'original_checkpoint')
PTH = os.path.join(FIXTURE, 'checkpoint.pth')

CONFIG = """from ihdm_jax import defaults


def get_config():
    config = defaults.get_default_config()
    config.data.dataset = 'afhq'
    config.data.data_dir = {data_dir!r}
    config.data.image_size = {image_size}
    config.data.num_channels = {num_channels}
    model = config.model
    model.K = 10
    model.blur_sigma_max = 8.0
    model.model_channels = {model_channels}
    model.channel_mult = {channel_mult}
    model.num_res_blocks = {num_res_blocks}
    model.attention_levels = {attention_levels}
    model.dropout = {dropout}
    model.downsample = {downsample!r}
    config.training.batch_size = 8
    config.sampling.num_samples = 8
    config.sampling.batch_size = 8
    return config
"""


def _run(*args):
    return subprocess.run(
        [sys.executable, '-m', 'ihdm_jax.convert_original', *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(result) -> str:
    """The one `Error:` line a failed command printed, as the last line of stderr."""
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith('Error:')] == lines[-1:], lines[-5:]
    return lines[-1]


def _original_step():
    import torch

    return torch.load(PTH, map_location='cpu', weights_only=True)['step']


@pytest.fixture(scope='module')
def setting(tmp_path_factory):
    """(config file, config) of the fixture's U-Net, reading 8 random RGB images (the prior of
    --mode=sample)."""
    with open(os.path.join(FIXTURE, 'model.json')) as f:
        model = json.load(f)
    tmp = tmp_path_factory.mktemp('original')
    images = tmp / 'images'
    images.mkdir()
    generator = np.random.default_rng(0)
    size, channels = model['image_size'], model['num_channels']
    for i in range(8):
        Image.fromarray(generator.integers(0, 256, (size, size, channels), np.uint8)).save(
            images / f'{i}.png'
        )
    path = tmp / 'original.py'
    path.write_text(
        CONFIG.format(
            data_dir=str(images),
            image_size=size,
            num_channels=channels,
            model_channels=model['model_channels'],
            channel_mult=tuple(model['channel_mult']),
            num_res_blocks=model['num_res_blocks'],
            attention_levels=tuple(model['attention_levels']),
            dropout=model['dropout'],
            downsample=model['downsample'],
        )
    )
    spec = importlib.util.spec_from_file_location('original_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert unet.summary(config).endswith(f'parameters: {model["parameters"]}')
    return str(path), config


@pytest.fixture(scope='module')
def converted(setting, tmp_path_factory):
    """The fixture converted by the command line: (workdir, stderr)."""
    workdir = str(tmp_path_factory.mktemp('converted') / 'run')
    result = _run(f'--checkpoint={PTH}', f'--config={setting[0]}', f'--workdir={workdir}')
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stderr


@pytest.fixture(scope='module')
def io():
    return dict(np.load(os.path.join(FIXTURE, 'io.npz')))


@pytest.fixture(scope='module')
def residual():
    return jax.jit(unet.apply, static_argnums=0, static_argnames='train')


def test_ema_weights_give_the_original_f_ema(setting, converted, io, residual):
    config = setting[1]
    params, step = checkpoint.restore_ema_params(config, converted[0], parallel.make_mesh())
    assert step == _original_step()
    f = residual(
        state_lib.model_graphdef(config), params, io['u'], io['k'].astype(np.int32), train=False
    )
    # Measured: 1.4e-7 (outputs up to 0.15; f_ema and f_model differ by up to 0.1).
    np.testing.assert_allclose(f, io['f_ema'], rtol=0, atol=1e-5)


def test_raw_weights_and_step_restore_as_a_training_state(setting, converted, io, residual):
    config = setting[1]
    manager = checkpoint.make_manager(converted[0])
    try:
        state = checkpoint.restore_latest(
            manager, state_lib.abstract_state(config, parallel.make_mesh())
        )
    finally:
        manager.close()
    assert int(state.step) == _original_step()
    f = residual(
        state_lib.model_graphdef(config),
        state.params,
        io['u'],
        io['k'].astype(np.int32),
        train=False,
    )
    np.testing.assert_allclose(f, io['f_model'], rtol=0, atol=1e-5)  # measured: 8.9e-8

    # The fixture holds no Adam state: the moments start at zero and Adam's count at 0, while
    # the learning-rate schedule continues at the checkpoint's step.
    adam, schedule = _adam_and_schedule(state.opt_state)
    assert int(adam.count) == 0 and int(schedule.count) == _original_step()
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves((adam.mu, adam.nu)))
    assert "holds no Adam state: Adam's moments start at zero" in converted[1]


def _adam_and_schedule(opt_state):
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kinds))
        if isinstance(s, kinds)
    ]
    assert [type(s) for s in found] == list(kinds)
    return found


def test_sample_mode_runs_on_the_converted_workdir(setting, converted):
    main.run(setting[1], 'sample', converted[0])
    samples = np.load(os.path.join(converted[0], 'samples', 'samples.npz'))['images']
    assert samples.shape == (8, 16, 16, 3) and samples.dtype == np.uint8


def test_adam_moments_become_optax_moments(setting, tmp_path):
    """With Adam state in the file: exp_avg = 2·weights and exp_avg_sq = EMA weights², so
    that mu and nu must be 2·params and ema_params² leaf by leaf."""
    import torch

    original = torch.load(PTH, map_location='cpu', weights_only=True)
    weights, shadow = list(original['model'].values()), original['ema']['shadow_params']
    original['optimizer'] = {
        'state': {
            i: {'step': torch.tensor(1000.0), 'exp_avg': 2 * w, 'exp_avg_sq': s**2}
            for i, (w, s) in enumerate(zip(weights, shadow))
        },
        'param_groups': [
            {
                'lr': 2e-4,
                'betas': (0.9, 0.999),
                'eps': 1e-8,
                'weight_decay': 0,
                'params': list(range(len(weights))),
            }
        ],
    }
    path = str(tmp_path / 'with_adam.pth')
    torch.save(original, path)

    config = setting[1]
    workdir = str(tmp_path / 'run')
    assert convert_original.convert(config, path, workdir) == original['step']
    manager = checkpoint.make_manager(workdir)
    try:
        state = checkpoint.restore_latest(
            manager, state_lib.abstract_state(config, parallel.make_mesh())
        )
    finally:
        manager.close()
    adam, schedule = _adam_and_schedule(state.opt_state)
    assert int(adam.count) == 1000 and int(schedule.count) == original['step']
    for mu, nu, p, e in zip(
        *(jax.tree.leaves(t) for t in (adam.mu, adam.nu, state.params, state.ema_params))
    ):
        np.testing.assert_array_equal(mu, 2 * np.asarray(p))
        np.testing.assert_array_equal(nu, np.square(np.asarray(e)))


def test_mismatching_config_is_one_error_line_and_writes_nothing(setting, tmp_path):
    workdir = tmp_path / 'run'
    # The original's conv_resample=False lacks exactly the two resampling convolutions.
    line = _error_line(
        _run(
            f'--checkpoint={PTH}',
            f'--config={setting[0]}',
            f'--workdir={workdir}',
            '--config.model.downsample=avgpool',
        )
    )
    assert line.endswith(
        ': input_blocks.2.0.op only in the checkpoint; '
        'output_blocks.1.2.conv only in the checkpoint.'
    ), line
    assert not workdir.exists()

    config = setting[1].copy_and_resolve_references()
    config.model.model_channels = 64
    with pytest.raises(
        errors.UserError,
        match=r'time_embed\.0\.weight is \(128, 32\) in the '
        r'checkpoint, \(256, 64\) in the config; .* \(and \d+ more\)\.$',
    ):
        convert_original.convert(config, PTH, str(workdir))
    assert not workdir.exists()


def test_missing_checkpoint_is_one_error_line(setting, tmp_path):
    missing = tmp_path / 'missing.pth'
    line = _error_line(
        _run(f'--checkpoint={missing}', f'--config={setting[0]}', f'--workdir={tmp_path / "run"}')
    )
    assert line == f'Error: --checkpoint={missing}: no such file.'
    assert not (tmp_path / 'run').exists()


def test_workdir_with_a_checkpoint_is_refused(setting, converted):
    with pytest.raises(errors.UserError, match='holds checkpoints already'):
        convert_original.convert(setting[1], PTH, converted[0])
