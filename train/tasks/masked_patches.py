"""Masked-patch pre-training (task "masked_patches", SimMIM: Xie et al. 2022) on the
training split's images, labels unused.

Each image loses P = max(1, round(data.patch_mask_ratio * N)) of its N patches, drawn
uniformly: their embeddings become the learned mask vector (model/transformer.py
PatchEmbed), and the "pixels" head (one linear layer) reconstructs their normalised
pixels (MAE's target: each patch minus its mean over its std). The loss is the mean
squared error over the masked patches only; the visible ones cost nothing.

Batch: the image tasks' (train/tasks/classify_image.py, no labels) plus
  mlm_positions  int32   [B, P]          the masked patches' sequence indices (1..N, sorted)
  patch_targets  float32 [B, P, p*p*C]   their normalised pixels
Masks are drawn per batch by grain's random_map keyed by (seed, batch index): resumable
with the iterator, new each epoch; eval batches use a fixed seed (the same masks on every
evaluation, so eval losses compare across steps).
"""

from __future__ import annotations

import dataclasses

import grain
import jax.numpy as jnp
import numpy as np

from model import patches
from train.tasks import classify_image
from train.tasks.registry import check_heads, register

_MASK_SALT = 0x6D61736B
_EVAL_MASK_SEED = 0


def num_masked(data_cfg, num_patches: int) -> int:
    ratio = float(data_cfg.get("patch_mask_ratio", 0.5))
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config.data.patch_mask_ratio={ratio} must be in (0, 1)")
    return min(max(1, round(ratio * num_patches)), num_patches - 1) if num_patches > 1 else 1


def mask_batch(batch: dict, draws: np.ndarray, patch_size: int, num_mask: int) -> dict:
    """Adds `mlm_positions` and `patch_targets` to an image batch. `draws` float [B, N]
    uniforms: each row masks its `num_mask` patches with the smallest draws."""
    chosen = np.sort(np.argsort(draws, axis=1, kind="stable")[:, :num_mask], axis=1)
    targets = patches.normalised_patches(batch["pixels"].astype(np.float64), patch_size)
    return {**batch, "mlm_positions": (chosen + 1).astype(np.int32),  # [CLS] is 0.
            "patch_targets": np.take_along_axis(targets, chosen[..., None], axis=1).astype(
                np.float32)}


class MaskPatches(grain.transforms.RandomMap):
    def __init__(self, patch_size: int, num_patches: int, num_mask: int):
        self._p, self._n, self._m = patch_size, num_patches, num_mask

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
        draws = rng.random((batch["pixels"].shape[0], self._n))
        return mask_batch(batch, draws, self._p, self._m)


def mask_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), _MASK_SALT]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class MaskedPatches:
    """Mean squared error of the reconstructed normalised pixels, per masked patch.

    loss_sum: sum over rows and masked patches of the patch's mean squared error (over
    its p*p*C values), times the row's example_weight; weight: the weighted count of
    masked patches. "accuracy": the fraction of masked patches reconstructed better than
    predicting their mean (the normalised target's zero), i.e. with error below the
    target's mean square; a constant patch (target all zero) can never count.
    """

    heads: tuple = ("pixels",)

    def loss(self, outputs, batch):
        predicted = outputs["pixels"].astype(jnp.float32)
        targets = batch["patch_targets"].astype(jnp.float32)
        per_patch = jnp.mean(jnp.square(predicted - targets), axis=-1)  # [B, P]
        weights = jnp.broadcast_to(batch["example_weight"].astype(jnp.float32)[:, None],
                                   per_patch.shape)
        beats_mean = per_patch < jnp.mean(jnp.square(targets), axis=-1)
        total = jnp.sum(weights)
        sums = {"correct": jnp.sum(beats_mean * weights), "examples": total}
        return jnp.sum(per_patch * weights), total, sums

    def finalize(self, sums):
        return {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
                "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}


class MaskedPatchPretraining(classify_image.ImageTask):
    name = "masked_patches"

    def check(self, config):
        check_heads(config, ("pixels",), "masked patches are reconstructed by the pixels head")
        classify_image.check_image_config(config, self.name)
        self._masking(config.model, config.data)
        if config.data.get("image_patch_size") != config.model.patch_size:
            raise ValueError(
                f"config.data.image_patch_size={config.data.get('image_patch_size')!r} must "
                f"equal config.model.patch_size={config.model.patch_size} (the pipeline cuts "
                f"the targets; configs/vision.py ties the two)")

    def check_source(self, config, source, split):
        classify_image.check_image_shape(config, source, split)

    def _masking(self, model_cfg, data_cfg):
        rows, columns = patches.check_patch_size(model_cfg.image_shape, model_cfg.patch_size)
        return model_cfg.patch_size, rows * columns, num_masked(data_cfg, rows * columns)

    def train_iterator(self, source, tok, data_cfg, seed):
        mask = MaskPatches(*self._geometry(data_cfg))
        return classify_image.make_train_iterator(
            source, data_cfg, seed=seed, with_labels=False,
            transform=lambda ds: ds.random_map(mask, seed=mask_seed(seed)))

    def eval_iterator(self, source, tok, data_cfg):
        mask = MaskPatches(*self._geometry(data_cfg))
        return classify_image.make_eval_iterator(
            source, data_cfg, with_labels=False,
            transform=lambda ds: ds.random_map(mask, seed=mask_seed(_EVAL_MASK_SEED)))

    def _geometry(self, data_cfg):
        """(patch size, patches, masked) from the data: the pipelines see data_cfg only.
        The image shape is the source's; seq_len - 1 patches (checked at start-up)."""
        p = int(data_cfg.image_patch_size)
        n = data_cfg.seq_len - 1
        return p, n, num_masked(data_cfg, n)

    def objective(self, config, train_source=None):
        return MaskedPatches()

    def batch_fields(self, config, rows):
        p, n, m = self._masking(config.model, config.data)
        size = p * p * config.model.image_shape[2]
        return self.image_fields(config, rows) | {
            "mlm_positions": ((rows, m), "int32"), "patch_targets": ((rows, m, size), "float32")}

    def lm_positions_fraction(self, config):
        return 0.0


register(MaskedPatchPretraining())

