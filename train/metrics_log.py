"""Metric sinks: `metrics.jsonl`, TensorBoard events and a progress bar (process 0).

`metrics.jsonl` holds one JSON object per logged step, in step order, each step once:
a resumed run first drops the rows the killed run logged after the checkpoint it resumes
from (it logs those steps again) and a line torn by the kill. `read_metrics` is the one
reader: it tolerates a torn last line (a run killed mid-write, or still writing).
"""

import json
import logging
import math
import os
import time

import jax

from train.run_files import atomic_write_text

log = logging.getLogger("strata")


class MetricsLog:
    def __init__(self, workdir, total_steps, start_step=0, progress=True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _keep_steps_up_to(path, start_step)
        self.jsonl = open(path, "a")
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


def read_metrics(path):
    """The rows of a `metrics.jsonl` ([] when there is none), in file order.

    A torn last line (a run killed mid-write, or one still writing) is skipped with a
    warning; any other line that is not a JSON object raises ValueError naming the file
    and line.
    """
    if not os.path.exists(path):
        return []
    rows = []
    lines = _lines(path)
    for lineno, line in lines:
        try:
            rows.append(_parse(line))
        except ValueError as e:
            if lineno == lines[-1][0]:
                log.warning("%s:%d: skipped a torn last line (%s)", path, lineno, e)
                break
            raise ValueError(f"{path}:{lineno}: {e}; only the last line of a metrics log "
                             f"may be torn (by a killed run)") from None
    return rows


def _lines(path):
    """[(line number, text)] of the non-blank lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def _parse(line):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a JSON object with an integer 'step'")
    return row


def _keep_steps_up_to(path, last_step):
    """Rewrites `path` (atomically) without the rows after `last_step` and without lines
    that do not parse, so that the steps a resumed run logs again appear once."""
    if not os.path.exists(path):
        return
    lines = _lines(path)
    torn_end = bool(lines) and not lines[-1][1].endswith("\n")
    kept, dropped, bad = [], 0, []
    for lineno, line in lines:
        try:
            row = _parse(line)
        except ValueError as e:
            bad.append(f"line {lineno}: {e}")
            continue
        if row["step"] <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if not dropped and not bad and not torn_end:
        return
    if dropped:
        log.info("%s: dropped %d rows logged after step %d (the run resumes from it)",
                 path, dropped, last_step)
    if bad:
        log.warning("%s: dropped lines that do not parse (a killed write): %s",
                    path, "; ".join(bad))
    atomic_write_text(path, "".join(kept))
