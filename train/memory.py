"""Peak memory of a run, from what each backend can tell.

- `compiled_step_bytes`: XLA's own figure for the compiled train step on one device
  (arguments + outputs - donated aliases + temporaries); exact and backend-independent,
  the number to compare fine-tuning methods by.
- `device_peak_bytes`: the allocator's high-water mark where the backend has one
  (GPU/TPU; the CPU client reports none).
- `host_peak_rss_bytes`: this process's peak resident memory (on CPU, device memory
  is host memory, so this is the real total).
"""

import resource
import sys

import jax


def compiled_step_bytes(compiled):
    """Peak bytes of a `jax.stages.Compiled` on one device (None if XLA won't say)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    peak = getattr(analysis, "peak_memory_in_bytes", 0)
    if peak:
        return int(peak)
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_peak_bytes():
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def host_peak_rss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB.


def peak_memory(compiled_train_step):
    return {"compiled_step_bytes": compiled_step_bytes(compiled_train_step),
            "device_peak_bytes": device_peak_bytes(),
            "host_peak_rss_bytes": host_peak_rss_bytes()}
