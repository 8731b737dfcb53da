"""Runs before any test imports JAX: eight fake CPU devices so sharded meshes are real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
