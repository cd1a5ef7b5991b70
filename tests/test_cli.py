"""Every --mode of `python -m ihdm_jax.main` runs from the command line, and every shipped config
passes validation.

The runs of the modes (cli_runs.py) go on in the background from the start of the session;
these tests run last and check them. --mode=train runs from the command line in
test_reliability.py.
"""

import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runs import ENV
from cli_runs import MODES
from cli_runs import TINY
from cli_runs import files
from conftest import ROOT
from conftest import TRAINED_STEP
from configs import tiny
from ihdm_jax import main
from ihdm_jax import parallel
from ihdm_jax import state as state_lib
from ihdm_jax import validation


@pytest.fixture(scope='module')
def mode_runs(command_line_runs):
    """mode -> (result, workdir, files before) of every mode in MODES (cli_runs.py)."""
    return command_line_runs()


def test_every_mode_is_run_from_the_command_line():
    assert set(MODES) | {'train'} == set(main.JOBS) | {'summary'}


@pytest.mark.parametrize('mode', list(MODES))
def test_mode_runs_from_the_command_line_and_writes_only_its_results(mode_runs, mode):
    result, workdir, before = mode_runs[mode]
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and 'Error' not in result.stderr, \
        result.stderr[-3000:]
    after = files(workdir)
    written = {path for path in after if before.get(path) != after[path]}
    assert set(MODES[mode]) <= written, sorted(written)
    # Every output lies in the mode's own folder; the checkpoint and config.json are untouched.
    folders = {os.path.dirname(path) for path in MODES[mode]}
    assert all(os.path.dirname(path) in folders for path in written), sorted(written)
    assert set(before) <= set(after)


@pytest.mark.parametrize('mode, name', [('eval', 'likelihood'), ('fid', 'fid'),
                                        ('sweep_delta', 'sweep_delta')])
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
        assert all(np.isfinite(row['fid']) and np.isfinite(row['bits_per_dim'])
                   for row in saved['results'])


def test_summary_prints_the_parameter_count_of_the_model(mode_runs):
    result, _, _ = mode_runs['summary']
    config = tiny.get_config()
    abstract = state_lib.abstract_params(config, parallel.make_mesh())
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
    assert re.search(rf'^parameters: {count}$', result.stdout, re.MULTILINE), result.stdout[-500:]


def _shipped_configs():
    return sorted(p.stem for p in (pathlib.Path(ROOT) / 'configs').glob('*.py')
                  if p.stem != '__init__')


@pytest.mark.parametrize('name', _shipped_configs())
def test_shipped_config_passes_validation(name):
    validation.check_config(importlib.import_module(f'configs.{name}').get_config())


def test_help_shows_the_override_syntax_and_the_shipped_configs():
    result = subprocess.run([sys.executable, '-m', 'ihdm_jax.main', '--help'], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '--config.KEY=VALUE' in result.stdout
    assert '--config.training.n_iters=500' in result.stdout
    for name in _shipped_configs():
        first_line = importlib.import_module(f'configs.{name}').__doc__.splitlines()[0]
        assert re.search(rf'^  configs/{name}\.py +{re.escape(first_line)}$', result.stdout,
                         re.MULTILINE), result.stdout
    assert '--workdir: Directory for checkpoints' in result.stdout


@pytest.mark.parametrize('setting, platform, expected', [
    ('auto', 'gpu', 'run/compilation_cache'), ('auto', 'tpu', 'run/compilation_cache'),
    ('auto', 'cpu', None), ('', 'gpu', None), ('/cache', 'cpu', '/cache')])
def test_compilation_cache_is_on_by_default_on_gpu_and_tpu(setting, platform, expected):
    assert parallel.compilation_cache_dir(setting, 'run', platform) == expected
