"""Interrupted runs resume exactly; bad input ends in one clear message and touches nothing.

The runs are real command-line jobs (subprocesses) of configs/digits.py, made small.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import digits
from ihdm_jax import checkpoint
from ihdm_jax import parallel
from ihdm_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = {'training.n_iters': 20, 'training.snapshot_freq': 5, 'training.log_freq': 5,
         'training.sampling_freq': 20, 'training.batch_size': 8, 'optim.warmup': 5,
         'data.image_size': 8, 'model.K': 10, 'sampling.num_samples': 8,
         'sampling.batch_size': 8}
# One CPU device: these runs test resumption, not sharding (tests/test_train.py does that).
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def _command(workdir, *extra, config='configs/digits.py', mode='train', **overrides):
    """The command line of a job; runs of digits configs get the SMALL settings too."""
    settings = {**SMALL, **overrides} if 'digits' in config else overrides
    return ([sys.executable, '-m', 'ihdm_jax.main', f'--config={config}', f'--workdir={workdir}',
             f'--mode={mode}'] + [f'--config.{k}={v}' for k, v in settings.items()] + list(extra))


def _run(workdir, *extra, **overrides):
    return subprocess.run(_command(workdir, *extra, **overrides), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def _interrupt(workdir, sig):
    """Starts a run and sends `sig` once its first checkpoint (step 5) is complete.

    Samples drawn after every step (they do not change the training state) slow the run down
    so that it is surely still running then.
    """
    process = subprocess.Popen(_command(workdir, **{'training.sampling_freq': 1}), cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    first = workdir / 'checkpoints' / '5'
    while not first.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(sig)
    out, err = process.communicate(timeout=600)
    return process.returncode, err, _steps(workdir)


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _config():
    config = digits.get_config()
    for key, value in SMALL.items():
        section, name = key.split('.')
        config[section][name] = value
    return config


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
    """(a) 20 steps straight; (b) 10, then resumed to 20; (c) kill -9 after the first
    checkpoint, resumed; (d) SIGTERM after the first checkpoint, resumed."""
    base = tmp_path_factory.mktemp('runs')
    out = {name: base / name for name in 'abcd'}
    results = {'a': _run(out['a'])}
    assert results['a'].returncode == 0, results['a'].stderr[-3000:]
    results['b_first'] = _run(out['b'], **{'training.n_iters': 10})
    results['c_first'] = _interrupt(out['c'], signal.SIGKILL)
    results['d_first'] = _interrupt(out['d'], signal.SIGTERM)
    for name in 'bcd':
        results[name] = _run(out[name])
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    return out, results


def _final_params(workdir):
    config = _config()
    mesh = parallel.make_mesh()
    manager = checkpoint.make_manager(str(workdir))
    state = checkpoint.restore_latest(
        manager, train.abstract_state(config, train.make_optimizer(config), mesh))
    manager.close()
    return jax.device_get(state)


def test_interrupted_runs_end_exactly_like_the_straight_run(runs):
    out, _ = runs
    reference = _final_params(out['a'])
    reference_samples = np.asarray(Image.open(out['a'] / 'samples' / 'step_00000020.png'))
    assert int(reference.step) == 20
    for name in 'bcd':
        state = _final_params(out[name])
        assert int(state.step) == 20
        for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
            np.testing.assert_array_equal(x, y)
        samples = np.asarray(Image.open(out[name] / 'samples' / 'step_00000020.png'))
        np.testing.assert_array_equal(samples, reference_samples)


def test_kill_9_leaves_the_complete_checkpoints_and_the_run_resumes(runs):
    out, results = runs
    returncode, _, steps = results['c_first']
    assert returncode == -signal.SIGKILL
    assert 5 in steps and max(steps) < 20
    assert f'Resuming at step {max(steps)}' in results['c'].stderr


def test_sigterm_saves_the_current_step_and_exits_cleanly(runs):
    out, results = runs
    returncode, err, steps = results['d_first']
    assert returncode == 0, err[-3000:]
    assert 'Asked to stop (SIGTERM)' in err
    assert 5 < max(steps) < 20
    assert f'Resuming at step {max(steps)}' in results['d'].stderr


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob('*')):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_unfinished_and_corrupt_checkpoints_are_skipped_with_a_warning(runs, tmp_path, caplog):
    out, _ = runs
    workdir = tmp_path / 'run'
    shutil.copytree(out['a'], workdir)
    (workdir / 'checkpoints' / '25.orbax-checkpoint-tmp-1700000000').mkdir()
    for data_file in (workdir / 'checkpoints' / '20').rglob('d/*'):
        data_file.write_bytes(b'')
    earlier = _digest(workdir / 'checkpoints' / '15')
    config = _config()
    manager = checkpoint.make_manager(str(workdir))
    state = checkpoint.restore_latest(
        manager, train.abstract_state(config, train.make_optimizer(config), parallel.make_mesh()))
    manager.close()
    assert int(state.step) == 15
    log = caplog.text
    assert '25.orbax-checkpoint-tmp-1700000000' in log and 'did not finish' in log
    assert f'{workdir}/checkpoints/20 cannot be read' in log
    assert (workdir / checkpoint.UNREADABLE / '20').is_dir()
    assert _digest(workdir / 'checkpoints' / '15') == earlier


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoints(runs, tmp_path):
    out, _ = runs
    workdir = tmp_path / 'run'
    shutil.copytree(out['a'], workdir)
    before = _digest(workdir / 'checkpoints')
    result = _run(workdir, '--allow_config_change',
                  **{'training.n_iters': 40, 'optim.lr': 1e30})
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith('Error: The loss') and 'not finite at step 2' in message
    assert 'newest checkpoint (step 20)' in message
    assert _digest(workdir / 'checkpoints') == before
    assert not list((workdir / 'samples').glob('step_0000003*.png'))
    assert not (workdir / 'samples' / 'step_00000040.png').exists()


BAD_CONFIG_FILE = '''from configs import digits


def get_config():
    config = digits.get_config()
    config.model.{key} = {value}
    return config
'''

# name -> (extra flags and overrides, expected message)
BAD_INPUTS = {
    'unknown_key_override': ({'model.sigmma': 0.02},
                             'config.model.sigmma is not a config key.*config.model.sigma'),
    'unknown_key_in_file': ({'config': ('sigmma', 0.02)},
                            'config.model.sigmma is not a config key.*config.model.sigma'),
    'wrong_type_override': ({'model.K': 2.5}, 'flag --config.model.K=2.5'),
    'wrong_type_in_file': ({'config': ('K', "'200'")},
                           r"Error whilst parsing config file: TypeError: Could not override "
                           r"field 'K'"),
    'K_below_1': ({'model.K': 0}, r'config.model.K=0 must be at least 1'),
    'negative_sigma': ({'model.sigma': -0.01}, r'config.model.sigma=-0.01 is negative'),
    'negative_delta': ({'sampling.delta': -0.01}, r'config.sampling.delta=-0.01 is negative'),
    'blur_range': ({'model.blur_sigma_min': 5.0},
                   r'blur_sigma_min=5.0 must be smaller than config.model.blur_sigma_max=5.0'),
    'image_size_vs_data': ({'config': 'configs/mnist.py', 'data.image_size': 32},
                           r'image_size=32 does not match mnist, whose images are 28x28'),
    'channels_vs_data': ({'data.num_channels': 3},
                         r'num_channels=3 does not match digits, whose images have 1'),
    'missing_image_folder': ({'config': 'configs/afhq64.py', 'data.data_dir': '/no/such/afhq'},
                             r"data_dir='/no/such/afhq' does not exist"),
    'missing_tfds_dataset': ({'config': 'configs/cifar10.py', 'data.data_dir': 'EMPTY'},
                             r"'cifar10' is not prepared in .*tfds build cifar10"),
    'different_config_in_workdir': ({'model.K': 20},
                                    r'holds a run of a different config:\n  config.model.K: '
                                    r'10 in .*config.json, 20 now\n.*--allow_config_change'),
    'unwritable_workdir': ({'workdir': 'UNWRITABLE'}, r'cannot be written'),
    'missing_inception_weights': ({'mode': 'fid',
                                   'evaluation.inception_weights': '/no/such/inception.npz'},
                                  r'FID Inception weights not found at /no/such/inception.npz'),
}


@pytest.fixture(scope='session')
def bad_runs(runs, tmp_path_factory):
    """Every bad input launched at once against run (a)'s workdir; its digest before and after."""
    out, _ = runs
    workdir = out['a']
    scratch = tmp_path_factory.mktemp('bad')
    (scratch / 'empty').mkdir()
    (scratch / 'a_file').write_text('')
    before = _digest(workdir)
    commands = {}
    for name, (settings, _) in BAD_INPUTS.items():
        settings = dict(settings)
        config = settings.pop('config', 'configs/digits.py')
        mode = settings.pop('mode', 'train')
        if isinstance(config, tuple):
            path = scratch / f'{name}_digits.py'
            path.write_text(BAD_CONFIG_FILE.format(key=config[0], value=config[1]))
            config = str(path)
        target = workdir
        if settings.pop('workdir', None):
            target = scratch / 'a_file' / 'run'  # a file where a directory should be
        if settings.get('data.data_dir') == 'EMPTY':
            settings['data.data_dir'] = scratch / 'empty'
        commands[name] = _command(target, config=config, mode=mode, **settings)
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(
            lambda c: subprocess.run(c, cwd=ROOT, env=ENV, capture_output=True, text=True,
                                     timeout=300),
            commands.values())))
    return results, before, _digest(workdir)


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_ends_in_one_clear_message(bad_runs, name):
    results, before, after = bad_runs
    result = results[name]
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert re.search(BAD_INPUTS[name][1], result.stderr), result.stderr[-2000:]
    assert before == after
