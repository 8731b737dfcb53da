"""Prefix-LM (task "prefix_lm"): an answer decoded after a bidirectional prompt, from
(question, passages, answer) examples a runner wrote to data.qa_dir."""

from train import objectives
from train.tasks import prefix_lm_examples as examples
from train.tasks.registry import Task, register


def check_generator(config):
    """A generator (prefix_lm and rag): the lm head over a prefix mask (the prompt read
    bidirectionally) or a causal one (a decoder such as SmolLM2 reads it causally)."""
    if "lm" not in config.model.heads or config.model.attention_mask not in ("prefix",
                                                                              "causal"):
        raise ValueError(f"config.task={config.task!r} needs config.model.heads with 'lm' "
                         f"and config.model.attention_mask 'prefix' or 'causal' (has "
                         f"{tuple(config.model.heads)}, "
                         f"{config.model.attention_mask!r})")


class PrefixLM(Task):
    name = "prefix_lm"
    prepared_corpus = False  # Examples in data.qa_dir, written before the loop.

    def check(self, config):
        check_generator(config)
        fmt = config.data.prompt_format
        if fmt not in examples.PROMPT_FORMATS:
            raise ValueError(f"config.data.prompt_format={fmt!r}; expected one of "
                             f"{examples.PROMPT_FORMATS}")
        if fmt == "chat" and config.data.tokenizer != "gguf":
            raise ValueError(f"config.data.prompt_format='chat' needs a tokenizer with a chat "
                             f"template (config.data.tokenizer='gguf', a chat decoder's "
                             f"file); has {config.data.tokenizer!r}")

    def load_split(self, data_cfg, split):
        return examples.load_split(data_cfg, split)

    def train_iterator(self, source, tok, data_cfg, seed):
        return examples.make_train_iterator(source, tok, data_cfg, seed=seed)

    def eval_iterator(self, source, tok, data_cfg):
        return examples.make_eval_iterator(source, tok, data_cfg)

    def objective(self, config, train_source=None):
        return objectives.PrefixLM()

    def batch_fields(self, config, rows):
        length = config.data.seq_len
        return super().batch_fields(config, rows) | {
            "prefix_mask": ((rows, length), "bool"), "targets": ((rows, length), "int32"),
            "target_weights": ((rows, length), "float32")}

    def lm_positions_fraction(self, config):
        return 1.0  # The LM head runs at every position.


register(PrefixLM())
