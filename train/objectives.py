"""Objectives: pure functions from model outputs and a batch to summed loss and metrics.

Each returns sums (not means) so that gradient accumulation and multi-batch evaluation
divide once by the total weight, exactly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.embedding import mean_pool


@dataclasses.dataclass(frozen=True)
class Classification:
    """Sequence classification with optional class weights and label smoothing.

    Class-weighted loss follows torch's CrossEntropyLoss(weight=...): each example counts
    with its class's weight, and the mean divides by the summed weights.
    """

    num_classes: int
    class_weights: tuple | None = None
    label_smoothing: float = 0.0
    heads: tuple = ("classify",)

    def loss(self, outputs, batch):
        """-> (loss_sum, weight_sum, metric_sums) over a batch of [batch] examples."""
        logits = outputs["classify"].astype(jnp.float32)
        labels = batch["labels"]
        targets = jax.nn.one_hot(labels, self.num_classes)
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        weight = batch["example_weight"].astype(jnp.float32)
        if self.class_weights is not None:
            weight = weight * jnp.asarray(self.class_weights, jnp.float32)[labels]
        predictions = jnp.argmax(logits, -1)
        real = batch["example_weight"].astype(jnp.float32)
        sums = {
            "correct": jnp.sum((predictions == labels) * real),
            "examples": jnp.sum(real),
            # Rows: true class, columns: predicted; for macro-F1 at the end of eval.
            "confusion": jnp.einsum(
                "b,bi,bj->ij", real, jax.nn.one_hot(labels, self.num_classes),
                jax.nn.one_hot(predictions, self.num_classes)),
        }
        return jnp.sum(per_example * weight), jnp.sum(weight), sums

    def finalize(self, sums):
        """Host-side: summed metrics -> reported numbers."""
        out = {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
               "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}
        if "confusion" in sums:
            out["macro_f1"] = macro_f1(np.asarray(sums["confusion"]))
        return out


@dataclasses.dataclass(frozen=True)
class MultiTaskClassification:
    """Classification over several tasks at once (model/multitask.py routes each row by
    `task_ids` [batch] to its task's adapters and head, whose logits beyond the task's
    classes are already masked out). The loss is the plain mean over rows of every task;
    metrics are kept per task: "accuracy/<task>" (and "loss/<task>") in finalize, with
    "accuracy" the mean over tasks present in the batch (macro over tasks).
    """

    task_names: tuple
    heads: tuple = ("classify",)

    def loss(self, outputs, batch):
        logits = outputs["classify"].astype(jnp.float32)
        labels, real = batch["labels"], batch["example_weight"].astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        # [batch, tasks]: each real row's weight in its task's column.
        by_task = jax.nn.one_hot(batch["task_ids"], len(self.task_names)) * real[:, None]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        sums = {"task_correct": correct @ by_task, "task_examples": by_task.sum(0),
                "task_loss_sum": per_example @ by_task,
                "correct": jnp.sum(correct * real), "examples": jnp.sum(real)}
        return jnp.sum(per_example * real), jnp.sum(real), sums

    def finalize(self, sums):
        out = {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
               "row_accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}
        accuracies = []
        for t, name in enumerate(self.task_names):
            examples = float(sums["task_examples"][t])
            if examples > 0:
                out[f"accuracy/{name}"] = float(sums["task_correct"][t]) / examples
                out[f"loss/{name}"] = float(sums["task_loss_sum"][t]) / examples
                accuracies.append(out[f"accuracy/{name}"])
        out["accuracy"] = float(np.mean(accuracies)) if accuracies else 0.0
        return out


@dataclasses.dataclass(frozen=True)
class MaskedLM:
    """BERT's masked-LM loss, computed only at the chosen positions.

    The batch carries `mlm_positions` [batch, P] (indices into the sequence),
    `mlm_targets` [batch, P] (original tokens) and `mlm_weights` [batch, P] (1 for a
    chosen position, 0 for padding of the fixed-size P).
    """

    heads: tuple = ("mlm",)

    def loss(self, outputs, batch):
        logits = outputs["mlm"].astype(jnp.float32)
        targets, weights = batch["mlm_targets"], batch["mlm_weights"].astype(jnp.float32)
        per_position = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets) * weights
        total = jnp.sum(weights)
        sums = {"correct": jnp.sum(correct), "examples": total}
        return jnp.sum(per_position * weights), total, sums

    def finalize(self, sums):
        return {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
                "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}


@dataclasses.dataclass(frozen=True)
class PrefixLM:
    """Prefix-LM loss (T5 / UniLM): next-token cross-entropy only where `target_weights`
    is 1 (the answer after a bidirectional prompt; train/tasks/prefix_lm_examples.py).

    The batch carries `targets` [batch, seq] (the next token) and `target_weights`
    [batch, seq]; the model reads `prefix_mask` [batch, seq] from it.
    """

    heads: tuple = ("lm",)

    def loss(self, outputs, batch):
        logits = outputs["lm"].astype(jnp.float32)
        targets = batch["targets"]
        weights = batch["target_weights"].astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (jnp.argmax(logits, -1) == targets) * weights
        # An answer is right when every one of its tokens (and its [SEP]) is.
        wrong_tokens = jnp.sum(weights - correct, axis=-1)
        has_answer = (jnp.sum(weights, axis=-1) > 0).astype(jnp.float32)
        sums = {"correct": jnp.sum(correct), "examples": jnp.sum(weights),
                "answers_exact": jnp.sum((wrong_tokens == 0) * has_answer),
                "answers": jnp.sum(has_answer)}
        return jnp.sum(per_token * weights), jnp.sum(weights), sums

    def finalize(self, sums):
        """accuracy: per answer token (teacher-forced); exact_match: whole answers."""
        return {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
                "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9)),
                "exact_match": float(sums["answers_exact"] / max(sums["answers"], 1e-9))}


@dataclasses.dataclass(frozen=True)
class MaskedAndPrefixLM:
    """UniLM's pre-training mix (task "mlm" with data.prefix_lm_fraction > 0;
    train/tasks/unilm.py): masked-LM rows and prefix-LM rows in one batch, which carries
    both kinds of fields (a row's other kind weighted 0).

    loss_sum = the MLM sum + the LM sum and weight = both weights, so the mean is per
    predicted token of either kind. The parts are reported as mlm_* and lm_* (a part with
    no predicted token, e.g. lm_* on the pure-MLM eval batches, is left out of finalize).
    """

    heads: tuple = ("mlm", "lm")

    def loss(self, outputs, batch):
        mlm_loss, mlm_weight, mlm = MaskedLM().loss(outputs, batch)
        lm_loss, lm_weight, lm = PrefixLM().loss(outputs, batch)
        sums = {"correct": mlm["correct"] + lm["correct"], "examples": mlm_weight + lm_weight,
                "mlm_loss_sum": mlm_loss, "mlm_correct": mlm["correct"],
                "mlm_examples": mlm_weight, "lm_loss_sum": lm_loss,
                "lm_correct": lm["correct"], "lm_examples": lm_weight}
        return mlm_loss + lm_loss, mlm_weight + lm_weight, sums

    def step_metrics(self, sums):
        """In the compiled train step: each part's per-token loss and accuracy (0 for a
        part the batch has no token of)."""
        out = {}
        for part in ("mlm", "lm"):
            examples = jnp.maximum(sums[f"{part}_examples"], 1e-9)
            out[f"{part}_loss"] = sums[f"{part}_loss_sum"] / examples
            out[f"{part}_accuracy"] = sums[f"{part}_correct"] / examples
        return out

    def finalize(self, sums):
        out = {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
               "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}
        for part in ("mlm", "lm"):
            examples = float(sums[f"{part}_examples"])
            if examples > 0:
                out[f"{part}_loss"] = float(sums[f"{part}_loss_sum"]) / examples
                out[f"{part}_accuracy"] = float(sums[f"{part}_correct"]) / examples
        return out


def in_batch_contrastive(queries, passages, passage_keys, weights, temperature,
                         symmetric=False):
    """DPR's loss with in-batch negatives: query i's positive is passage i, every other
    passage of the batch a negative. queries, passages [batch, embed] (unit vectors);
    passage_keys int [batch] (one per distinct passage); weights [batch] (0: a filler row).

    logits = queries @ passages.T / temperature; a passage is not a negative for query i
    when it is the same passage as i's (two questions about one synset) or a filler row.
    Per query: logsumexp(row) - logits[i, i]; `symmetric` averages it with the same
    over each passage's column (passage -> query). -> (loss_sum, weight_sum, sums).
    """
    logits = jnp.dot(queries, passages.T, precision=jax.lax.Precision.HIGHEST) / temperature
    weights = weights.astype(jnp.float32)
    diagonal = jnp.eye(logits.shape[0], dtype=bool)
    same = passage_keys[:, None] == passage_keys[None, :]
    excluded = (same | (weights[None, :] == 0) | (weights[:, None] == 0)) & ~diagonal
    logits = jnp.where(excluded, -1e9, logits)  # Finite: a filler row stays NaN-free.
    positive = jnp.diagonal(logits)
    per_query = jax.nn.logsumexp(logits, axis=1) - positive
    if symmetric:
        per_query = 0.5 * (per_query + jax.nn.logsumexp(logits, axis=0) - positive)
    correct = jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])
    sums = {"correct": jnp.sum(correct * weights), "examples": jnp.sum(weights)}
    return jnp.sum(per_query * weights), jnp.sum(weights), sums


@dataclasses.dataclass(frozen=True)
class Contrastive:
    """Retriever training (task "retriever"): (query, passage) pairs embedded by the shared
    encoder (mean-pooled, L2-normalised: train/embedding.py's recipe, so the trained
    encoder embeds a corpus as it was trained), scored by `in_batch_contrastive`.

    The step runs queries and passages as one batch (train/steps.py `model_rows`):
    outputs["hidden"] is [2 * batch, seq, embed], queries first. The batch carries
    `segment_ids` / `passage_segment_ids` [batch, seq] and `passage_key` [batch]
    (train/tasks/pairs.py). accuracy: in-batch top-1 (query -> its passage). With
    optim.grad_accum_steps > 1 the negatives are the micro-batch's, not the batch's.
    """

    temperature: float = 0.05
    symmetric: bool = False
    heads: tuple = ()

    def loss(self, outputs, batch):
        mask = jnp.concatenate([batch["segment_ids"], batch["passage_segment_ids"]]) > 0
        embeddings = mean_pool(outputs["hidden"].astype(jnp.float32), mask)
        queries, passages = jnp.split(embeddings, 2)
        return in_batch_contrastive(queries, passages, batch["passage_key"],
                                    batch["example_weight"], self.temperature,
                                    self.symmetric)

    def finalize(self, sums):
        return {"loss": float(sums["loss_sum"] / max(sums["weight"], 1e-9)),
                "accuracy": float(sums["correct"] / max(sums["examples"], 1e-9))}


def macro_f1(confusion):
    """Mean F1 over classes that occur in the labels or the predictions (sklearn's
    `f1_score(average="macro")` over the present labels)."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1e-12), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def balanced_class_weights(label_counts):
    """n_samples / (n_classes * count_c), sklearn's "balanced"; absent classes get 0."""
    counts = np.asarray(label_counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return tuple(float(w) for w in weights)
