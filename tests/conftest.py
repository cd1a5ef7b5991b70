"""Test set-up shared by every test module; runs before jax is imported."""

import atexit
import os
import shutil
import tempfile

# 8 simulated CPU devices, so that sharded code runs on a laptop as on an 8-device host.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# A persistent compilation cache for this session: programs compiled again (by a new jit object,
# another call of train_and_evaluate, or a subprocess) load instead of recompiling.
_CACHE_DIR = tempfile.mkdtemp(prefix='ihdm-jax-cache-')
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
