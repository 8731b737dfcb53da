"""A PNG of the run's learning curves, written beside `metrics.jsonl` at the end of a run."""

import os

from train.metrics_log import read_metrics


def write_learning_curves(workdir, filename="learning_curves.png"):
    """Train/eval loss and accuracy against step; returns the PNG's path (or None)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = read_metrics(path)  # A torn last line (a killed run) is skipped.
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on servers and CI.
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[f"{prefix}/{metric}"]) for r in records
                      if isinstance(r.get(f"{prefix}/{metric}"), float)]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=prefix, markersize=4)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(os.path.basename(os.path.abspath(workdir)))
    figure.tight_layout()
    out = os.path.join(workdir, filename)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
