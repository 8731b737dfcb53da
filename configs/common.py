"""Shared config pieces: every experiment config assembles these and overrides fields.

Config files follow big_vision: `get_config(arg)` where `arg` is the text after a colon,
e.g. `configs/scratch.py:runlocal,size=base`. `parse_arg` turns it into a ConfigDict.
"""

import ml_collections

from model import config as model_fields

# Model shapes by name. `base` is BERT-base; `small` is the benchmark's SMALL shape.
MODEL_SIZES = {
    "tiny": dict(num_layers=2, hidden=64, num_heads=4, mlp_dim=128),
    "mini": dict(num_layers=4, hidden=128, num_heads=4, mlp_dim=512),
    "small": dict(num_layers=4, hidden=256, num_heads=4, mlp_dim=1024),
    "base": dict(num_layers=12, hidden=768, num_heads=12, mlp_dim=3072),
    "large": dict(num_layers=24, hidden=1024, num_heads=16, mlp_dim=4096),
}

# Pre-trained Hugging Face checkpoints by alias (`configs/finetune.py:hf=minilm`, init_from
# `hf:minilm`): the model fields of their config.json, which train/init_from.py checks.
PRETRAINED = {
    "minilm": dict(vocab_size=30522, hidden=384, num_layers=6, num_heads=12, mlp_dim=1536,
                   max_len=512, type_vocab_size=2, layer_norm_eps=1e-12, norm="post"),
}

# Pre-trained decoders as GGUF files by alias (`configs/decoder.py:gguf=smollm2`, init_from
# `gguf:smollm2`): the file's architecture, which train/init_from.py checks at start-up.
DECODERS = {
    "smollm2": dict(vocab_size=49152, hidden=576, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, mlp_dim=1536, layer_norm_eps=1e-5,
                    rope_theta=100_000.0, tie_embeddings=True, norm="pre",
                    norm_type="rmsnorm", mlp_activation="swiglu", use_bias=False,
                    position_embedding="rope", type_vocab_size=0,
                    attention_mask="causal"),
}

# Logical axis -> mesh axes (MaxText style). Changing parallelism is an edit here.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


def parse_arg(arg, **defaults):
    """`"runlocal,size=base"` -> ConfigDict(runlocal=True, size="base") over `defaults`.

    A bare word sets a boolean flag; `k=v` values are cast to the type of the default.
    Unknown keys fail here, naming the key and what is accepted.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"Unknown config argument {key!r} in {arg!r}; accepted: {sorted(defaults)}"
            )
        default = defaults[key]
        if not _:
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"Config argument {key}={value!r} in {arg!r}: expected a "
                                 f"boolean (true/false, 1/0, yes/no)")
            parsed[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            parsed[key] = value
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError:
                raise ValueError(
                    f"Config argument {key}={value!r} in {arg!r}: expected "
                    f"{'an' if type(default) is int else 'a'} {type(default).__name__} "
                    f"like the default {default!r}") from None
    return parsed


def model_config(size="small", **overrides):
    """The model fields (model/config.py DEFAULTS) of shape `size`, then `overrides`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    m = ml_collections.ConfigDict(dict(model_fields.DEFAULTS))
    m.update(MODEL_SIZES[size])
    m.update(overrides)
    return m


