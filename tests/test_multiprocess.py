"""Two JAX processes of two CPU devices each (launch/local_multiprocess.sh) train configs/tiny.py
as one process with four devices does, resume, and stop together at one step on SIGTERM."""

import concurrent.futures
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT
from conftest import with_devices

from configs import tiny
from ihdm_jax import checkpoint
from ihdm_jax import parallel
from ihdm_jax import state as state_lib

SETTINGS = ['--config.training.snapshot_freq=2', '--config.training.log_freq=2']


def _launch(workdir, n_iters, *flags):
    """The two-process job to n_iters, started; its output goes to WORKDIR/logs/process_i.log.

    Its compilation cache is WORKDIR/compilation_cache, as on GPU and TPU: process 0 writes the
    programs of the first launch, and both processes load them on the relaunch."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        CONFIG='configs/tiny.py',
        NUM_PROCESSES='2',
        DEVICES_PER_PROCESS='2',
        JAX_COMPILATION_CACHE_DIR=str(workdir / 'compilation_cache'),
    )
    return subprocess.Popen(
        [
            'bash',
            'launch/local_multiprocess.sh',
            str(workdir),
            f'--config.training.n_iters={n_iters}',
            *SETTINGS,
            *flags,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def _logs(workdir):
    return [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]


def _two_processes(workdir, n_iters):
    launcher = _launch(workdir, n_iters)
    assert launcher.wait(timeout=600) == 0, _logs(workdir)[0][-3000:]
    return _logs(workdir), checkpoint.steps_on_disk(str(workdir))


def _one_process(workdir, n_iters):
    """One process with four devices: the same mesh, batches and shardings in one process."""
    env = with_devices(4)
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'ihdm_jax.main',
            '--config=configs/tiny.py',
            f'--workdir={workdir}',
            f'--config.training.n_iters={n_iters}',
            *SETTINGS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _job_processes(launcher):
    """The pids of the launcher's ihdm_jax.main processes."""
    children = pathlib.Path(f'/proc/{launcher.pid}/task/{launcher.pid}/children')
    return [
        int(pid)
        for pid in children.read_text().split()
        if b'ihdm_jax.main' in pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
    ]


def _resume_and_sigterm_after_step(workdir, step):
    """The two-process job resumed towards step 100, saving every 2 steps and drawing samples
    at step 6, and sent SIGTERM (both processes) once process 0 has logged `step`; (launcher
    exit status, logs, pids signalled, steps on disk before)."""
    before = checkpoint.steps_on_disk(str(workdir))
    launcher = _launch(
        workdir,
        100,
        '--config.training.log_freq=1',
        '--config.training.sampling_freq=6',
        '--config.training.max_to_keep=100',
    )
    log = workdir / 'logs' / 'process_0.log'
    deadline = time.time() + 600
    while launcher.poll() is None and time.time() < deadline:
        if log.exists() and f'step {step}: loss' in log.read_text():
            break
        time.sleep(0.05)
    pids = _job_processes(launcher)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return launcher.wait(timeout=600), _logs(workdir), pids, before


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """One process with four devices trains 6 steps while two processes train 4; the
    two-process run is then resumed and stopped by SIGTERM after step 7.

    The two-process jobs run one at a time, first in their worker (conftest.SLOW_FIRST): under
    load, a process that reaches the first collective over 30 s after its partner fails
    (gloo's connection timeout)."""
    base = tmp_path_factory.mktemp('multiprocess')
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        one = pool.submit(_one_process, base / 'one', 6)
        first = _two_processes(base / 'two', 4)
        one.result()
    return base, first, _resume_and_sigterm_after_step(base / 'two', 7)


def test_two_processes_start_and_resume_on_four_devices(runs):
    base, (first_logs, first_steps), (_, resumed_logs, _, before) = runs
    assert 'Starting at step 0 of 4 on 4 devices (2 processes)' in first_logs[0]
    assert first_steps == before == [2, 4]
    assert all(
        'Resuming at step 4 of 100 on 4 devices (2 processes)' in log for log in resumed_logs
    )
    assert {2, 4, 6} <= set(checkpoint.steps_on_disk(str(base / 'two')))
    assert (base / 'two' / 'samples' / 'step_00000006.png').exists()


def _state_at(workdir, step):
    manager = checkpoint.make_manager(str(workdir))
    try:
        abstract = state_lib.abstract_state(tiny.get_config(), parallel.make_mesh())
        return jax.device_get(checkpoint.restore(manager, step, abstract))
    finally:
        manager.close()


def _max_difference(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - y), initial=0))
        for x, y in zip(leaves_a, leaves_b)
    )


def test_two_processes_train_like_one_process_with_the_same_devices(runs):
    base = runs[0]
    # The gradients are summed across devices in another order across processes. After step 2,
    # the first with a learning rate > 0, every leaf agrees to 3.7e-9 (measured).
    two, one = _state_at(base / 'two', 2), _state_at(base / 'one', 2)
    assert _max_difference(two, one) < 1e-6
    # By step 6 (the two-process run resumed at 4) Adam's moments agree to 7.4e-8, while its
    # normalised step g/√v turns the rounding of gradients near 0 into parameter differences
    # of up to 4.5e-5 (over 1e-6 in 89 of the 162,177 parameters, measured); a wrong batch, key
    # or sum changes them by the order of the learning rate, 1e-3.
    two, one = _state_at(base / 'two', 6), _state_at(base / 'one', 6)
    assert int(two.step) == int(one.step) == 6
    assert _max_difference(two.opt_state, one.opt_state) < 1e-6
    assert _max_difference(two.params, one.params) < 2e-4
    assert _max_difference(two.ema_params, one.ema_params) < 2e-4


def test_sigterm_stops_both_processes_at_one_saved_step(runs):
    base, _, (status, logs, pids, _) = runs
    assert len(pids) == 2, pids
    assert status == 0, logs[0][-3000:]
    stops = [re.findall(r'Asked to stop \(SIGTERM\): checkpoint (\d+) saved', log) for log in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], logs[0][-3000:]
    step = int(stops[0][0])
    assert 7 <= step < 100
    assert max(checkpoint.steps_on_disk(str(base / 'two'))) == step
