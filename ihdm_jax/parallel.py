"""Multi-process start-up, the device mesh and the shardings of the training state and batches.

One mesh axis, 'data', spans every device of every process. Batches are split along it; the
training state is replicated. No pmap: jitted functions get these shardings explicitly.
"""

import glob
import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ihdm_jax import errors

DATA_AXIS = 'data'


# PCI ids of TPU chips: Google's vendor id and the chips' device ids (v3, v4, v5p, v5e, v6e, 7x).
GOOGLE_PCI_VENDOR = '0x1ae0'
TPU_PCI_DEVICES = ('0x0027', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')


def tpu_chips(pci_devices: str = '/sys/bus/pci/devices') -> int:
    """The TPU chips attached to this machine through PCI (0 on other machines)."""
    chips = 0
    for device in glob.glob(os.path.join(pci_devices, '*')):
        try:
            with open(os.path.join(device, 'vendor')) as vendor:
                if vendor.read().strip() != GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(device, 'device')) as device_id:
                chips += device_id.read().strip() in TPU_PCI_DEVICES
        except OSError:
            continue
    return chips


def launched_by_cluster() -> bool:
    """True inside an srun step of several tasks, a TPU pod runtime with several workers, or on
    a Cloud TPU VM (libtpu installed and TPU chips attached), where jax.distributed finds the
    workers of the slice in the VM's metadata (one process on a single-host slice)."""
    if int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1:
        return True
    if ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
        return True
    return importlib.util.find_spec('libtpu') is not None and tpu_chips() > 0


def initialize(*, multihost=False, coordinator_address=None, num_processes=None, process_id=None):
    """Joins the processes of a multi-process job; does nothing on a plain single machine.

    Args:
      multihost: force jax.distributed's cluster auto-detection (TPU pods, SLURM, ...).
      coordinator_address: 'host:port' of process 0, for jobs started by hand (all three
        explicit arguments then go together).
      num_processes: number of processes in the job.
      process_id: this process's index.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise errors.UserError(
                '--coordinator_address, --num_processes and --process_id '
                f'go together; got {explicit}.'
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif multihost or launched_by_cluster():
        jax.distributed.initialize()


def host_cpus() -> int:
    """The CPUs this process may run on (under SLURM or taskset, those its task was given, not
    the machine's count); the size of its thread pools."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compilation_cache_dir(setting: str, workdir: str, platform: str):
    """The directory of jax's persistent compilation cache for config.compilation_cache_dir
    (`setting`), or None for no cache: 'auto' is <workdir>/compilation_cache on GPU and TPU and
    none on CPU (`platform`: jax.default_backend()), '' none, anything else that directory."""
    if setting == 'auto':
        return os.path.join(workdir, 'compilation_cache') if platform in ('gpu', 'tpu') else None
    return setting or None


def use_compilation_cache(config, workdir: str):
    """Compiled programs are stored in and loaded from the directory of compilation_cache_dir, so
    that a relaunch skips the compilation (process 0 writes; programs that compile in less than
    jax_persistent_cache_min_compile_time_secs are not stored). Call before anything compiles.
    With 'auto' on CPU, a cache set through JAX_COMPILATION_CACHE_DIR stays in use."""
    directory = compilation_cache_dir(config.compilation_cache_dir, workdir, jax.default_backend())
    if directory:
        jax.config.update('jax_compilation_cache_dir', directory)
    elif config.compilation_cache_dir == '':
        jax.config.update('jax_enable_compilation_cache', False)


def use_cpu_cores(batch_sizes) -> int:
    """Splits the CPU into one device per core (at most), as many as divide every batch size.

    XLA runs the many small operations of a U-Net step on one CPU device with poor use of
    several cores; one device per core runs the rows of a batch side by side, 1.6-2x faster on
    2 cores (docs/benchmarks.md). Affects only the CPU backend, so GPU and TPU runs are
    unchanged. Call before JAX starts its backends; a device count that XLA_FLAGS or
    jax_num_cpu_devices already set is left as it is. Returns the count in use (0 when left).
    """
    if (
        'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
        or jax.config.jax_num_cpu_devices >= 0
    ):
        return 0
    cores = host_cpus()
    sizes = [b for b in batch_sizes if isinstance(b, int) and b > 0]
    count = max(d for d in range(1, cores + 1) if all(b % d == 0 for b in sizes))
    jax.config.update('jax_num_cpu_devices', count)
    return count


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def check_divisible(batch_size: int, what: str, devices: int = 0):
    """A global batch splits evenly over `devices` (default: all devices of the job)."""
    devices = devices or jax.device_count()
    if batch_size % devices:
        raise errors.UserError(
            f'{what}={batch_size} must be a multiple of the number of '
            f'devices ({devices}), since each batch is split over them.'
        )


def local_rows(sharding: NamedSharding, global_shape) -> slice:
    """The contiguous rows of a batch-sharded global array that this process holds."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    spans = sorted(
        {(idx[0].start or 0, idx[0].stop or global_shape[0]) for idx in index_map.values()}
    )
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:
            raise ValueError(f'this process holds non-contiguous batch rows {spans}.')
    return slice(spans[0][0], spans[-1][1])


def to_global(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    """Assembles a global batch-sharded array from each process's rows."""
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main_process() -> bool:
    return jax.process_index() == 0
