"""Runs before any test imports JAX: eight fake CPU devices so sharded meshes are real.

The tests' models are tiny, so compiling dominates their time: XLA's CPU backend at -O0
(no expensive LLVM passes) halves the suite's CPU time. Numerics stay f32 IEEE; only
fusion and code quality change.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
