"""The CPU device count of the command lines: one device per core, as many as divide the
batches, unless XLA_FLAGS sets it (each case in a fresh process, before JAX starts); the
detection of multi-process launches."""

import functools
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from ihdm_jax import parallel

_PROGRAM = (
    'from ihdm_jax import parallel; count = parallel.use_cpu_cores({sizes}); '
    'import jax; print(count, jax.device_count())'
)


def _devices(sizes, xla_flags):
    env = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
    if xla_flags:
        env['XLA_FLAGS'] = xla_flags
    result = subprocess.run(
        [sys.executable, '-c', _PROGRAM.format(sizes=sizes)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return tuple(map(int, result.stdout.split()))


@pytest.mark.parametrize('sizes', [[12, 8], [7, 4]])
def test_one_cpu_device_per_core_that_divides_every_batch(sizes):
    cores = len(os.sched_getaffinity(0))
    common = math.gcd(*sizes)
    expected = max(d for d in range(1, cores + 1) if common % d == 0)
    assert _devices(sizes, '') == (expected, expected)


def test_a_device_count_in_xla_flags_is_kept():
    assert _devices([12, 8], '--xla_force_host_platform_device_count=3') == (0, 3)


def test_a_cloud_tpu_vm_is_told_by_its_tpu_chips_and_libtpu(tmp_path, monkeypatch):
    devices = tmp_path / 'devices'
    for address, vendor, device in (
        ('0000:00:04.0', '0x1ae0', '0x0042'),  # Google's gVNIC network card
        ('0000:00:05.0', '0x1ae0', '0x005e'),  # a TPU v4 chip
        ('0000:00:06.0', '0x1ae0', '0x005e'),
        ('0000:00:07.0', '0x8086', '0x005e'),  # another vendor's device
    ):
        (devices / address).mkdir(parents=True)
        (devices / address / 'vendor').write_text(vendor + '\n')
        (devices / address / 'device').write_text(device + '\n')
    assert parallel.tpu_chips(str(devices)) == 2
    assert parallel.tpu_chips(str(tmp_path / 'none')) == 0

    monkeypatch.delenv('SLURM_STEP_NUM_TASKS', raising=False)
    monkeypatch.delenv('TPU_WORKER_HOSTNAMES', raising=False)
    chips = parallel.tpu_chips
    monkeypatch.setattr(parallel, 'tpu_chips', functools.partial(chips, str(devices)))
    assert not parallel.launched_by_cluster()  # no libtpu installed
    (tmp_path / 'site' / 'libtpu').mkdir(parents=True)
    (tmp_path / 'site' / 'libtpu' / '__init__.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    assert parallel.launched_by_cluster()
    monkeypatch.setattr(parallel, 'tpu_chips', functools.partial(chips, str(tmp_path / 'none')))
    assert not parallel.launched_by_cluster()
    monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
    assert parallel.launched_by_cluster()
