"""The CPU device count of the command lines: one device per core, as many as divide the
batches, unless XLA_FLAGS sets it (each case in a fresh process, before JAX starts)."""

import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

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
