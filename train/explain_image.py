"""Explanations of an image classifier's prediction (ViT patch input,
config.model.patch_size > 0): integrated gradients over the pixels, attention rollout
from [CLS] over the patches, both as [H, W] maps for a heat map.
"""

import jax.numpy as jnp
import numpy as np

from model import attribution, patches
from train.data import sources
from train.ensemble import load_run
from train.explain import sown_attention, split_examples


def load_image_classifier(workdir, which="best"):
    """-> (config, model, params) of an image classification run."""
    config, model, params = load_run(workdir, which)
    if not config.model.get("patch_size", 0) or "classify" not in config.model.heads:
        raise ValueError(f"{workdir!r} is not an image classifier: config.model.patch_size="
                         f"{config.model.get('patch_size', 0)}, heads="
                         f"{tuple(config.model.heads)}")
    return config, model, params


def split_images(config, split, indices):
    """-> (images [n] float32 [H, W, C], labels [n], class names or None)."""
    examples, _ = split_examples(config, split, indices)
    return ([np.asarray(e["image"], np.float32) for e in examples],
            [int(e["label"]) for e in examples], sources.label_names(config.data))


def explain_image(model, params, image, *, target=None, steps=64, method="trapezoid",
                  tolerance=0.05, label_names=None):
    """One image [H, W, C] -> a JSON-ready explanation: integrated gradients of the target
    logit (default: the predicted class) from a black (all-zero) image, summed over
    channels to a [H, W] map; rollout from [CLS] to each patch, spread over its pixels."""
    cfg = model.cfg
    image = np.asarray(image, np.float32)
    outputs, attentions = sown_attention(model, params, image, ("classify",))
    logits = np.asarray(outputs["classify"][0], np.float64)
    predicted = int(logits.argmax())
    target = predicted if target is None else int(target)
    if not 0 <= target < logits.size:
        raise ValueError(f"--target={target}: the model has {logits.size} classes")

    def fn(x):
        return model.apply({"params": params}, x[None], deterministic=True,
                           heads=("classify",))["classify"][0, target].astype(jnp.float32)

    ig = attribution.integrated_gradients(fn, image, np.zeros_like(image), steps=steps,
                                          method=method)
    attribution.check_completeness(ig, tolerance, f"class {target}")
    rows, columns = patches.check_patch_size(cfg.image_shape, cfg.patch_size)
    rollout = attribution.attention_rollout(attentions)[0, 1:].reshape(rows, columns)
    rollout_map = np.kron(rollout, np.ones((cfg.patch_size, cfg.patch_size)))

    def name(c):
        return label_names[c] if label_names is not None else str(c)

    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    return {
        "logits": [float(x) for x in logits],
        "probabilities": [float(x) for x in probabilities],
        "predicted": predicted, "predicted_name": name(predicted),
        "target": target, "target_name": name(target),
        "integrated_gradients": {
            "pixel_map": ig.attributions.sum(-1).tolist(), "baseline": "zeros (black)",
            "steps": steps, "method": method, "target_logit": ig.value,
            "baseline_logit": ig.baseline_value,
            "sum": float(ig.attributions.astype(np.float64).sum()),
            "completeness_abs_error": ig.completeness_abs_error,
            "completeness_rel_error": ig.completeness_rel_error, "tolerance": tolerance},
        "attention_rollout": {"from": "[CLS]", "patches": rollout.tolist(),
                              "map": rollout_map.tolist()},
    }
