"""Interrupted runs resume exactly; bad input ends in one clear message and touches nothing;
a corrupt image is skipped, a failed save and a diverged loss stop the run.

The interrupted runs and a few bad command lines are subprocesses; everything else calls the
library in-process: main.run for the checks and the runs of configs/tiny.py,
command_line.parse_flags for the command line's config handling.
"""

import concurrent.futures
import errno
import hashlib
import importlib
import json
import logging
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
from absl import flags
from absl import logging as absl_logging
from conftest import ROOT
from conftest import TRAINED_STEP
from orbax.checkpoint._src.serialization import serialization
from PIL import Image

from configs import tiny
from ihdm_jax import checkpoint
from ihdm_jax import command_line
from ihdm_jax import errors
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import state as state_lib
from ihdm_jax.jobs import train as train_job

N_ITERS, SNAPSHOT = 6, 2


def _config_of(name, **overrides):
    """configs/<name>.py with overrides {'section.field': value}."""
    config = importlib.import_module(f'configs.{name}').get_config()
    for key, value in overrides.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


def _tiny(**overrides):
    return _config_of('tiny', **overrides)


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob('*')):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _restore(workdir):
    """The training state as the next training run restores it."""
    manager = checkpoint.make_manager(str(workdir), remove_unfinished=True)
    try:
        state = checkpoint.restore_latest(
            manager, state_lib.abstract_state(tiny.get_config(), parallel.make_mesh())
        )
    finally:
        manager.close()
    return jax.device_get(state)


# --- Interrupted command-line runs -------------------------------------------------------------


def _train_command(workdir, **overrides):
    settings = {'training.n_iters': N_ITERS, 'training.snapshot_freq': SNAPSHOT, **overrides}
    return [
        sys.executable,
        '-m',
        'ihdm_jax.main',
        '--config=configs/tiny.py',
        f'--workdir={workdir}',
    ] + [f'--config.{k}={v}' for k, v in settings.items()]


