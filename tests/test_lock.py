"""One training job per workdir (ihdm_jax.lock): a second launch is refused with one line that
names the holder, a crashed holder's lock is taken over, and only the holder removes unfinished
checkpoint saves."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from conftest import TRAINED_STEP

from ihdm_jax import checkpoint
from ihdm_jax import errors
from ihdm_jax import lock
from ihdm_jax import parallel


def _write_lock(workdir, **fields):
    content = {
        'host': 'elsewhere',
        'machine': 'elsewhere',
        'pid': 1,
        'token': 'other',
        'started': 'earlier',
        'heartbeat': time.time(),
        **fields,
    }
    (workdir / lock.LOCK_FILE).write_text(json.dumps(content))


def test_the_holder_is_named_and_the_lock_is_released(tmp_path):
    with lock.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert (held['host'], held['pid']) == (socket.gethostname(), os.getpid())
        with pytest.raises(
            errors.UserError,
            match=(
                rf'--workdir={tmp_path} is in use by another job: pid {os.getpid()} on host '
                rf'{socket.gethostname()}, started .*heartbeat 0 s ago'
            ),
        ):
            with lock.WorkdirLock(str(tmp_path)):
                pass
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text()) == held
    assert not (tmp_path / lock.LOCK_FILE).exists()
    with lock.WorkdirLock(str(tmp_path / 'new' / 'run')):
        assert (tmp_path / 'new' / 'run' / lock.LOCK_FILE).exists()


def test_a_live_holder_elsewhere_blocks_until_its_heartbeat_is_stale(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(lock, 'SETTLE_S', 0.01)
    _write_lock(tmp_path, heartbeat=time.time() - lock.STALE_S + 60)
    with pytest.raises(errors.UserError, match='pid 1 on host elsewhere'):
        with lock.WorkdirLock(str(tmp_path)):
            pass
    _write_lock(tmp_path, heartbeat=time.time() - lock.STALE_S - 1)
    with lock.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())['pid'] == os.getpid()
    assert 'Taking over the stale lock' in caplog.text and 'pid 1 on host elsewhere' in caplog.text


def test_a_crashed_holder_on_this_machine_is_taken_over_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, 'SETTLE_S', 0.01)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), machine=lock.this_machine(), pid=dead.pid)
    with lock.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())['pid'] == os.getpid()
    (tmp_path / lock.LOCK_FILE).write_text('{"host": "elsew')  # damaged: no heartbeat to trust
    with lock.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())['pid'] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_requeued_slurm_job_takes_over_its_own_live_lock(tmp_path, monkeypatch, caplog):
    """A SLURM job run again under its id (requeued) finds the live lock of its earlier run
    elsewhere and takes it over at once; another job, or one outside SLURM, is refused."""
    monkeypatch.setattr(lock, 'SETTLE_S', 0.01)
    monkeypatch.delenv('SLURM_CLUSTER_NAME', raising=False)
    for job in ('4243', None):
        if job is None:
            monkeypatch.delenv('SLURM_JOB_ID')
        else:
            monkeypatch.setenv('SLURM_JOB_ID', job)
        _write_lock(tmp_path, slurm_job='4242')
        with pytest.raises(
            errors.UserError, match=r'pid 1 on host elsewhere \(SLURM job 4242\), started earlier'
        ):
            with lock.WorkdirLock(str(tmp_path)):
                pass
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    caplog.set_level(logging.INFO)
    with lock.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert (held['pid'], held['slurm_job']) == (os.getpid(), '4242')
    assert (
        f'Taking over the lock {tmp_path / lock.LOCK_FILE} of pid 1 on host elsewhere: an '
        'earlier run of this SLURM job, 4242 ' in caplog.text
    )

    _write_lock(tmp_path, slurm_job='a/4242')  # job ids of two clusters may be equal
    monkeypatch.setenv('SLURM_CLUSTER_NAME', 'b')
    with pytest.raises(errors.UserError, match=r'\(SLURM job a/4242\)'):
        with lock.WorkdirLock(str(tmp_path)):
            pass
    monkeypatch.setenv('SLURM_CLUSTER_NAME', 'a')
    with lock.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())['slurm_job'] == 'a/4242'
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_the_heartbeat_is_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, 'HEARTBEAT_S', 0.05)
    with lock.WorkdirLock(str(tmp_path)):
        first = json.loads((tmp_path / lock.LOCK_FILE).read_text())['heartbeat']
        time.sleep(0.5)
        later = json.loads((tmp_path / lock.LOCK_FILE).read_text())['heartbeat']
    assert later > first


def test_only_the_lock_holder_removes_unfinished_saves(config, trained, tmp_path, caplog):
    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    unfinished = workdir / 'checkpoints' / f'{TRAINED_STEP + 1}.orbax-checkpoint-tmp-1700000000'
    unfinished.mkdir()
    _, step = checkpoint.restore_ema_params(config, str(workdir), parallel.make_mesh())
    assert step == TRAINED_STEP and unfinished.is_dir() and 'did not finish' not in caplog.text
    checkpoint.make_manager(str(workdir), remove_unfinished=True).close()
    deadline = time.time() + 30  # orbax removes it in a background thread
    while unfinished.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not unfinished.exists() and 'did not finish' in caplog.text


def _launch(workdir):
    return [
        sys.executable,
        '-m',
        'ihdm_jax.main',
        '--config=configs/tiny.py',
        f'--workdir={workdir}',
        '--config.training.n_iters=4',
        '--config.training.snapshot_freq=2',
    ]


def test_a_second_launch_on_a_live_workdir_exits_with_one_line(tmp_path):
    """Two launches on one workdir: the second ends with one `Error:` line naming the first,
    which finishes as if alone (every checkpoint, one TensorBoard file, no warning). The first
    is paused (SIGSTOP) from the moment it holds the lock until the second has ended, so that
    it surely runs meanwhile."""
    workdir = tmp_path / 'run'
    first = subprocess.Popen(
        _launch(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while not (workdir / lock.LOCK_FILE).exists() and first.poll() is None:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            _launch(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600
        )
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(
        f'Error: --workdir={workdir} is in use by another job: pid '
        f'{first.pid} on host {socket.gethostname()}'
    ), lines[0]
    assert first.returncode == 0, first_err[-3000:]
    assert 'WARNING' not in first_err and 'Error' not in first_err, first_err[-3000:]
    assert checkpoint.steps_on_disk(str(workdir)) == [2, 4]
    assert len(list((workdir / 'tensorboard').iterdir())) == 1
    assert sorted(p.name for p in (workdir / 'samples').iterdir()) == ['step_00000004.png']
    assert not (workdir / lock.LOCK_FILE).exists()
