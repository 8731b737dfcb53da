r"""Digits: the ViT from scratch vs SimMIM-pre-trained (full fine-tuning, same lr, steps
and batch) at fractions of the training labels, and augmentation's effect from scratch;
each cell over seeds, with mean ± sd, a 95% t-interval and paired t-tests
(train/experiments/statistics.py). Resumable: a finished run (results.json) is read, not
rerun; `W/summary.json` and `W/summary.md` at the end.

  python -m launch.vision_stages --workdir runs/vision                        # 100 steps of 32
  python -m launch.vision_stages --workdir runs/vision --steps 600 --batch 64 \
      --fractions 1.0 --augment_fractions ""                              # the longer budget
"""

import argparse
import json
import os

AUGMENT = dict(image_rotation=10.0, image_shift=1, image_noise=0.05)


def _floats(text):
    return tuple(float(x) for x in text.split(",") if x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--augment_fractions", default="0.01,0.1",
                        help="Fractions also run from scratch with augmentation")
    args = parser.parse_args(argv)

    from configs import vision
    from train.experiments import statistics
    from train.loop import train_and_evaluate

    seeds = tuple(int(s) for s in args.seeds.split(","))
    fractions, augmented = _floats(args.fractions), _floats(args.augment_fractions)
    budget = f"{args.steps}x{args.batch}"

    def run(name, config):
        workdir = os.path.join(args.workdir, name)
        done = os.path.join(workdir, "results.json")
        if not os.path.exists(done):
            train_and_evaluate(config, workdir)
        with open(done) as f:
            return json.load(f)

    pretrained = run("pretrain", vision.get_config("stage=pretrain"))
    print("pretrain", pretrained["validation"], pretrained["test"], flush=True)
    table = {}
    cells = [(f, k) for k in ("scratch", "pretrained") for f in fractions] + [
        (f, "scratch+aug") for f in augmented]
    for fraction, kind in cells:
        for seed in seeds:
            if kind == "pretrained":  # lr_scale 5: full's 2e-4 -> scratch's 1e-3.
                c = vision.get_config(f"stage=finetune,method=full,lr_scale=5,"
                                      f"steps={args.steps}")
                c.init_from = os.path.join(args.workdir, "pretrain")
            else:
                c = vision.get_config(f"stage=scratch,steps={args.steps}")
            if kind == "scratch+aug":
                c.data.update(AUGMENT)
            c.seed = seed
            c.data.batch_size = args.batch
            c.train.eval_every = args.steps  # Only the final evaluation.
            c.data.label_fraction = fraction
            r = run(f"{budget}/{kind}_{fraction}_{seed}", c)
            table.setdefault(f"{kind} {fraction}", []).append(r["test"]["accuracy"])
            print(kind, fraction, seed, r["test"]["accuracy"], r["data"]["train_examples"],
                  flush=True)

    lines = []
    for key, values in table.items():
        s = statistics.mean_sd_interval(values)
        lines.append(f"{key}: {statistics.format_summary(s, scale=100, digits=1, unit='%')} "
                     f"{values}")
    for fraction in fractions:
        for a, b in (("scratch", "pretrained"), ("scratch", "scratch+aug")):
            if f"{b} {fraction}" in table:
                t = statistics.paired_test(table[f"{a} {fraction}"],
                                           table[f"{b} {fraction}"])
                lines.append(f"{b} - {a} @ {fraction}: {100 * t.mean_difference:+.1f} "
                             f"points [{100 * (t.low or 0):+.1f}, {100 * (t.high or 0):+.1f}]"
                             f" {statistics.format_test(t)}")
    print("\n".join(lines))
    out = os.path.join(args.workdir, budget)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"pretrain": pretrained, "test_accuracy": table, "lines": lines}, f,
                  indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