def _interrupted(workdir, sig):
    """A run sent `sig` once its first checkpoint is complete; (exit status, stderr, steps).

    Samples drawn after every step (they do not change the training state) slow the run down,
    so that it is surely still running then.
    """
    log = workdir.parent / f'{workdir.name}_interrupted.log'
    with open(log, 'w') as err:
        process = subprocess.Popen(
            _train_command(workdir, **{'training.sampling_freq': 1}),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        first = workdir / 'checkpoints' / str(SNAPSHOT)
        while not first.exists() and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(sig)
        process.wait(timeout=600)
    return process.returncode, log.read_text(), checkpoint.steps_on_disk(str(workdir))


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(workdir):
    """main.run of the tiny run to N_ITERS; its absl log lines."""
    logger, handler = logging.getLogger('absl'), _Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        main.run(
            _tiny(**{'training.n_iters': N_ITERS, 'training.snapshot_freq': SNAPSHOT}),
            'train',
            str(workdir),
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return '\n'.join(handler.messages)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The straight run to N_ITERS, and command-line runs killed (SIGKILL), asked to stop
    (SIGTERM) or interrupted with Ctrl-C (SIGINT) after their first checkpoint, then resumed.

    The straight run and the resumed ones run in-process; the command-line runs have the 8
    devices of this process and load its compiled programs from the compilation cache."""
    base = tmp_path_factory.mktemp('runs')
    _train(base / 'straight')
    signals = {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'int': signal.SIGINT}
    with concurrent.futures.ThreadPoolExecutor(len(signals)) as pool:
        firsts = dict(zip(signals, pool.map(lambda n: _interrupted(base / n, signals[n]), signals)))
    results = {}
    for name in signals:
        results[f'{name}_first'] = firsts[name]
        results[name] = _train(base / name)
    return {name: base / name for name in ['straight', *signals]}, results


def test_interrupted_runs_end_exactly_like_the_straight_run(runs):
    out, _ = runs
    reference = _restore(out['straight'])
    reference_samples = np.asarray(
        Image.open(out['straight'] / 'samples' / f'step_{N_ITERS:08d}.png')
    )
    assert int(reference.step) == N_ITERS
    for name in ('kill', 'term', 'int'):
        state = _restore(out[name])
        assert int(state.step) == N_ITERS
        for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(x, y)
        samples = np.asarray(Image.open(out[name] / 'samples' / f'step_{N_ITERS:08d}.png'))
        np.testing.assert_array_equal(samples, reference_samples)


def test_kill_9_leaves_the_complete_checkpoints_and_the_run_resumes(runs):
    _, results = runs
    returncode, _, steps = results['kill_first']
    assert returncode == -signal.SIGKILL
    assert SNAPSHOT in steps and max(steps) < N_ITERS
    assert f'Resuming at step {max(steps)} of {N_ITERS}' in results['kill']


@pytest.mark.parametrize('name, sig', [('term', 'SIGTERM'), ('int', 'SIGINT')])
def test_sigterm_and_ctrl_c_save_the_current_step_and_exit_cleanly(runs, name, sig):
    _, results = runs
    returncode, err, steps = results[f'{name}_first']
    assert returncode == 0, err[-3000:]
    assert SNAPSHOT < max(steps) < N_ITERS, steps
    assert re.search(rf'Asked to stop \({sig}\): checkpoint {max(steps)} saved in ', err), err[
        -3000:
    ]
    assert 'Traceback' not in err and 'Error' not in err
    assert f'Resuming at step {max(steps)} of {N_ITERS}' in results[name]


def test_unfinished_and_corrupt_checkpoints_are_skipped_with_a_warning(runs, tmp_path, caplog):
    out, _ = runs
    workdir = tmp_path / 'run'
    shutil.copytree(out['straight'], workdir)
    (workdir / 'checkpoints' / '25.orbax-checkpoint-tmp-1700000000').mkdir()
    for data_file in (workdir / 'checkpoints' / str(N_ITERS)).rglob('d/*'):
        data_file.write_bytes(b'')
    previous = N_ITERS - SNAPSHOT
    earlier = _digest(workdir / 'checkpoints' / str(previous))
    state = _restore(workdir)
    assert int(state.step) == previous
    log = caplog.text
    assert '25.orbax-checkpoint-tmp-1700000000' in log and 'did not finish' in log
    assert f'{workdir}/checkpoints/{N_ITERS} cannot be read' in log
    assert (workdir / checkpoint.UNREADABLE / str(N_ITERS)).is_dir()
    assert _digest(workdir / 'checkpoints' / str(previous)) == earlier


# --- Runs that fail midway, in-process ----------------------------------------------------------


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoints(trained, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    before = _digest(workdir / 'checkpoints')
    # With lr 1e30 the update of step 8 blows the parameters up; the loss of step 9 is still
    # finite, that of step 10 is not (measured). The metrics are checked at step 8 (a log) and
    # 12 (a log, a sample grid and a checkpoint are due), which must name step 10 and write
    # neither the grid nor the checkpoint.
    config = _tiny(
        **{
            'optim.lr': 1e30,
            'training.n_iters': TRAINED_STEP + 8,
            'training.log_freq': 4,
            'training.snapshot_freq': 6,
            'training.sampling_freq': 6,
        }
    )
    with pytest.raises(errors.Diverged) as raised:
        main.run(config, 'train', str(workdir), allow_config_change=True)
    message = str(raised.value)
    assert re.match(
        r'The loss \(nan\) or the gradients \(norm nan\) are not finite at step 10\. ', message
    ), message
    assert (
        f'newest checkpoint (step {TRAINED_STEP}) in {workdir}/checkpoints is unchanged' in message
    )
    assert _digest(workdir / 'checkpoints') == before
    assert not list(workdir.rglob('step_*.png'))  # e.g. samples/step_00000012.png


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    config = _tiny(**{'optim.lr': 1e30, 'training.n_iters': 12, 'training.log_freq': 4})
    with pytest.raises(errors.Diverged) as raised:
        main.run(config, 'train', str(tmp_path / 'run'))
    message = str(raised.value)
    assert f'no checkpoint was written in {tmp_path}/run/checkpoints. ' in message, message
    assert 'None' not in message


@pytest.fixture
def full_disk(monkeypatch):
    """Array writes of every checkpoint save but the first fail with ENOSPC, in orbax's
    background thread as a real full disk would. Returns {'first': digest of the first
    checkpoint when the failing write began, 'failed': steps whose writes failed}."""
    seen = {'first': None, 'failed': set()}
    original = serialization.async_serialize_from_host

    async def write(rslices, tensorstore_spec, **kwargs):
        workdir, step = re.search(
            r'"path": "([^"]*)/checkpoints/(\d+)\.orbax-checkpoint-tmp',
            json.dumps(tensorstore_spec),
        ).groups()
        steps = checkpoint.steps_on_disk(workdir)
        if steps:
            seen['first'] = seen['first'] or _digest(f'{workdir}/checkpoints/{steps[0]}')
            seen['failed'].add(int(step))
            raise OSError(errno.ENOSPC, 'No space left on device')
        return await original(rslices, tensorstore_spec, **kwargs)

    monkeypatch.setattr(serialization, 'async_serialize_from_host', write)
    return seen


def test_failed_save_stops_at_once_and_keeps_the_previous_checkpoint(
    full_disk, tmp_path, caplog, capfd, monkeypatch
):
    caplog.set_level(logging.INFO, logger='absl')
    # stderr as on the command line: absl's handler, quieted as main.run quiets it (orbax's
    # errors without tracebacks), in place of the plain handler absl adds before app.run.
    checkpoint.quiet_orbax()
    root, absl_handler = logging.getLogger(), absl_logging.get_absl_handler()
    monkeypatch.setattr(
        root, 'handlers', [h for h in root.handlers if type(h) is not logging.StreamHandler]
    )
    root.addHandler(absl_handler)
    # How many steps run while orbax's threads write depends on the machine's load. Each check
    # between steps first waits until the pending save is over, so that "at once" is exact:
    # the check after step 7 must raise, before step 7 is logged.
    check = checkpoint.Saver.check

    def check_after_the_save(saver, wait=False):
        deadline = time.monotonic() + 60
        while (
            saver.pending is not None
            and saver.manager.is_saving_in_progress()
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        return check(saver, wait)

    monkeypatch.setattr(checkpoint.Saver, 'check', check_after_the_save)
    workdir = tmp_path / 'run'
    run_config = _tiny(
        **{'training.n_iters': 12, 'training.snapshot_freq': 3, 'training.log_freq': 1}
    )
    try:
        with pytest.raises(errors.SaveFailed) as raised:
            train_job.train(run_config, str(workdir))
    finally:
        root.removeHandler(absl_handler)
    message = str(raised.value)
    assert message == (
        f'Saving checkpoint 6 in {workdir}/checkpoints failed (OSError: [Errno 28] No space '
        'left on device). Training stopped; the checkpoints already there are intact '
        '(newest: 3).'
    )
    assert full_disk['failed'] == {6}
    logged = [int(s) for s in re.findall(r'step (\d+): loss', caplog.text)]
    assert logged == [1, 2, 3, 4, 5, 6], logged
    assert checkpoint.steps_on_disk(str(workdir)) == [3]
    assert _digest(workdir / 'checkpoints' / '3') == full_disk['first']
    assert int(_restore(workdir).step) == 3
    err = capfd.readouterr().err
    assert re.search(r'^E\d{4} .*checkpoints/6', err, re.MULTILINE), err[-3000:]
    assert 'Traceback' not in err, err[-3000:]


def test_asyncio_reports_of_orbax_tasks_are_dropped():
    """After a failed restore, orbax's leftover tasks make asyncio log the same error with a
    traceback whenever they are garbage-collected (once seen in the next test's output)."""

    def record(message):
        return logging.LogRecord(
            'asyncio', logging.ERROR, f'{os.sep}asyncio{os.sep}base.py', 1, message, None, None
        )

    task = (
        'Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize()'
        f' done, defined at {os.sep}site-packages{os.sep}orbax{os.sep}serialization.py:394>>'
    )
    quiet = checkpoint._OrbaxInfoFilter()
    assert not quiet.filter(record(task))
    assert quiet.filter(record('Task exception was never retrieved\nfuture: <Task mine>'))


def test_corrupt_image_is_skipped_with_one_warning_and_training_ends(tmp_path, caplog):
    folder = tmp_path / 'images'
    folder.mkdir()
    generator = np.random.default_rng(0)
    for i in range(15):
        Image.fromarray(generator.integers(0, 256, (10, 12, 3), np.uint8)).save(
            folder / f'{i:02d}.png'
        )
    corrupt = folder / '07b.png'  # sorted among the good ones
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not an image' * 10)
    workdir = tmp_path / 'run'
    # tiny's model and data shapes (so its compiled programs are reused), read from a folder;
    # 2 steps of 8 images read each of the 16 files once.
    config = _tiny(
        **{
            'data.dataset': 'afhq',
            'data.data_dir': str(folder),
            'data.random_flip': True,
            'training.n_iters': 2,
            'training.log_freq': 2,
        }
    )
    main.run(config, 'train', str(workdir))
    assert checkpoint.steps_on_disk(str(workdir)) == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    skipped = [w for w in warnings if w.startswith('Skipping')]
    assert len(skipped) == 1 and str(corrupt) in skipped[0], warnings
    assert warnings[-1].startswith('1 unreadable image file(s) were skipped'), warnings


# --- Bad input, in-process ----------------------------------------------------------------------


@pytest.fixture
def parse(monkeypatch):
    """command_line.parse_flags on a command line: (config, mode, workdir), or the exit message.

    ml_collections reads the --config.KEY overrides from sys.argv and defines a flag for each,
    so sys.argv is set and those flags are removed afterwards (absl's FLAGS are global). Parsing
    also sets the level of absl's logger (to warnings, outside app.run), which is put back."""

    def parse_flags(*args):
        argv = ['ihdm_jax.main', *map(str, args)]
        monkeypatch.setattr(sys, 'argv', argv)
        level = absl_logging.get_absl_logger().level
        try:
            command_line.parse_flags(argv)
            return main._CONFIG.value, main._MODE.value, main._WORKDIR.value
        except SystemExit as exit_:
            return exit_.code
        finally:
            for name in [name for name in flags.FLAGS if name.startswith('config.')]:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
            absl_logging.get_absl_logger().setLevel(level)

    return parse_flags


def _config_file(tmp_path, body):
    path = tmp_path / 'my_config.py'
    path.write_text(body)
    return path


CONFIG_FILE_ERRORS = {
    'missing': (
        None,
        r'Error: --config=.*/no_such.py: no such file; the shipped configs are in '
        r'configs/\.$',
    ),
    'syntax_error': (
        'from configs import tiny\n\ndef get_config(:\n    return tiny.get_config()\n',
        r'Error: --config=.*/my_config.py has a syntax error at line 3: '
        r'invalid syntax\.$',
    ),
    'no_get_config': (
        'from configs import tiny\n\nconfig = tiny.get_config()\n',
        r'Error: --config=.*/my_config.py defines no get_config\(\); a config file '
        r'returns its ConfigDict from get_config\(\) \(see configs/digits.py\)\.$',
    ),
    'wrong_type_in_file': (
        'from configs import tiny\n\ndef get_config():\n    config = '
        "tiny.get_config()\n    config.model.K = '200'\n    return config\n",
        r'Error: flag --config=.*/my_config.py: Error whilst parsing config '
        r"file: TypeError: Could not override field 'K' \(reference\)\. 200 is "
        r"of original type <class 'str'> and cannot be casted to type "
        r"<class 'int'>",
    ),
}


@pytest.mark.parametrize('name', list(CONFIG_FILE_ERRORS))
def test_bad_config_file_ends_in_one_line(parse, tmp_path, name):
    body, expected = CONFIG_FILE_ERRORS[name]
    path = tmp_path / 'no_such.py' if body is None else _config_file(tmp_path, body)
    message = parse(f'--config={path}', f'--workdir={tmp_path / "run"}')
    assert isinstance(message, str) and re.match(expected, message), message
    assert '\n' not in message
    assert sorted(os.listdir(tmp_path)) == sorted(['my_config.py'] if body else [])


FLAG_ERRORS = {
    'misspelt_section': (
        '--config.modle.K=5',
        'Error: config.modle.K is not a config key (the '
        'keys are those of ihdm_jax/defaults.py). Did you mean config.model.K? '
        '(in --config.modle.K=5)',
    ),
    'wrong_type': (
        '--config.model.K=2.5',
        "Error: flag --config.model.K=2.5: invalid literal for int() with base 10: '2.5'",
    ),
    'unknown_mode': ('--mode=smaple', 'Error: flag --mode=smaple: value should be one of <train|'),
}


@pytest.mark.parametrize('name', list(FLAG_ERRORS))
def test_bad_flag_ends_in_one_line(parse, tmp_path, name):
    flag, expected = FLAG_ERRORS[name]
    message = parse('--config=configs/tiny.py', f'--workdir={tmp_path / "run"}', flag)
    assert isinstance(message, str) and message.startswith(expected), message
    assert '\n' not in message
    assert not (tmp_path / 'run').exists()


# Settings that parse but that main.run refuses; name -> (command-line arguments, message).
PARSED_ERRORS = {
    'non_tuple': (
        '--config.model.channel_mult=abc',
        "config.model.channel_mult=('abc',) must be a tuple like the default "
        '(1, 2, 2, 2) (on the command line: '
        '--config.model.channel_mult="(1, 2, 2, 2)").',
    ),
    'float_elements': (
        '--config.model.channel_mult=(1.5, 2)',
        'config.model.channel_mult=(1.5, 2) must be a tuple like the default',
    ),
    'unknown_key_in_file': (
        'FILE',
        'config.model.sigmma is not a config key (the keys are those '
        'of ihdm_jax/defaults.py). Did you mean config.model.sigma?',
    ),
}


@pytest.mark.parametrize('name', list(PARSED_ERRORS))
def test_bad_setting_on_the_command_line_is_refused_before_any_write(parse, tmp_path, name):
    arg, expected = PARSED_ERRORS[name]
    config_path = 'configs/tiny.py'
    if arg == 'FILE':
        config_path = _config_file(
            tmp_path,
            'from configs import tiny\n\ndef get_config():\n'
            '    config = tiny.get_config()\n'
            '    config.model.sigmma = 0.02\n    return config\n',
        )
    parsed = parse(
        f'--config={config_path}',
        f'--workdir={tmp_path / "run"}',
        *([] if arg == 'FILE' else [arg]),
    )
    assert isinstance(parsed, tuple), parsed
    with pytest.raises(errors.UserError) as raised:
        main.run(*parsed)
    assert str(raised.value).startswith(expected), str(raised.value)
    assert not (tmp_path / 'run').exists()


WEIGHTS_HINT = '--config.evaluation.inception_weights=PATH'

# name -> (config name, overrides, mode, workdir, expected message (a regex from its start)).
# Workdirs: 'new' must not be created; 'trained' is a copy of conftest's run that must not
# change; 'under_file' lies under a regular file. Overrides naming EMPTY get an empty folder,
# ZERO_BYTES / NOT_NPZ a file of that kind.
BAD_INPUTS = {
    'K_below_1': (
        'tiny',
        {'model.K': 0},
        'train',
        'new',
        r'config\.model\.K=0 must be at least 1 \(the number of blur levels\)\.$',
    ),
    'infinite_blur': (
        'tiny',
        {'model.blur_sigma_max': float('inf')},
        'train',
        'new',
        r'config\.model\.blur_sigma_max=inf must be finite\.$',
    ),
    'nan_in_a_tuple': (
        'tiny',
        {'evaluation.deltas': (0.01, float('nan'))},
        'sweep_delta',
        'trained',
        r'config\.evaluation\.deltas=\(0\.01, nan\) must be finite\.$',
    ),
    'negative_sigma': (
        'tiny',
        {'model.sigma': -0.01},
        'train',
        'new',
        r'config\.model\.sigma=-0\.01 is negative; expected σ ≥ 0\.$',
    ),
    'negative_delta': (
        'tiny',
        {'sampling.delta': -0.01},
        'sample',
        'trained',
        r'config\.sampling\.delta=-0\.01 is negative; expected δ ≥ 0\.$',
    ),
    'blur_range': (
        'tiny',
        {'model.blur_sigma_min': 5.0},
        'train',
        'new',
        r'config\.model\.blur_sigma_min=5\.0 must be smaller than '
        r'config\.model\.blur_sigma_max=4\.0\.$',
    ),
    'batch_not_divisible': (
        'tiny',
        {'training.batch_size': 12},
        'train',
        'new',
        r'config\.training\.batch_size=12 must be a multiple of the number '
        r'of devices \(8\), since each batch is split over them\.$',
    ),
    'sampling_batch_not_divisible': (
        'tiny',
        {'sampling.batch_size': 4},
        'sample',
        'trained',
        r'config\.sampling\.batch_size=4 must be a multiple of the '
        r'number of devices \(8\)',
    ),
    'image_size_vs_data': (
        'mnist',
        {'data.image_size': 32},
        'train',
        'new',
        r'config\.data\.image_size=32 does not match mnist, whose images are '
        r'28x28; set --config\.data\.image_size=28\.$',
    ),
    'channels_vs_data': (
        'tiny',
        {'data.num_channels': 3},
        'train',
        'new',
        r'config\.data\.num_channels=3 does not match digits, whose images have '
        r'1 channel\(s\)\.$',
    ),
    'missing_image_folder': (
        'afhq64',
        {'data.data_dir': '/no/such/afhq'},
        'train',
        'new',
        r"config\.data\.data_dir='/no/such/afhq' does not exist\. Download "
        r'afhq and point --config\.data\.data_dir at its folder',
    ),
    'empty_image_folder': (
        'afhq64',
        {'data.data_dir': 'EMPTY'},
        'train',
        'new',
        r"config\.data\.data_dir='.*/empty' holds no image files \(\.bmp, ",
    ),
    'missing_tfds_dataset': (
        'cifar10',
        {'data.data_dir': 'EMPTY'},
        'train',
        'new',
        r"The tfds data set 'cifar10' is not prepared in "
        r'.*/empty/cifar10/[0-9.]+, and preparing it needs tensorflow\. '
        r'Install it in this repository with `python -m pip install -e '
        r"'\.\[prepare\]'`",
    ),
    'another_runs_config': (
        'tiny',
        {'model.K': 20},
        'train',
        'trained',
        r'--workdir=.* holds a run of a different config:\n  config\.model\.K: '
        r'10 in .*/config\.json, 20 now\nUse a new --workdir, or pass '
        r'--allow_config_change to continue this run with the new values\.$',
    ),
    'another_models_checkpoint': (
        'tiny',
        {'model.K': 20},
        'sample',
        'trained',
        r'--workdir=.* holds a run of a different config:\n  '
        r'config\.model\.K: 10 in .*/config\.json, 20 now\nPass the '
        r'config that trained this run',
    ),
    'unwritable_workdir': (
        'tiny',
        {},
        'train',
        'under_file',
        r'--workdir=(.*)/a_file/run cannot be written \(\1/a_file is not a '
        r'directory\); choose a directory you can write to\.$',
    ),
    'unwritable_results_workdir': (
        'tiny',
        {},
        'psd',
        'under_file',
        r'--workdir=.*/a_file/run cannot be written',
    ),
    'sample_mistyped_workdir': (
        'tiny',
        {},
        'sample',
        'new',
        r'--workdir=.*/run does not exist: train first \(--mode=train\), '
        r'or point --workdir at a trained run\.$',
    ),
    'interpolate_one_point': (
        'tiny',
        {'analysis.num_points': 1},
        'interpolate',
        'trained',
        r'config\.analysis\.num_points=1 must be at least 2 \(both '
        r'endpoints\)\.$',
    ),
    'hierarchical_split_order': (
        'tiny',
        {'analysis.split_fractions': (0.25, 0.5)},
        'hierarchical',
        'trained',
        r'config\.analysis\.split_fractions=\(0\.25, 0\.5\) must give '
        r'distinct grid points in 1\.\.9, descending '
        r'\(with 10 sampler steps: \[2, 5\]\)\.$',
    ),
    'level_fractions': (
        'tiny',
        {'analysis.level_fractions': (0.0, 1.0)},
        'input_gradients',
        'trained',
        r'config\.analysis\.level_fractions=\(0\.0, 1\.0\) must be '
        r'fractions of K in \(0, 1\]\.$',
    ),
    'eval_no_passes': (
        'tiny',
        {'evaluation.num_passes': 0},
        'eval',
        'trained',
        r'config\.evaluation\.num_passes=0 must be at least 1\.$',
    ),
    'missing_inception_weights': (
        'tiny',
        {'evaluation.inception_weights': '/no/such/w.npz'},
        'fid',
        'trained',
        r'FID Inception weights not found at /no/such/w\.npz\.\n(.|\n)*' + re.escape(WEIGHTS_HINT),
    ),
    'zero_byte_inception_weights': (
        'tiny',
        {'evaluation.inception_weights': 'ZERO_BYTES'},
        'fid',
        'trained',
        r'.*/zero\.npz is not a file of converted FID Inception '
        r'weights \(an empty file\)\. Make one in one of two ways:\n'
        r'(.|\n)*' + re.escape(WEIGHTS_HINT),
    ),
    'not_npz_inception_weights': (
        'tiny',
        {'evaluation.inception_weights': 'NOT_NPZ'},
        'sweep_delta',
        'trained',
        r'.*/weights\.txt is not a file of converted FID Inception '
        r'weights \(not an \.npz archive\)\.',
    ),
}


def _make_input(tmp_path, trained, name):
    """(config, mode, workdir) of BAD_INPUTS[name]."""
    config_name, overrides, mode, workdir_kind, _ = BAD_INPUTS[name]
    files = {
        'EMPTY': tmp_path / 'empty',
        'ZERO_BYTES': tmp_path / 'zero.npz',
        'NOT_NPZ': tmp_path / 'weights.txt',
    }
    files['EMPTY'].mkdir()
    files['ZERO_BYTES'].write_bytes(b'')
    files['NOT_NPZ'].write_text('converted weights, honest\n')
    overrides = {
        k: str(files[v]) if isinstance(v, str) and v in files else v for k, v in overrides.items()
    }
    workdir = {
        'new': tmp_path / 'run',
        'trained': tmp_path / 'trained',
        'under_file': tmp_path / 'a_file' / 'run',
    }[workdir_kind]
    if workdir_kind == 'trained':
        shutil.copytree(trained, workdir)
    if workdir_kind == 'under_file':
        (tmp_path / 'a_file').write_text('')
    return _config_of(config_name, **overrides), mode, workdir


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_write(trained, tmp_path, monkeypatch, name):
    config, mode, workdir = _make_input(tmp_path, trained, name)
    before = _digest(tmp_path)

    def no_restore(*args, **kwargs):
        raise AssertionError('a checkpoint was restored before the checks ended')

    monkeypatch.setattr(checkpoint, 'restore_ema_params', no_restore)
    monkeypatch.setattr(checkpoint, 'restore_latest', no_restore)
    with pytest.raises(errors.UserError) as raised:
        main.run(config, mode, str(workdir))
    assert re.match(BAD_INPUTS[name][4], str(raised.value)), str(raised.value)
    assert _digest(tmp_path) == before  # nothing created or changed, config.json included


# --- Bad input on the command line -------------------------------------------------------------


@pytest.fixture(scope='module')
def cli_errors(trained, tmp_path_factory):
    """A few bad command lines run at once: name -> (result, workdir, digest of the scratch
    folder before the run)."""
    scratch = tmp_path_factory.mktemp('cli')
    (scratch / 'empty').mkdir()
    (scratch / 'zero.npz').write_bytes(b'')
    shutil.copytree(trained, scratch / 'trained')
    config = ['--config=configs/tiny.py']
    commands = {
        'missing_config': (
            ['--config=configs/no_such.py', f'--workdir={scratch / "a"}'],
            scratch / 'a',
        ),
        'misspelt_section': (
            config + [f'--workdir={scratch / "b"}', '--config.modle.K=5'],
            scratch / 'b',
        ),
        'empty_image_folder': (
            [
                '--config=configs/afhq64.py',
                f'--workdir={scratch / "c"}',
                f'--config.data.data_dir={scratch / "empty"}',
            ],
            scratch / 'c',
        ),
        'zero_byte_weights': (
            config
            + [
                f'--workdir={scratch / "trained"}',
                '--mode=fid',
                f'--config.evaluation.inception_weights={scratch / "zero.npz"}',
            ],
            scratch / 'trained',
        ),
    }
    before = _digest(scratch)

    def run(args):
        return subprocess.run(
            [sys.executable, '-m', 'ihdm_jax.main', *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        results = dict(zip(commands, pool.map(run, [args for args, _ in commands.values()])))
    return (
        results,
        {name: workdir for name, (_, workdir) in commands.items()},
        before,
        _digest(scratch),
    )


CLI_MESSAGES = {
    'missing_config': r'Error: --config=configs/no_such.py: no such file',
    'misspelt_section': r'Error: config\.modle\.K is not a config key .* Did you mean '
    r'config\.model\.K\? \(in --config\.modle\.K=5\)$',
    'empty_image_folder': r"Error: config\.data\.data_dir='.*/empty' holds no image files",
    'zero_byte_weights': r'Error: .*/zero\.npz is not a file of converted FID Inception weights',
}


@pytest.mark.parametrize('name', list(CLI_MESSAGES))
def test_bad_command_line_ends_in_one_error_line_and_exit_status_1(cli_errors, name):
    results, workdirs, before, after = cli_errors
    result = results[name]
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert re.match(CLI_MESSAGES[name], error_lines[0]), error_lines[0]
    assert result.stdout == ''
    if name != 'zero_byte_weights':
        assert not workdirs[name].exists()
    assert before == after
