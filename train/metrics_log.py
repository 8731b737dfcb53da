"""Metric sinks: `metrics.jsonl`, TensorBoard events and a progress bar (process 0)."""

import json
import math
import os
import time

import jax


class MetricsLog:
    def __init__(self, workdir, total_steps, start_step=0, progress=True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def write(self, step, metrics):
        """One JSON object per logging step; floats, with non-finite values as strings."""
        if not self.active:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: _number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, float):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def progress(self, step, postfix):
        if self.bar is not None:
            self.bar.n = int(step)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def close(self):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tensorboard.close()


def _number(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)
