r"""Explain predictions: why a classifier chose its class, where a RAG answer looked.

  python -m launch.explain --workdir runs/scratch --output runs/explain_scratch \
      --text "a domesticated carnivorous mammal" --text "move fast by using the legs"
  python -m launch.explain --workdir runs/scratch --output runs/explain_test --index 0,5
  python -m launch.explain --workdir runs/rag_lora --output runs/explain_rag \
      --question "What is a poodle a kind of?"

A classifier run (config.model.heads has "classify"; texts given with --text or taken
from --split by --index): integrated gradients over the token embeddings of the
predicted (or --target) class's logit, checked for completeness (the attributions sum to
logit(x) - logit(baseline) within --tolerance, relative), and attention rollout from the
pooled position. Image classifiers (config.model.patch_size > 0) explain --index
images of --split: integrated gradients over the pixels, rollout over the patches.
A RAG run (configs/rag.py): the answer to each --question, and the attention mass its
pieces put on each retrieved passage and on each of their tokens.

Writes into --output (refused if it exists and is not empty, or lies inside the run):
explanations.json, and per example explanation_<i>.html and .png (highlighted tokens;
for images a heat map). The directory is written whole or not at all.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

from absl import logging as absl_logging


def run_kind(workdir):
    """-> ("rag" | "classifier", config dict); a clear error for anything else."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir {workdir!r} is not a strata run directory: "
                                f"no config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("task") == "rag":
        return "rag", config
    if "classify" in config.get("model", {}).get("heads", ()):
        return "classifier", config
    raise ValueError(f"--workdir {workdir!r} is neither a classifier (config.model.heads="
                     f"{config.get('model', {}).get('heads')} has no 'classify') nor a RAG "
                     f"run (config.task={config.get('task')!r}, expected 'rag')")


def check_request(kind, config, texts, indices, questions):
    if kind == "rag":
        if texts or indices:
            raise ValueError("--workdir is a RAG run: ask it with --question, not "
                             "--text/--index")
        if not questions:
            raise ValueError("--workdir is a RAG run: give at least one --question")
        if any(not q.strip() for q in questions):
            raise ValueError("--question is empty: nothing to answer")
        return
    if questions:
        raise ValueError("--question needs a RAG run; --workdir is a classifier")
    if config["model"].get("patch_size", 0) and texts:
        raise ValueError("--workdir is an image classifier: explain --index images of "
                         "--split, not --text")
    if not texts and not indices:
        raise ValueError("Give --text (one or more) or --index (of --split) to explain")
    if any(not t.strip() for t in texts):
        raise ValueError("--text is empty: nothing to explain")


def explain_texts(workdir, texts, indices, out_dir, o):
    from train import explain, explain_render

    config, model, params, tok = explain.load_classifier(workdir, o.which)
    labels = [None] * len(texts)
    names = None
    if indices:
        split_texts, split_labels, names = explain.test_examples(config, o.split, indices)
        texts, labels = texts + split_texts, labels + split_labels
    if names is None:
        from train.data import sources
        names = sources.label_names(config.data)
    rows = explain.encode_texts(config, tok, texts)
    results = []
    for i, (text, label, row) in enumerate(zip(texts, labels, rows)):
        result = explain.explain_classification(
            model, params, tok, row, target=o.target, steps=o.ig_steps, method=o.ig_method,
            baseline=o.baseline, tolerance=o.tolerance, label_names=names)
        result["text"] = text
        if label is not None:
            result["label"], result["label_name"] = label, names[label] if names else label
        results.append(result)
        ig = result["integrated_gradients"]
        print(f"[{i}] predicted {result['predicted_name']} "
              f"(p={result['probabilities'][result['predicted']]:.3f}); IG sum "
              f"{ig['sum']:.4f} vs logit difference "
              f"{ig['target_logit'] - ig['baseline_logit']:.4f} (completeness error "
              f"{ig['completeness_rel_error']:.2%}): {text[:60]!r}")
        title = (f"{text[:70]} -> {result['predicted_name']} "
                 f"(p={result['probabilities'][result['predicted']]:.2f})"
                 + (f", label {result['label_name']}" if label is not None else ""))
        picture = [
            {"label": f"integrated gradients of class {result['target_name']} (red: for, "
                      f"blue: against; completeness error "
                      f"{ig['completeness_rel_error']:.2%})",
             "pieces": result["pieces"], "scores": ig["attributions"], "signed": True},
            {"label": f"attention rollout from {result['attention_rollout']['from']}",
             "pieces": result["pieces"], "scores": result["attention_rollout"]["weights"],
             "signed": False}]
        write_pictures(out_dir, i, title, picture, explain_render)
    return {"workdir": os.path.abspath(workdir), "kind": "classifier", "examples": results}


def explain_images(workdir, indices, out_dir, o):
    from train import explain_image, explain_render

    config, model, params = explain_image.load_image_classifier(workdir, o.which)
    images, labels, names = explain_image.split_images(config, o.split, indices)
    results = []
    for i, (image, label) in enumerate(zip(images, labels)):
        result = explain_image.explain_image(model, params, image, target=o.target,
                                             steps=o.ig_steps, method=o.ig_method,
                                             tolerance=o.tolerance, label_names=names)
        result["index"], result["label"] = indices[i], label
        results.append(result)
        ig = result["integrated_gradients"]
        print(f"[{i}] image {indices[i]}: label {label}, predicted "
              f"{result['predicted_name']}; completeness error "
              f"{ig['completeness_rel_error']:.2%}")
        explain_render.image_png(
            os.path.join(out_dir, f"explanation_{i}.png"),
            f"{o.split}[{indices[i]}]: label {label}, predicted "
            f"{result['predicted_name']}", image,
            [("integrated gradients", ig["pixel_map"], True),
             ("attention rollout", result["attention_rollout"]["map"], False)])
    return {"workdir": os.path.abspath(workdir), "kind": "image_classifier",
            "examples": results}


