"""Runs before any test imports JAX: eight fake CPU devices so sharded meshes are real,
unoptimised (fast) CPU compiles, and one persistent compilation cache for this test
session: many tests compile the same tiny steps, in xdist workers and in the training
processes tests start.

The cache is safe to share between processes only with eviction on: JAX then takes a file
lock around every read and write (jax/_src/lru_cache.py); without it (max size -1) a
reader can load another process's half-written entry, and XLA aborts the reader. Tests
that SIGKILL a process give it no cache (tests/train/test_loop.py): a kill mid-write
would leave a truncated entry behind.
"""

import os
import shutil
import tempfile

# LLVM at -O0: XLA's CPU compiles (most of a unit test's time: many small programs, each
# run a few times) take less CPU; the suite measured 18% less CPU time in all, though
# the few execution-bound end-to-end tests run slower. Results may differ from an -O2
# build in the last bits: the suite compares runs under these same flags, or against
# independent references within tolerances.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # Set once, by xdist's controller.
    _CREATED_CACHE = tempfile.mkdtemp(prefix="strata-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # Eviction -> locks.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    """The process that made the cache (the controller, after its workers) removes it."""
    if _CREATED_CACHE:
        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
