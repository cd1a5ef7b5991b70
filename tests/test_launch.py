"""launch/tpu_pod.sh and launch/tpu_worker.sh, run offline: a fake `gcloud` on PATH records its
arguments, copies what `scp` sends into a temporary home and runs what `ssh` sends there with
bash; a fake `uv` makes a virtual environment whose `python` records how it was started and
runs until SIGTERM. No JAX runs, nothing is installed or downloaded."""

import os
import pathlib
import shlex
import signal
import socket
import subprocess
import time

import pytest
from conftest import ROOT

FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%q ' "$@" >>"$FAKE_RECORD"; echo >>"$FAKE_RECORD"
node=$FAKE_RECORD.$5  # the TPU VM's state, once created
case "$1 $2 $3 $4" in
    'compute tpus tpu-vm describe') cat "$node" 2>/dev/null ;;
    'compute tpus tpu-vm create') echo READY >"$node" ;;
    'compute tpus tpu-vm delete') rm "$node" ;;
    'compute tpus queued-resources create') echo READY >"$node" ;;
    'compute tpus queued-resources describe') echo ACTIVE ;;
    'compute tpus queued-resources delete') rm "$node" ;;
    'compute tpus tpu-vm scp')
        sources=()
        for arg in "${@:5}"; do
            [[ $arg == --* ]] || sources+=("$arg")
        done
        unset 'sources[-1]'  # NAME:DESTINATION, the worker's home here
        cp "${sources[@]}" "$HOME/" ;;
    'compute tpus tpu-vm ssh')
        for arg in "${@:5}"; do
            [[ $arg == --command=* ]] && command=${arg#--command=}
        done
        cd "$HOME" && bash -c "$command" ;;
    *) exit 1 ;;
esac
"""

FAKE_UV = r"""#!/usr/bin/env bash
printf '%q ' uv "$@" >>"$FAKE_RECORD"; echo >>"$FAKE_RECORD"
if [[ $1 == venv ]]; then
    mkdir -p "${@: -1}/bin"
    cat >"${@: -1}/bin/python" <<'PY'
#!/usr/bin/env bash
printf '%q ' "$@" >>"$HOME/python_calls"; echo >>"$HOME/python_calls"
if [[ -n ${FAKE_PYTHON_FAILS:-} ]]; then
    echo "$FAKE_PYTHON_FAILS"
    exit 3
fi
trap 'kill $(jobs -p) 2>/dev/null; echo "stopped $$" >>"$HOME/python_stops"; exit 0' TERM
sleep 600 </dev/null >/dev/null 2>&1 &
wait
PY
    chmod +x "${@: -1}/bin/python"
