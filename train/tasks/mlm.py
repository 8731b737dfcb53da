"""Masked-LM pre-training (task "mlm", BERT's recipe), optionally with UniLM's share of
prefix-LM rows (data.prefix_lm_fraction > 0)."""

from train import objectives
from train.data import augmentation, pipeline
from train.tasks import masking, unilm
from train.tasks.registry import Task, check_heads, register


def _fields_module(data_cfg):
    """masking (pure MLM) or unilm (MLM and prefix-LM rows): the same transform API."""
    return unilm if unilm.prefix_lm_fraction(data_cfg) > 0 else masking


class MaskedLM(Task):
    name = "mlm"
    mixes_prefix_lm = True

    def check(self, config):
        check_heads(config, ("mlm",), "masked-LM predicts through the mlm head")
        if config.data.tokenizer == "gguf":  # A decoder's BPE: no [MASK] piece to mask with.
            raise ValueError("config.task='mlm' masks pieces with the tokenizer's [MASK]; "
                             "config.data.tokenizer='gguf' (a chat decoder's BPE) has none: "
                             "use task 'prefix_lm' for a decoder, or a sentencepiece/"
                             "wordpiece tokenizer")
        fraction, m = config.data.prefix_lm_fraction, config.model
        if fraction > 0 and (m.attention_mask != "prefix"
                             or not {"mlm", "lm"} <= set(m.heads)):
            raise ValueError(
                f"config.data.prefix_lm_fraction={fraction} needs config.model."
                f"attention_mask='prefix' (has {m.attention_mask!r}) and config.model.heads "
                f"with 'mlm' and 'lm' (has {tuple(m.heads)}); configs/pretrain_mlm.py:"
                f"unilm=<fraction> sets all three")
        if fraction == 0 and m.attention_mask == "prefix":
            raise ValueError(
                "config.task='mlm' with config.model.attention_mask='prefix' needs prefix-LM "
                "rows: set config.data.prefix_lm_fraction > 0 (configs/pretrain_mlm.py:"
                "unilm=<fraction>) or config.model.attention_mask='bidirectional'")

    def train_iterator(self, source, tok, data_cfg, seed):
        return pipeline.make_train_iterator(
            source, tok, data_cfg, seed=seed, with_labels=False,
            transform=pipeline.chain_transforms(  # Augment the text first, then mask it.
                augmentation.train_transform(tok, data_cfg, seed=seed),
                _fields_module(data_cfg).train_transform(tok, data_cfg, seed=seed)))

    def eval_iterator(self, source, tok, data_cfg):
        return pipeline.make_eval_iterator(
            source, tok, data_cfg, with_labels=False,
            transform=_fields_module(data_cfg).eval_transform(tok, data_cfg))

    def objective(self, config, train_source=None):
        if unilm.prefix_lm_fraction(config.data) > 0:  # Both losses in one batch.
            return objectives.MaskedAndPrefixLM()
        return objectives.MaskedLM()

    def batch_fields(self, config, rows):
        p, length = masking.max_predictions(config.data), config.data.seq_len
        fields = super().batch_fields(config, rows) | {
            "mlm_positions": ((rows, p), "int32"), "mlm_targets": ((rows, p), "int32"),
            "mlm_weights": ((rows, p), "float32")}
        if unilm.prefix_lm_fraction(config.data) > 0:
            fields |= {"prefix_mask": ((rows, length), "bool"),
                       "targets": ((rows, length), "int32"),
                       "target_weights": ((rows, length), "float32")}
        return fields

    def lm_positions_fraction(self, config):
        fraction = masking.max_predictions(config.data) / config.data.seq_len
        if unilm.prefix_lm_fraction(config.data) > 0:  # The LM head runs everywhere.
            fraction += 1.0
        return fraction


register(MaskedLM())
