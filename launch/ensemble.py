"""Evaluate an ensemble of fine-tuned runs by averaging their logits.

  python -m launch.ensemble --workdirs runs/ft_a,runs/ft_b,runs/ft_c --split test

Prints each member's and the ensemble's accuracy and macro-F1, and writes them to
`--output` (default: ensemble.json beside the first run directory, i.e. in its parent).
The report is written whole (a temporary sibling renamed over it); an --output that is,
holds, or lies inside one of the runs is refused before anything is evaluated.
"""

import os
import sys

from absl import app, flags

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories of the members.")
_SPLIT = flags.DEFINE_string("split", "test", "Evaluation split.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of each run.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON report path (default: ensemble.json in "
                              "the first run's parent directory).")
flags.mark_flags_as_required(["workdirs"])


def report_path(output, workdirs):
    """-> where the report goes; refuses a path that would replace or enter a member run."""
    from train import safe_output

    if not workdirs:
        raise ValueError("--workdirs is empty: an ensemble needs at least one run directory")
    output = output or os.path.join(os.path.dirname(os.path.abspath(workdirs[0])),
                                    "ensemble.json")
    safe_output.check_output_apart(output, [("--workdirs", w) for w in workdirs])
    safe_output.check_output_file(output)
    return output


def main(argv):
    del argv
    try:  # Before the (slow) imports and evaluation: a wrong --output fails at once.
        output = report_path(_OUTPUT.value, _WORKDIRS.value)
    except (OSError, ValueError) as error:
        sys.exit(f"FATAL: {error}")
    from train.ensemble import evaluate_ensemble
    from train.run_files import atomic_write_json

    report = evaluate_ensemble(_WORKDIRS.value, _SPLIT.value, _WHICH.value)
    report.pop("mean_logits")
    atomic_write_json(output, report)
    for member in report["members"]:
        print(f"{member['workdir']}: accuracy {member['accuracy']:.4f}, "
              f"macro-F1 {member['macro_f1']:.4f}")
    e = report["ensemble"]
    print(f"ensemble of {len(report['members'])}: accuracy {e['accuracy']:.4f}, "
          f"macro-F1 {e['macro_f1']:.4f} ({e['examples']} {_SPLIT.value} examples) -> {output}")


if __name__ == "__main__":
    app.run(main)