fi
"""


@pytest.fixture
def fake_cloud(tmp_path):
    """(environment for the launcher, home of the fake worker, record of gcloud and uv calls)."""
    bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
    bin_dir.mkdir()
    home.mkdir()
    for name, text in (('gcloud', FAKE_GCLOUD), ('uv', FAKE_UV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / 'record'
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION')
    }
    env.update(
        PATH=f'{bin_dir}:{os.environ["PATH"]}',
        HOME=str(home),
        FAKE_RECORD=str(record),
        STARTUP_WAIT='1',
    )
    yield env, home, record
    pid_file = home / 'ihdm_jax_run' / 'pid'
    if pid_file.exists():  # the job the last launch left running
        subprocess.run(['kill', '-TERM', pid_file.read_text().strip()], check=False)


def _launch(env, *args, returncode=0, **extra_env):
    result = subprocess.run(
        ['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), *args],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == returncode, result.stdout + result.stderr
    return result


def _calls(path, count):
    """The first `count` recorded calls (argument lists), waiting up to 20 s for them."""
    for _ in range(200):
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [shlex.split(line) for line in lines]
        time.sleep(0.1)
    raise AssertionError(f'{path}: {count} calls expected, found {len(lines)}')


def test_tpu_pod_launch_and_relaunch_with_and_without_extra_flags(fake_cloud, tmp_path):
    env, home, record = fake_cloud
    workdir = tmp_path / 'run'

    _launch(env, 'tpu-a', 'configs/cifar10.py', str(workdir))
    gcloud = [call for call in _calls(record, 1) if call[0] != 'uv']
    assert gcloud[0][:5] == ['compute', 'tpus', 'tpu-vm', 'describe', 'tpu-a']
    gcloud = gcloud[1:]
    assert gcloud[0] == [
        'compute',
        'tpus',
        'tpu-vm',
        'create',
        'tpu-a',
        '--zone=us-central2-b',
        '--accelerator-type=v4-32',
        '--version=tpu-ubuntu2204-base',
    ]
    assert gcloud[1][:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in gcloud[1]
    assert gcloud[2][:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'tpu-a']
    assert '--worker=all' in gcloud[2]
    uv = [call for call in _calls(record, 1) if call[0] == 'uv']
    assert uv[0][:3] == ['uv', 'venv', '--python'] and float(uv[0][3]) >= 3.11
    assert uv[1][:3] == ['uv', 'pip', 'sync']
    assert uv[1][-1] == f'{home}/ihdm_jax/launch/tpu_requirements.txt'
    assert (home / 'ihdm_jax' / 'ihdm_jax' / 'main.py').exists()
    assert not (home / 'ihdm_jax' / '.git').exists()
    first = _calls(home / 'python_calls', 1)[0]
    assert first == [
        '-m',
        'ihdm_jax.main',
        '--multihost',
        '--config=configs/cifar10.py',
        f'--workdir={workdir}',
    ]  # no empty argument for "no extra flags"
    log = workdir / 'logs' / f'{socket.gethostname()}.log'
    assert log.exists() and os.path.realpath(home / 'ihdm_jax_run' / 'log') == str(log)
    first_pid = (home / 'ihdm_jax_run' / 'pid').read_text().strip()

    flags = [
        '--config.training.n_iters=50',
        '--config.model.channel_mult=(1, 2)',
        "--config.data.data_dir=/data/it's here",
    ]
    # The same command again (another accelerator type named by mistake): the TPU VM exists, so
    # it is not created again, and the job restarts on it.
    result = _launch(
        env,
        'tpu-a',
        'configs/cifar10.py',
        str(workdir),
        *flags,
        ACCELERATOR_TYPE='v5litepod-16',
        ZONE='us-central2-b',
    )
    assert 'TPU VM tpu-a exists in us-central2-b (READY): launching on it.' in result.stdout
    gcloud = [call for call in _calls(record, 1) if call[0] != 'uv']
    assert [call[3] for call in gcloud] == [
        'describe',
        'create',
        'scp',
        'ssh',
        'describe',
        'scp',
        'ssh',
    ]
    assert (home / 'python_stops').read_text().split() == ['stopped', first_pid]
    second = _calls(home / 'python_calls', 2)[1]
    assert second == first + flags
    second_pid = (home / 'ihdm_jax_run' / 'pid').read_text().strip()
    assert second_pid != first_pid and pathlib.Path(f'/proc/{second_pid}').exists()
    assert not pathlib.Path(f'/proc/{first_pid}').exists()


def test_tpu_pod_default_runtime_follows_the_generation(fake_cloud, tmp_path):
    env, _, record = fake_cloud
    expected = {
        'v4-8': 'tpu-ubuntu2204-base',
        'v5litepod-8': 'v2-alpha-tpuv5-lite',
        'v5p-8': 'v2-alpha-tpuv5',
        'v6e-8': 'v2-alpha-tpuv6e',
    }
    for accelerator, runtime in expected.items():
        _launch(
            env,
            f'tpu-{accelerator}',
            'configs/cifar10.py',
            str(tmp_path / 'run'),
            ACCELERATOR_TYPE=accelerator,
            ZONE='us-east5-a',
        )
        create = [
            call
            for call in _calls(record, 1)
            if call[:4] == ['compute', 'tpus', 'tpu-vm', 'create']
        ][-1]
        assert f'--version={runtime}' in create and f'--accelerator-type={accelerator}' in create


def test_tpu_pod_refuses_a_relative_workdir_and_a_zone_without_the_type(fake_cloud):
    env, home, record = fake_cloud
    result = _launch(env, 'tpu-a', 'configs/cifar10.py', 'runs/cifar10', returncode=2)
    assert result.stderr == (
        'Error: WORKDIR=runs/cifar10 is a relative path; every worker must see it: give a '
        'gs://bucket/path or an absolute path on a shared file system.\n'
    )
    result = _launch(
        env, 'tpu-a', 'configs/cifar10.py', 'gs://b/run', returncode=2, ACCELERATOR_TYPE='v6e-8'
    )
    assert result.stderr.startswith(
        'Error: set ZONE to a zone that offers ACCELERATOR_TYPE=v6e-8 (the default zone, '
        'us-central2-b, has v4 only;'
    )
    assert not record.exists() and not (home / 'ihdm_jax_run').exists()
    # A workdir inside the project's folder on the worker, which every launch replaces.
    result = _launch(
        env, 'tpu-a', 'configs/cifar10.py', str(home / 'ihdm_jax' / 'run'), returncode=2
    )
    assert f'WORKDIR={home}/ihdm_jax/run lies in {home}/ihdm_jax, which every launch' in (
        result.stderr
    )
    assert not (home / 'ihdm_jax_run' / 'pid').exists()


def test_a_process_that_dies_at_start_up_fails_the_launch_with_its_log(fake_cloud, tmp_path):
    env, home, _ = fake_cloud
    result = _launch(
        env,
        'tpu-a',
        'configs/cifar10.py',
        str(tmp_path / 'run'),
        returncode=1,
        FAKE_PYTHON_FAILS='Error: config.data.dataset is not known.',
    )
    assert 'the training process' in result.stderr and 'failed (exit status 3)' in result.stderr
    assert result.stderr.rstrip().endswith('Error: config.data.dataset is not known.')
    assert 'Started on every worker' not in result.stdout


def test_a_preempted_tpu_vm_is_created_again(fake_cloud, tmp_path):
    env, home, record = fake_cloud
    _launch(env, 'tpu-a', 'configs/cifar10.py', str(tmp_path / 'run'))
    pathlib.Path(f'{record}.tpu-a').write_text('PREEMPTED\n')
    result = _launch(env, 'tpu-a', 'configs/cifar10.py', str(tmp_path / 'run'))
    assert 'TPU VM tpu-a in us-central2-b is PREEMPTED: deleting and creating it again.' in (
        result.stdout
    )
    gcloud = [call[3] for call in _calls(record, 1) if call[0] != 'uv']
    assert gcloud[4:] == ['describe', 'delete', 'create', 'scp', 'ssh']


def test_a_queued_spot_request_and_the_relaunch_after_a_preemption(fake_cloud, tmp_path):
    env, home, record = fake_cloud
    watcher = subprocess.Popen(
        [
            'bash',
            os.path.join(ROOT, 'launch', 'tpu_pod.sh'),
            'tpu-q',
            'configs/cifar10.py',
            str(tmp_path / 'run'),
        ],
        env={**env, 'QUEUED': '1', 'CREATE_FLAGS': '--spot --reserved', 'WATCH_S': '1'},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _calls(home / 'python_calls', 1)
        pathlib.Path(f'{record}.tpu-q').write_text('PREEMPTED\n')
        _calls(home / 'python_calls', 2)
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        watcher.communicate(timeout=30)
    gcloud = [call for call in _calls(record, 1) if call[0] != 'uv']
    creates = [call for call in gcloud if call[2:4] == ['queued-resources', 'create']]
    assert creates[0] == [
        'compute',
        'tpus',
        'queued-resources',
        'create',
        'tpu-q',
        '--node-id=tpu-q',
        '--zone=us-central2-b',
        '--accelerator-type=v4-32',
        '--runtime-version=tpu-ubuntu2204-base',
        '--spot',
        '--reserved',
    ]
    assert len(creates) == 2
    deleted = [call for call in gcloud if call[2:4] == ['queued-resources', 'delete']]
    assert deleted == [
        ['compute', 'tpus', 'queued-resources', 'delete', 'tpu-q', '--zone=us-central2-b']
        + ['--force', '--quiet']
    ]


FAKE_SLURM = {
    # Ready for scancel's TERM before it records its call, which the test waits for. The sleeper
    # does not hold the job's output pipe: a TERM between its start and the trap's kill would
    # otherwise keep the test reading until the sleep ends.
    'srun': r"""#!/usr/bin/env bash
