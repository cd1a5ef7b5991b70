"""Two JAX processes on localhost (launch/local_multiprocess.sh) train, checkpoint and resume."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _launch(workdir, n_iters):
    env = dict(os.environ, PYTHON=sys.executable, CONFIG='configs/tiny.py', NUM_PROCESSES='2',
               DEVICES_PER_PROCESS='2')
    result = subprocess.run(
        ['bash', 'launch/local_multiprocess.sh', str(workdir),
         f'--config.training.n_iters={n_iters}', '--config.training.log_freq=2'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    return [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]


def _losses(log):
    return dict(re.findall(r'step (\d+): loss ([0-9.]+)', log))


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    logs = _launch(tmp_path, 4)
    assert 'Starting at step 0 of 4 on 4 devices (2 processes)' in logs[0]
    losses = [_losses(log) for log in logs]
    assert set(losses[0]) == {'2', '4'} and losses[0] == losses[1]
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
    assert (tmp_path / 'samples' / 'step_00000004.png').exists()

    logs = _launch(tmp_path, 6)
    assert all('Resuming at step 4 of 6 on 4 devices (2 processes)' in log for log in logs)
    losses = [_losses(log) for log in logs]
    assert set(losses[0]) == {'6'} and losses[0] == losses[1]
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '6']
