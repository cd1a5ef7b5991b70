"""Every --mode of `python -m ihdm_jax.main` runs from the command line, and every shipped config
passes validation.

Each mode runs on its own copy of conftest's trained workdir, with analysis and evaluation
settings made tiny; what the modes compute is tested in test_analysis_jobs.py and
test_evaluate.py. --mode=train runs from the command line in test_reliability.py.
"""

import concurrent.futures
import hashlib
import importlib
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from conftest import TRAINED_STEP
from conftest import with_devices

from configs import tiny
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import state as state_lib
from ihdm_jax import validation

# mode -> the files it writes, relative to the workdir (summary writes none: it prints).
MODES = {
    'sample': ['samples/samples.npz', 'samples/samples.png', 'samples/trajectory.gif'],
    'eval': ['eval/likelihood.json', 'eval/likelihood_levels.png'],
    'fid': ['eval/fid.json', 'eval/fid_samples.npz', 'eval/fid_samples.png'],
    'sweep_delta': ['eval/sweep_delta.json', 'eval/sweep_delta.md', 'eval/sweep_delta.png'],
    'same_init': [
        'analysis/same_init/same_init.npz',
        'analysis/same_init/same_init.png',
        'analysis/same_init/trajectory.gif',
    ],
    'share_noise': [
        'analysis/share_noise/share_noise.npz',
        'analysis/share_noise/share_noise.png',
        'analysis/share_noise/trajectory.gif',
    ],
    'interpolate': [
        'analysis/interpolate/interpolate.npz',
        'analysis/interpolate/interpolate.png',
        'analysis/interpolate/interpolate.gif',
    ],
    'hierarchical': [
        'analysis/hierarchical/hierarchical.npz',
        'analysis/hierarchical/hierarchical.png',
    ],
    'delta_grid': ['analysis/delta_grid/delta_grid.npz', 'analysis/delta_grid/delta_grid.png'],
    'input_gradients': [
        'analysis/input_gradients/input_gradients.npz',
        'analysis/input_gradients/input_gradients.png',
    ],
    'trajectory_gradients': [
        'analysis/trajectory_gradients/trajectory_gradients.npz',
        'analysis/trajectory_gradients/trajectory_gradients.png',
    ],
    'nearest_neighbours': [
        'analysis/nearest_neighbours/nearest_neighbours.npz',
        'analysis/nearest_neighbours/nearest_neighbours.png',
    ],
    'psd': ['analysis/psd/psd.json', 'analysis/psd/psd.png', 'analysis/psd/energy_vs_blur.png'],
    'prior_overlap': [
        'analysis/prior_overlap/prior_overlap.json',
        'analysis/prior_overlap/prior_overlap.png',
    ],
    'frequency_partition': [
        'analysis/frequency_partition/frequency_partition.npz',
        'analysis/frequency_partition/frequency_partition.png',
    ],
    'restore': ['restore/restored.npz', 'restore/grid.png', 'restore/mean/00000.png'],
    'summary': [],
}
FID_MODES = ('fid', 'sweep_delta')
TINY = {
    'sampling.num_samples': 8,
    'evaluation.num_examples': 16,
    'evaluation.num_passes': 5,
    'evaluation.fid_num_samples': 8,
    'evaluation.deltas': (0.0125, 0.015),
    'analysis.num_rows': 2,
    'analysis.num_columns': 2,
    'analysis.num_points': 3,
    'analysis.num_trees': 1,
    'analysis.split_fractions': (0.5,),
    'analysis.branches': 2,
    'analysis.level_fractions': (0.5, 1.0),
    'analysis.num_images': 16,
    'analysis.gradient_pixels': ((0.5, 0.5),),
    'analysis.blur_sigma_maxes': (1.0, 4.0),
    'analysis.num_neighbours': 2,
    'analysis.deltas': (0.0, 0.0125),
}
# One device: these runs test the command line, not sharding.
ENV = with_devices(1)


def _files(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in pathlib.Path(folder).rglob('*')
        if p.is_file()
    }


def _run_mode(base, trained, mode, settings):
    """Runs `mode` on a copy of the trained workdir: (result, workdir, its files before)."""
    workdir = base / mode
    shutil.copytree(trained, workdir)
    before = _files(workdir)
    command = [
        sys.executable,
        '-m',
        'ihdm_jax.main',
        '--config=configs/tiny.py',
        f'--workdir={workdir}',
        f'--mode={mode}',
    ]
    command += [f'--config.{key}={value}' for key, value in {**TINY, **settings}.items()]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return result, workdir, before


