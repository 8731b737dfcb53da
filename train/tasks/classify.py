"""Sequence classification (task "classify"): labelled text -> one of num_classes."""

import numpy as np

from train import objectives
from train.data import augmentation, pipeline, sources
from train.tasks.registry import Task, check_heads, register


class Classify(Task):
    name = "classify"
    measures_forgetting = True

    def check(self, config):
        check_heads(config, ("classify",), "a classifier reads the classify head")

    def check_source(self, config, source, split):
        sources.check_labels(source, config.model.num_classes, split, config.data)

    def train_iterator(self, source, tok, data_cfg, seed):
        return pipeline.make_train_iterator(
            source, tok, data_cfg, seed=seed,
            transform=augmentation.train_transform(tok, data_cfg, seed=seed))

    def eval_iterator(self, source, tok, data_cfg):
        return pipeline.make_eval_iterator(source, tok, data_cfg)

    def objective(self, config, train_source=None):
        class_weights = None
        if config.train.class_weighted_loss:
            if train_source is None:  # Shapes only: the weights' values do not matter.
                class_weights = tuple([1.0] * config.model.num_classes)
            else:
                class_weights = objectives.balanced_class_weights(np.bincount(
                    sources.label_array(train_source), minlength=config.model.num_classes))
        return objectives.Classification(
            num_classes=config.model.num_classes, class_weights=class_weights,
            label_smoothing=config.train.label_smoothing)

    def batch_fields(self, config, rows):
        return super().batch_fields(config, rows) | {"labels": ((rows,), "int32")}


register(Classify())
