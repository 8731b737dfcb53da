"""Dense retriever training (task "retriever", DPR): (question, passage) pairs embedded
by the shared encoder, in-batch contrastive loss. `retrieval/retriever_run.py` runs
around the loop: it writes the pairs and measures recall before and after."""

from train import objectives
from train.tasks import pairs
from train.tasks.registry import Task, register


class Retriever(Task):
    name = "retriever"
    runner = "retrieval.retriever_run:run"
    token_fields = (("tokens", "segment_ids"), ("passage_tokens", "passage_segment_ids"))
    prepared_corpus = False  # Pairs in data.qa_dir, written by the runner.

    def check(self, config):
        if config.model.attention_mask != "bidirectional":
            raise ValueError(f"config.task='retriever' needs config.model.attention_mask="
                             f"'bidirectional' (has {config.model.attention_mask!r})")

    def load_split(self, data_cfg, split):
        return pairs.load_split(data_cfg, split)

    def train_iterator(self, source, tok, data_cfg, seed):
        return pairs.make_train_iterator(source, tok, data_cfg, seed=seed)

    def eval_iterator(self, source, tok, data_cfg):
        return pairs.make_eval_iterator(source, tok, data_cfg)

    def objective(self, config, train_source=None):
        return objectives.Contrastive(temperature=config.retriever.temperature,
                                      symmetric=config.retriever.symmetric_loss)

    def batch_fields(self, config, rows):
        fields = super().batch_fields(config, rows)
        for name in ("tokens", "segment_ids", "positions"):
            fields[f"passage_{name}"] = fields[name]
        return fields | {"passage_key": ((rows,), "int32")}


register(Retriever())
