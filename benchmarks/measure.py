"""What the benchmarks share: timing, FLOPs from XLA's cost analysis, device peaks and memory."""

import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from ihdm_jax import parallel
from ihdm_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s per device by compute dtype, from the vendors' spec sheets, matched in order
# against jax's device_kind. 'float32' is the rate of f32 convolutions and matmuls at JAX's default
# precision: TF32 tensor cores on NVIDIA GPUs, one bf16 pass on the TPU MXU.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100', {'bfloat16': 989.4, 'float32': 494.7}),  # SXM
    ('H200', {'bfloat16': 989.4, 'float32': 494.7}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),  # v5e
    ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),  # v5p
    ('TPU v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),  # v6e
)


def peak_tflops(device, dtype: str, override=None):
    """The device's dense peak for `dtype` in TFLOP/s: `override` if given, else the table above
    (None for devices it does not list, such as CPUs)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f'peak_tflops must be positive, got {override}.')
        return float(override)
    for name, peaks in PEAK_TFLOPS:
        if name in device.device_kind:
            return peaks[dtype]
    return None


def flops(stage):
    """FLOPs of one call from XLA's cost analysis of a jax.stages.Compiled (per device, after
    optimisation) or Lowered (the whole program as written); None where XLA gives no count."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    count = (analysis or {}).get('flops', -1.0)
    return float(count) if count > 0 else None


def peak_memory_bytes(device):
    """The device's peak bytes in use so far, where the backend reports it (not on CPU)."""
    stats = device.memory_stats()
    return None if not stats else stats.get('peak_bytes_in_use')


def median_seconds(window, repeats: int) -> float:
    """Median wall time of `repeats` calls of window(), each waited for with block_until_ready."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(window())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_call(fn, *args, repeats: int, min_window: float) -> float:
    """Median seconds per call of fn(*args) after compilation, over `repeats` timed windows of as
    many calls as make each window last at least `min_window` seconds."""
    jax.block_until_ready(fn(*args))  # compile
    calls = 1

    def window():
        for _ in range(calls):
            out = fn(*args)
        return out

    while median_seconds(window, 1) < min_window:
        calls *= 2
    return median_seconds(window, repeats) / calls


def device_info() -> dict:
    """What the figures were measured on."""
    device = jax.devices()[0]
    info = dict(
        device=device.device_kind,
        platform=jax.default_backend(),
        devices=jax.device_count(),
        processes=jax.process_count(),
        jax=jax.__version__,
    )
    if info['platform'] == 'cpu':
        info['cpu'] = cpu_name()
        info['cpu_cores'] = parallel.host_cpus()
        if hasattr(os, 'getloadavg'):  # other work on the machine slows CPU figures down
            # (taken before the benchmark starts working, so that it is not counted)
            info['load_average_1min'] = os.getloadavg()[0]
    return info


def describe(info) -> str:
    """One line naming the device, as in the tables of docs/benchmarks.md."""
    line = f'{info["device"]} ({info["platform"]}) x {info["devices"]}, jax {info["jax"]}'
    if 'cpu' in info:
        line += f', {info["cpu"]}, {info["cpu_cores"]} cores'
    if 'load_average_1min' in info:
        line += f', load average {info["load_average_1min"]:.1f}'
    return line


def command(module: str) -> str:
    """The command line that ran the benchmark module `module`."""
    return ' '.join(['python -m', module] + sys.argv[1:])


def run_main(args):
    """Runs `python -m ihdm_jax.main ARGS` from the repository root, as a user would: (its wall
    seconds, its output, the command line); a failed run raises with the end of its stderr."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', 'ihdm_jax.main', *args], cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    shown = ' '.join(['python -m ihdm_jax.main', *args])
    if proc.returncode:
        raise RuntimeError(f'{shown} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return seconds, proc.stdout + proc.stderr, shown


def cpu_name():
    try:
        with open('/proc/cpuinfo') as fp:
            for line in fp:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_new_file(path):
    """Refuses to overwrite results: raises if `path` already exists."""
    if path and storage.exists(path):
        raise ValueError(f'{path} already exists: give a new file name.')


def write_json(path, payload):
    storage.write_text(path, json.dumps(payload, indent=2) + '\n')