def explain_questions(workdir, questions, out_dir, o):
    from retrieval.explain import explain_rag_answer
    from retrieval.rag_run import load_rag
    from train import explain_render

    rag, config = load_rag(workdir)
    rag.generator.batch_size = 1  # One question at a time: no padded decoding rows.
    results = []
    for i, question in enumerate(questions):
        result = explain_rag_answer(rag, question, o.k or config.rag.k)
        results.append(result)
        print(f"[{i}] Q: {question}\n    A: {result['answer']}")
        picture = []
        for name, span in result["attention"]["spans"].items():
            if not name.startswith("passage"):
                continue
            start, end = span["tokens"]
            picture.append({
                "label": f"{name} [{span['id']}] retrieval score {span['score']:.3f}: "
                         f"{span['share_of_passages']:.1%} of the answer's attention on "
                         f"passages",
                "pieces": result["pieces"][start:end],
                "scores": result["attention"]["per_key_mass"][start:end], "signed": False})
            print(f"    {name} [{span['id']}]: attention mass {span['attention_mass']:.4f} "
                  f"({span['share_of_passages']:.1%} of passages), top tokens "
                  f"{[t['piece'] for t in span['top_tokens'][:5]]}")
        write_pictures(out_dir, i, f"Q: {question}  A: {result['answer']}", picture,
                       explain_render)
    return {"workdir": os.path.abspath(workdir), "kind": "rag", "examples": results}


def write_pictures(out_dir, i, title, rows, explain_render):
    with open(os.path.join(out_dir, f"explanation_{i}.html"), "w") as f:
        f.write(explain_render.tokens_html(title, rows))
    try:
        explain_render.tokens_png(os.path.join(out_dir, f"explanation_{i}.png"), title, rows)
    except ImportError:  # The HTML above shows the same.
        logging.getLogger("strata").warning("matplotlib is not installed: no PNG")


@dataclasses.dataclass
class Options:
    """What the flags set, for callers without flags (tests)."""
    split: str = "test"
    k: int = 0
    target: int | None = None
    ig_steps: int = 64
    ig_method: str = "trapezoid"
    baseline: str = "pad"
    tolerance: float = 0.05
    which: str = "best"


def explain_run(workdir, output, *, texts=(), indices=(), questions=(), options=None):
    """Checks the request and --output first (before any loading), then writes the
    explanations into `output` (whole or not at all) -> the report written."""
    from train import safe_output

    o = options or Options()
    texts, indices, questions = list(texts), [int(i) for i in indices], list(questions)
    kind, config = run_kind(workdir)
    check_request(kind, config, texts, indices, questions)
    safe_output.check_output_apart(output, [("--workdir", workdir)])
    safe_output.check_output_dir(output)
    with safe_output.staged_dir(output) as out_dir:
        if kind == "rag":
            report = explain_questions(workdir, questions, out_dir, o)
        elif config["model"].get("patch_size", 0):
            report = explain_images(workdir, indices, out_dir, o)
        else:
            report = explain_texts(workdir, texts, indices, out_dir, o)
        report["options"] = dataclasses.asdict(o)
        with open(os.path.join(out_dir, "explanations.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="A classifier or RAG run directory")
    parser.add_argument("--output", required=True,
                        help="Directory to write (must not exist or be empty)")
    parser.add_argument("--text", action="append", default=[],
                        help="A text to classify and explain (repeat)")
    parser.add_argument("--index", default="", help="Indices of --split examples, e.g. 0,5")
    parser.add_argument("--split", default="test", help="The split --index reads")
    parser.add_argument("--question", action="append", default=[],
                        help="RAG run: a question (repeat)")
    parser.add_argument("--k", type=int, default=0,
                        help="RAG run: passages to retrieve; 0: config.rag.k")
    parser.add_argument("--target", type=int, default=None,
                        help="Class to explain (default: the predicted)")
    parser.add_argument("--ig_steps", type=int, default=64,
                        help="Integrated gradients: path intervals")
    parser.add_argument("--ig_method", default="trapezoid",
                        choices=("left", "right", "midpoint", "trapezoid"))
    parser.add_argument("--baseline", default="pad", choices=("pad", "zeros"),
                        help="Text baseline: pieces -> [PAD] (specials kept), or zero "
                             "embeddings")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="Largest relative completeness gap")
    parser.add_argument("--which", default="best", choices=("best", "latest"),
                        help="Checkpoint to explain")
    args = parser.parse_args(argv)
    try:
        indices = [int(i) for i in args.index.split(",") if i.strip()]
    except ValueError:
        sys.exit(f"FATAL: --index={args.index}: expected integers")
    logging.getLogger("strata").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-restore INFO lines.
    options = Options(split=args.split, k=args.k, target=args.target,
                      ig_steps=args.ig_steps, ig_method=args.ig_method,
                      baseline=args.baseline, tolerance=args.tolerance, which=args.which)
    try:
        explain_run(args.workdir, args.output, texts=args.text, indices=indices,
                    questions=args.question, options=options)
    except (OSError, ValueError) as error:
        sys.exit(f"FATAL: {error}")
    print(f"-> {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