@pytest.fixture(scope='module')
def mode_runs(trained, inception_weights, tmp_path_factory):
    """mode -> (result, workdir, files before) of every mode in MODES, two at a time.

    The FID modes run one after the other (the second loads the Inception network the first
    compiled); they read the training set's FID statistics from a file (the identity
    covariance) instead of computing them."""
    base = tmp_path_factory.mktemp('modes')
    stats = base / 'train_stats.npz'
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    fid_settings = {
        'evaluation.inception_weights': inception_weights,
        'evaluation.fid_train_stats': stats,
    }

    def fid_runs():
        return [_run_mode(base, trained, mode, fid_settings) for mode in FID_MODES]

    blurred = base / 'blurred.npz'
    np.savez(blurred, images=np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8))
    settings = {
        'restore': {
            'restore.input': blurred,
            'restore.blur_sigma': 1.0,
            'restore.num_samples': 2,
        }
    }

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fid = pool.submit(fid_runs)
        others = {
            mode: pool.submit(_run_mode, base, trained, mode, settings.get(mode, {}))
            for mode in MODES
            if mode not in FID_MODES
        }
        return {
            **{mode: future.result() for mode, future in others.items()},
            **dict(zip(FID_MODES, fid.result())),
        }


def test_every_mode_is_run_from_the_command_line():
    assert set(MODES) | {'train'} == set(main.JOBS) | {'summary'}


@pytest.mark.parametrize('mode', list(MODES))
def test_mode_runs_from_the_command_line_and_writes_only_its_results(mode_runs, mode):
    result, workdir, before = mode_runs[mode]
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and 'Error' not in result.stderr, result.stderr[-3000:]
    # orbax's INFO records (a few dozen per restore) are filtered out.
    assert not re.search(r'^I\d{4} .* checkpoint_manager\.py:\d+\]', result.stderr, re.MULTILINE), (
        result.stderr[-3000:]
    )
    after = _files(workdir)
    written = {path for path in after if before.get(path) != after[path]}
    assert set(MODES[mode]) <= written, sorted(written)
    # Every output lies in the mode's own folder; the checkpoint and config.json are untouched.
    folders = {os.path.dirname(path) for path in MODES[mode]}
    assert all(os.path.dirname(path) in folders for path in written), sorted(written)
    assert set(before) <= set(after)


@pytest.mark.parametrize(
    'mode, name', [('eval', 'likelihood'), ('fid', 'fid'), ('sweep_delta', 'sweep_delta')]
)
def test_evaluations_use_the_newest_checkpoint_and_the_requested_amounts(mode_runs, mode, name):
    _, workdir, _ = mode_runs[mode]
    with open(workdir / 'eval' / f'{name}.json') as f:
        saved = json.load(f)
    assert saved['step'] == TRAINED_STEP
    if mode == 'eval':
        assert saved['num_examples'] == TINY['evaluation.num_examples']
        assert np.isfinite(saved['bits_per_dim'])
    if mode == 'fid':
        assert saved['num_samples'] == TINY['evaluation.fid_num_samples']
        assert np.isfinite(saved['fid']) and saved['fid'] > 0
    if mode == 'sweep_delta':
        assert saved['num_examples'] == TINY['evaluation.num_examples']
        assert [row['delta'] for row in saved['results']] == list(TINY['evaluation.deltas'])
        assert all(
            np.isfinite(row['fid']) and np.isfinite(row['bits_per_dim']) for row in saved['results']
        )


def test_summary_prints_the_parameter_count_of_the_model(mode_runs):
    result, _, _ = mode_runs['summary']
    config = tiny.get_config()
    abstract = state_lib.abstract_params(config, parallel.make_mesh())
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
    assert re.search(rf'^parameters: {count}$', result.stdout, re.MULTILINE), result.stdout[-500:]


def _shipped_configs():
    return sorted(
        p.stem for p in (pathlib.Path(ROOT) / 'configs').glob('*.py') if p.stem != '__init__'
    )


@pytest.mark.parametrize('name', _shipped_configs())
def test_shipped_config_passes_validation(name):
    validation.check_config(importlib.import_module(f'configs.{name}').get_config())


def test_help_shows_the_override_syntax_and_the_shipped_configs():
    result = subprocess.run(
        [sys.executable, '-m', 'ihdm_jax.main', '--help'],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert '--config.KEY=VALUE' in result.stdout
    assert '--config.training.n_iters=500' in result.stdout
    for name in _shipped_configs():
        first_line = importlib.import_module(f'configs.{name}').__doc__.splitlines()[0]
        assert re.search(
            rf'^  configs/{name}\.py +{re.escape(first_line)}$', result.stdout, re.MULTILINE
        ), result.stdout
    assert '--workdir: Directory for checkpoints' in result.stdout


@pytest.mark.parametrize(
    'setting, platform, expected',
    [
        ('auto', 'gpu', 'run/compilation_cache'),
        ('auto', 'tpu', 'run/compilation_cache'),
        ('auto', 'cpu', None),
        ('', 'gpu', None),
        ('/cache', 'cpu', '/cache'),
    ],
)
def test_compilation_cache_is_on_by_default_on_gpu_and_tpu(setting, platform, expected):
    assert parallel.compilation_cache_dir(setting, 'run', platform) == expected