trap 'kill $(jobs -p) 2>/dev/null; echo "srun stopped" >>"$FAKE_RECORD"; exit 0' TERM
echo $$ >"$FAKE_SRUN_PID"
printf '%q ' srun "$@" >>"$FAKE_RECORD"; echo >>"$FAKE_RECORD"
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ACTIVATED=${ACTIVATED:-}" >>"$FAKE_RECORD"
sleep 600 </dev/null >/dev/null 2>&1 &
wait
""",
    'scancel': r"""#!/usr/bin/env bash
printf '%q ' scancel "$@" >>"$FAKE_RECORD"; echo >>"$FAKE_RECORD"
kill -TERM "$(<"$FAKE_SRUN_PID")"
""",
    'scontrol': r"""#!/usr/bin/env bash
printf '%q ' scontrol "$@" >>"$FAKE_RECORD"; echo >>"$FAKE_RECORD"
""",
}


def test_slurm_job_saves_and_requeues_itself_on_the_time_limit_signal(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record, srun_pid = tmp_path / 'record', tmp_path / 'srun_pid'
    env = dict(
        os.environ,
        PATH=f'{bin_dir}:{os.environ["PATH"]}',
        FAKE_RECORD=str(record),
        FAKE_SRUN_PID=str(srun_pid),
        SLURM_JOB_ID='4242',
        SLURM_SUBMIT_DIR=ROOT,
        SLURM_CPUS_PER_TASK='3',
        # Like conda's and Lmod's activation scripts, it reads a variable that is not set.
        ACTIVATE='[[ -z $AN_UNSET_VARIABLE ]] && export ACTIVATED=yes',
    )
    job = subprocess.Popen(
        [
            'bash',
            os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch'),
            'configs/cifar10.py',
            '/shared/run',
            '--config.model.dtype=bfloat16',
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        calls = _calls(record, 2)
        assert calls[0] == [
            'srun',
            '--kill-on-bad-exit=1',
            '--cpus-per-task=3',
            '--gpu-bind=none',
            'python3',
            '-m',
            'ihdm_jax.main',
            '--config=configs/cifar10.py',
            '--workdir=/shared/run',
            '--config.model.dtype=bfloat16',
        ]
        assert calls[1] == ['OMP_NUM_THREADS=3', 'ACTIVATED=yes']
        job.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit
        output, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, output
    assert _calls(record, 5)[2:] == [
        ['scancel', '--signal=TERM', '4242'],
        ['srun', 'stopped'],
        ['scontrol', 'requeue', '4242'],
    ]
    with open(os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch')) as f:
        directives = [line.split()[1] for line in f if line.startswith('#SBATCH')]
    assert '--requeue' in directives and '--signal=B:USR1@300' in directives