def base_config():
    """Every field any stage may read. Experiment configs override, never add."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "" keeps JAX's default (threefry); "unsafe_rbg" makes dropout masks much cheaper.
    c.prng_impl = ""
    # Objective: "classify" (supervised) | "mlm" (issue 3) | "prefix_lm" (answer after a
    # bidirectional prompt) | "rag" (retrieval/rag_run.py: index, generator, evaluation)
    # | "retriever" (retrieval/retriever_run.py: contrastive (question, passage) training).
    c.task = "classify"
    c.model = model_config()
    c.init_from = ""  # Workdir or checkpoint path to initialise matching params from.

    c.data = ml_collections.ConfigDict(
        dict(
            source="wordnet",  # "wordnet" | "tfds" | "local"
            data_dir="",  # tfds data dir; "" -> $STRATA_DATA_DIR or ~/.cache/strata/tfds
            wordnet_dir="",
            # WordNet document text: the gloss (the classification input) or, for
            # pre-training, "gloss_and_examples" (gloss; example sentence; ...).
            wordnet_text="gloss",  # "" -> $WORDNET_DIR or /usr/share/wordnet
            tfds_name="",  # For source="tfds": e.g. "imdb_reviews".
            text_key="text",
            label_key="label",
            local_files=(),  # For source="local": .txt (a document per line) / .jsonl
            local_name="",  # Names the built local corpus in data_dir.
            train_split="train",
            eval_split="validation",
            test_split="test",
            seq_len=128,
            vocab_size=8192,  # Sentencepiece vocabulary trained on the training split.
            # "sentencepiece" (trained on the data) | "wordpiece" (a checkpoint's BERT
            # vocab: tokenizer_path = vocab.txt, its directory or hf:minilm).
            tokenizer="sentencepiece",
            tokenizer_path="",  # "" -> cached beside the dataset in data_dir.
            tokenizer_sample=200_000,  # Max training-split texts used to fit sentencepiece.
            packing=False,  # Pack several sequences per row (pre-training) vs pad.
            # Training batches padded to the smallest of these widths that fits all their
            # rows, e.g. (16, 32, 48) with seq_len 48 (last == seq_len); () pads to seq_len.
            length_buckets=(),
            batch_size=32,  # Global batch, split over the data and fsdp mesh axes.
            eval_batch_size=64,
            shuffle_buffer_seed=0,
            worker_count=0,  # grain worker processes; 0 = in the main process.
            label_fraction=1.0,  # Stratified fraction of the labelled train split kept.
            sampling="uniform",  # "uniform" (epochs) | "class_balanced" (P(x) ∝ 1/count(y)).
            token_dropout=0.0,  # Training only: P(delete) of each non-special piece.
            token_substitution=0.0,  # Training only: P(random non-special piece) per piece.
            # Masked-LM examples (task="mlm"; train/tasks/masking.py), BERT's recipe:
            mlm_rate=0.15,  # Fraction of non-special pieces predicted, per packed sequence.
            mlm_whole_word=False,  # Mask whole words (all pieces of a "▁" word together).
            mlm_dynamic=True,  # New mask each time a sequence is seen; False: one fixed mask.
            mlm_max_predictions=-1,  # Predictions per row; -1: ceil(mlm_rate * seq_len).
            # UniLM (train/tasks/unilm.py): this fraction of MLM training rows are prefix-LM.
            prefix_lm_fraction=0.0,
            # task="prefix_lm" (train/tasks/prefix_lm_examples.py): <qa_dir>/<split>.jsonl examples
            # {question, passages, answer}; answers cut to max_answer_tokens pieces.
            # task="retriever" (train/tasks/pairs.py): {question, passage, passage_id}.
            qa_dir="",
            max_answer_tokens=16,
            # prefix_lm's prompt: "plain" ([CLS] question [SEP] passages [SEP]) or "chat"
            # (the ChatML turns of train/tasks/chat_prompt.py; a chat decoder's tokenizer).
            prompt_format="plain",
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",  # "adamw" | "sgd" | "adafactor" | "lion" | "lamb" (optax's).
            lr=1e-3,
            schedule="cosine",  # "cosine" | "linear" | "constant"
            warmup_steps=100,
            end_lr_factor=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.9,  # sgd (0: plain SGD).
            nesterov=False,  # sgd.
            lion_b2=0.99,  # lion's second beta (Chen et al. 2023); b1 is shared.
            weight_decay=0.01,  # Applied to matrices only: never biases or norms.
            clip_norm=1.0,  # 0 disables.
            grad_accum_steps=1,
            # Ordered (regex, multiplier) rules over "/"-joined param paths, e.g.
            # (("encoder/(token|position)_embed/.*", None), ("encoder/block_0/.*", 0.1)):
            # the first rule whose regex re.fullmatch-es the WHOLE path decides; its
            # multiplier scales that param's lr (and weight decay); 0.0 or None freezes it
            # (no optimizer state, no gradient). Unmatched params: trainable, 1.0. A rule
            # matching no param is an error. See train/param_rules.py.
            param_rules=(),
            # ELECTRA-style: block i of N gets lr * decay**(N - i), embeddings
            # decay**(N + 1), heads 1.0; multiplies param_rules' multiplier. 0 disables.
            layerwise_lr_decay=0.0,
            # Penalty l2/2 ||θ-a||² + l1 ||θ-a||₁ added to the loss (train/regularizers.py).
            l2_strength=0.0,
            l1_strength=0.0,
            regularize_toward="zero",  # a: "zero" (matrices) | "init" (L2-SP: init_from's θ).
            regularize_fresh=r"classify_head/.*",  # "init": these (new, random) go to zero.
            # ULMFiT gradual unfreezing (train/unfreezing.py): head first, then one block
            # more every N steps from the top, embeddings last. 0 disables.
            gradual_unfreeze_every=0,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            log_every=50,
            eval_every=250,
            eval_steps=-1,  # -1: the whole eval split.
            final_eval_steps=-1,  # results.json's validation/test: -1 the whole splits.
            checkpoint_every=250,
            keep_checkpoints=3,
            best_metric="eval/accuracy",
            best_mode="max",
            # Early stopping (train/loop.py EarlyStopping): stop once best_metric has not
            # improved by more than min_delta for this many evaluations in a row; the
            # final evaluation is then of the best checkpoint. 0: off (num_steps is the cap).
            early_stopping_patience=0,
            early_stopping_min_delta=0.0,
            class_weighted_loss=False,
            label_smoothing=0.0,
            # With init_from an MLM checkpoint: held-out MLM loss of the encoder before
            # and after fine-tuning in results.json["forgetting"] (train/forgetting.py).
            report_forgetting=True,
            progress=True,
        )
    )

    # Retrieval index (retrieval/index_config.py IndexConfig mirrors these fields).
    c.index = ml_collections.ConfigDict(
        dict(
            kind="auto",  # "auto" (ScaNN where importable, else exact) | "exact" | "scann"
            brute_force_below=2_000,  # ScaNN brute force below this many documents...
            tree_min_size=20_000,  # ...AH + reorder below this, tree + AH + reorder above.
            num_leaves=-1,  # Tree partitions; -1: round(sqrt(n)).
            leaves_to_search=-1,  # Partitions searched per query; -1: leaves_fraction.
            leaves_fraction=0.3,  # Of num_leaves; tuned on real questions (README).
            tree_training_sample=50_000,  # Vectors the k-means tree is trained on.
            reorder=100,  # AH candidates rescored exactly (>= k at search time).
            ah_dims_per_block=2,  # Dimensions per 4-bit asymmetric-hashing code.
            ah_training_sample=30_000,  # Vectors the AH codebooks are trained on.
            anisotropic_threshold=0.2,  # Score-aware AH loss (ScaNN); nan: plain k-means.
            spherical=False,  # Spherical k-means for the tree.
            num_neighbors=10,  # Default k the ScaNN searcher is built for.
            num_threads=0,  # Search threads; 0: all CPUs.
            training_threads=0,  # Build threads; 0: all CPUs.
            recall_queries=200,  # Sampled queries for the recall@k logged at build.
            recall_k=10,
            exact_block_size=16_384,  # Exact search scores the corpus this many rows a block.
            seed=0,  # Of the recall query sample.
        )
    )

    # The RAG stage (task="rag", configs/rag.py, retrieval/rag_run.py).
    c.rag = ml_collections.ConfigDict(
        dict(
            encoder="hf:minilm",  # The retriever: train.embedding.load_encoder spec.
            k=3,  # Passages retrieved and packed per question.
            kb_size=0,  # Passages in the knowledge base; 0: every synset (117,659).
            question_kinds=("hypernym", "gloss"),
            max_train_questions=0,  # 0: all the KB's training-split questions.
            max_eval_questions=2000,  # Per held-out split.
            # Training distractors: "retrieved" (top-k over the KB's training passages) or
            # "random" (RAFT's sampled ones; training questions from every training synset).
            train_distractors="retrieved",
            distractor_fraction=0.2,  # RAFT: examples whose passages are all distractors.
            no_context_fraction=0.1,  # Examples with no passages (closed-book practice).
            new_info_passages=200,  # Test passages held out of the index, then upserted.
            encode_batch_size=64,
            decode_batch_size=64,
            # Re-retrieve every N generated answer pieces with the answer so far added to
            # the query; 0: retrieve once, before decoding.
            reretrieve_every=0,
            # The generator: "" trains the prefix-LM one (RAFT); "gguf:smollm2" (or
            # gguf:<path>) answers zero-shot from a ChatML prompt, no weight update
            # (retrieval/chat_generator.py), greedy, at most generator_max_new_tokens.
            generator="",
            generator_max_new_tokens=24,
            generator_max_len=1024,  # Its context: the longest prompt + answer decoded.
            # A chat generator's answers: "greedy" or "sample" (temperature, top-p; seeded
            # by config.seed).
            generator_strategy="greedy",
            generator_temperature=1.0,
            generator_top_p=1.0,
            # A chat generator also answers with k demonstrations from the training split
            # (retrieval/in_context_qa.py), closed-book and with the exact top-k passages:
            # results.json's "in_context", the stages' in-context-learning row. 0: off.
            in_context_k=0,
            in_context_settings=("closed_book", "retrieval"),  # Which of the two to ask.
        )
    )

    # Retriever training (task="retriever", configs/retriever.py, retrieval/retriever_run.py).
    c.retriever = ml_collections.ConfigDict(
        dict(
            temperature=0.05,  # logits = cos(q, p) / temperature.
            symmetric_loss=False,  # Also passage -> question cross-entropy, averaged.
            kb_size=0,  # Passages in the knowledge base; 0: every synset (117,659).
            question_kinds=("hypernym", "gloss"),
            max_train_questions=0,  # 0: every training-split question.
            max_eval_questions=2000,  # Per held-out split.
            # rag_run.knowledge_base: "random" takes training questions from every
            # training-split synset (not only the KB's); no distractors are used here.
            train_distractors="random",
            recall_at=(1, 5, 20),
            encode_batch_size=64,
        )
    )

    # Post-training after SFT (task="grpo" | "dpo", configs/post_train.py,
    # train/post_training/run.py).
    c.post_train = ml_collections.ConfigDict(
        dict(
            reward="exact_match",  # train/post_training/rewards.py: exact_match | gold_contained
            format_reward=0.1,  # Weight of the format bonus (finished, one short line).
            group_size=4,  # GRPO's G: completions sampled per prompt (>= 2).
            prompts_per_step=2,  # GRPO: prompts per step (rows = prompts * G).
            max_new_tokens=16,
            temperature=1.0,  # Sampling (GRPO's rollouts, DPO's pairs).
            top_p=1.0,
            clip_eps=0.2,  # GRPO's ε: the policy ratio is clipped to [1 - ε, 1 + ε].
            kl_coef=0.04,  # GRPO's β: weight of the k3 KL penalty to the reference.
            # GRPO's μ: policy updates per rollout (π_old = the sampling policy); each
            # train step is one rollout, so the optimizer takes num_steps * μ updates.
            updates_per_rollout=1,
            dpo_beta=0.1,  # DPO's β.
            pairs_file="",  # DPO: jsonl {question, passages, chosen, rejected}; "" builds
            max_pairs=64,  # ...from the start policy's samples on this many examples.
            eval_questions=80,  # Held-out (test split) questions evaluated greedily.
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multi-host (train/distributed.py): unset ("" / -1) fields come from $STRATA_* or are
    # detected (Cloud TPU, SLURM); all unset and nothing detected: one process.
    c.distributed = ml_collections.ConfigDict(
        dict(
            mode="auto",  # "auto" | "jax" (always jax.distributed.initialize()) | "off"
            coordinator_address="",  # "host:port" of process 0; $STRATA_COORDINATOR
            num_processes=-1,  # $STRATA_NUM_PROCESSES
            process_id=-1,  # $STRATA_PROCESS_ID
            local_device_ids="",  # "0,1": this process's devices; $STRATA_LOCAL_DEVICE_IDS
        )
    )
    c.logical_axis_rules = LOGICAL_AXIS_RULES
    return c


def apply_runlocal(c):
    """Shrink any config to a seconds-long CPU run (big_vision's `runlocal`)."""
    c.model.update(MODEL_SIZES["tiny"])
    c.model.max_len = 64
    c.data.seq_len = 64
    c.data.vocab_size = 1000
    c.data.tokenizer_sample = 20_000  # Seconds, not half a minute, to fit sentencepiece.
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
    c.optim.warmup_steps = 10
    c.train.num_steps = 60
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.eval_steps = 4
    c.train.checkpoint_every = 30
    return c


def apply_hf(c, alias, pooling=None, weights=True):
    """Use the pre-trained Hugging Face BERT `alias` (`hf=` of the configs): a PRETRAINED
    name (`minilm`) or a checkpoint directory.

    Sets its WordPiece vocabulary and, with `weights`, init_from=hf:<alias> and, for a
    PRETRAINED name, its architecture (a directory's: train/init_from.py's start-up check
    names the `--config.model.*` overrides its config.json needs); without, a PRETRAINED
    name's vocabulary size only. `pooling`: "mean" for a sentence-embedding checkpoint
    pooled as it was trained; None keeps the config's.
    """
    fields = PRETRAINED.get(alias, {})
    if weights:
        c.init_from = f"hf:{alias}"
        c.model.update(fields)
    elif "vocab_size" in fields:
        c.model.vocab_size = fields["vocab_size"]
    c.data.tokenizer, c.data.tokenizer_path = "wordpiece", f"hf:{alias}"
    c.data.vocab_size = c.model.vocab_size  # Unused by WordPiece; kept consistent.
    if pooling:
        c.model.pooling = pooling
    return c
