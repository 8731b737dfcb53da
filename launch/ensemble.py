"""Evaluate an ensemble of fine-tuned runs by averaging their logits.

  python -m launch.ensemble --workdirs runs/ft_a,runs/ft_b,runs/ft_c --split test

Prints each member's and the ensemble's accuracy and macro-F1, and writes them to
`--output` (default: ensemble.json in the first run directory).
"""

import json
import os

from absl import app, flags

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories of the members.")
_SPLIT = flags.DEFINE_string("split", "test", "Evaluation split.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of each run.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON report path.")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
    del argv
    from train.ensemble import evaluate_ensemble

    report = evaluate_ensemble(_WORKDIRS.value, _SPLIT.value, _WHICH.value)
    report.pop("mean_logits")
    output = _OUTPUT.value or os.path.join(_WORKDIRS.value[0], "ensemble.json")
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    for member in report["members"]:
        print(f"{member['workdir']}: accuracy {member['accuracy']:.4f}, "
              f"macro-F1 {member['macro_f1']:.4f}")
    e = report["ensemble"]
    print(f"ensemble of {len(report['members'])}: accuracy {e['accuracy']:.4f}, "
          f"macro-F1 {e['macro_f1']:.4f} ({e['examples']} {_SPLIT.value} examples) -> {output}")


if __name__ == "__main__":
    app.run(main)
