r"""The stages compared side by side on WordNet: one ablation, one report.

  python -m launch.sweep --config configs/ablations/stages.py --workdir runs/stages
  python -m launch.sweep --config configs/ablations/stages.py:scale=cpu --workdir W
  python -m launch.sweep --config configs/ablations/stages.py:scale=full --workdir W

Parts (each a resumable sweep in `W/<part>/`, run in this order; `W/report.md` at the end,
written by train/experiments/stages_report.py):
  pretrain   BERT-style MLM pre-training on the training synsets' glosses and examples.
  lr_search  (scale=cpu/full, or lr_search=true) every method of `finetune` and `methods`
             (full fine-tuning included) from the MLM checkpoint at 100% of the labels,
             one seed, at LR_MULTIPLIERS (scale=full: WIDE_LR_MULTIPLIERS) x its default
             learning rate: each method's rate
             is the one best on validation accuracy, and `finetune` and `methods` train
             at it (`{best:lr_search:optim.lr}`, train/experiments/ablations.py).
  lr_search_scratch  (with lr_search) the same grid for full training from random init;
             `scratch` trains at its choice.
  scratch    supervised training from random init at 1%, 10% and 100% of the labels,
  finetune   the same runs (same steps, batch, seeds, model) from the MLM checkpoint:
             the data-requirement comparison.
  methods    every other fine-tuning method (the demo: the PEFT methods and the linear
             probe) from the MLM checkpoint at 100% of the labels
             (full fine-tuning is `finetune`'s 100% run): quality, trainable parameters,
             wall time, peak memory, forgetting (held-out MLM loss before / after).
  minilm     (scale=cpu, full) fine-tuning the imported all-MiniLM-L6-v2 (LoRA; full
             too at scale=full).
  rag        closed-book vs RAG (exact and ScaNN retrieval) vs oracle passages on WordNet
             knowledge questions, and new facts added to the index without retraining;
             the generator is the pre-trained SmolLM2-135M-Instruct (gguf:smollm2)
             answering zero-shot from a ChatML prompt with the numbered passages; the
             same questions again with `in_context_k` demonstrations (in-context
             learning, closed-book and with the exact top-k passages).
  rag_tuned  (scale=full) the same decoder fine-tuned RAFT style with LoRA on those
             prompts first (configs/rag.py:gen=smollm2,method=lora), asked the same way.
  post_train (scale=full) `rag_tuned`'s decoder post-trained by GRPO (exact-match reward
             on its own sampled answers) and by DPO (pairs of a gold answer over a wrong
             sample), configs/post_train.py:scale=full: held-out questions before/after.
  search     random search over learning rate and steps for LoRA: the best trial picked
             on validation, reported on test.

Equal budgets: every supervised run takes the same steps, batch and sequence length;
methods use their own default learning rate (model/finetune_methods.py, scaled by
`lr_scale` for the small model), or with `lr_search` the one selected on validation
(`lr_search=true|false` overrides the scale's choice; the demo's time budget leaves it
off). `scale=demo` (default) fits a 2-core CPU in about 20 minutes (the tiny model, 400
steps, three seeds, two trials at a time); `scale=cpu` is its one-to-two-hour reference
run; `scale=full` is meant for an accelerator (the mini model, longer runs, the full RAG
config). `seed_base=B` shifts every seed by B (a re-run that checks the findings).
"""

from configs import common
from model import finetune_methods

# Every fine-tuning method but `full` (the `finetune` part's 100%-label run is it), in
# the table's order.
METHODS = tuple(m for m in finetune_methods.METHODS if m != "full")
# The demo's: the PEFT methods and the linear probe (full fine-tuning's variants `freeze`
# and `layerwise_lr_decay` run at scale=cpu and full), for its 20-minute budget.
DEMO_METHODS = tuple(m for m in METHODS if m not in ("freeze", "layerwise_lr_decay"))
LABEL_FRACTIONS = [0.01, 0.1, 1.0]
# The learning-rate search's grid, as multiples of each method's default: half a decade
# apart, so three runs span a decade around the table's guess, and a best rate at either
# end shows the guess was off by more (the report marks it) at a cost of 3 runs a method.
LR_MULTIPLIERS = (1 / 3, 1.0, 3.0)
# scale=full (an accelerator's budget) a decade further each way: the scale=cpu search
# chose an edge for two methods (LoRA the lowest, layer-wise decay the highest).
WIDE_LR_MULTIPLIERS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
SCALES = {
    # size, MLM steps, supervised steps, batch, seeds, MiniLM, lr_scale, lr_search, RAG,
    # search.
    # The demo's data-requirement runs: 1% and 100% of the labels over five seeds (from
    # scratch at 1%, test accuracy varies by several points from seed to seed: three
    # seeds left a 9-15 point gain untestable in one of two re-runs); methods over three.
    "demo": dict(size="tiny", mlm_steps=1200, steps=400, batch=32, seeds=3,
                 label_fractions=[0.01, 1.0], label_seeds=5,
                 methods=DEMO_METHODS, minilm_steps=40, minilm_methods=[], lr_scale=15.0,
                 lr_search=False,
                 rag="runlocal,gen=smollm2", rag_questions=96, rag_new_facts=40,
                 rag_tuned="", post_train=(), in_context_k=3, in_context=("closed_book",),
                 search_trials=0, lr_multipliers=LR_MULTIPLIERS),
    # The reference run on a 2-core CPU (one to two hours): the demo's tiny model trained
    # longer (4x the MLM steps, ~4x the supervised steps), learning rates searched, four
    # times the RAG questions.
    "cpu": dict(size="tiny", mlm_steps=5000, steps=1500, batch=32, seeds=3,
                label_fractions=LABEL_FRACTIONS, label_seeds=5,
                methods=METHODS, minilm_steps=300, minilm_methods=["lora"], lr_scale=15.0,
                lr_search=True,
                rag="runlocal,gen=smollm2", rag_questions=200, rag_new_facts=80,
                rag_tuned="", post_train=(), in_context_k=3,
                in_context=("closed_book", "retrieval"), search_trials=8,
                lr_multipliers=LR_MULTIPLIERS),
    "full": dict(size="mini", mlm_steps=10_000, steps=1500, batch=64, seeds=3,
                 label_fractions=LABEL_FRACTIONS, label_seeds=3,
                 methods=METHODS, minilm_steps=1500, minilm_methods=["full", "lora"],
                 lr_scale=3.0,
                 lr_search=True,
                 rag="gen=smollm2", rag_questions=2000, rag_new_facts=200, in_context_k=3,
                 in_context=("closed_book", "retrieval"),
                 rag_tuned="gen=smollm2,method=lora", post_train=("grpo", "dpo"),
                 search_trials=8, lr_multipliers=WIDE_LR_MULTIPLIERS),
}


def get_ablation(arg=None):
    arg = common.parse_arg(arg, scale="demo", seed_base=0, lr_search=None)
    if arg.scale not in SCALES:
        raise ValueError(f"scale={arg.scale!r}; expected one of {sorted(SCALES)}")
    s = SCALES[arg.scale]
    if arg.lr_search is not None and str(arg.lr_search).lower() not in ("true", "false"):
        raise ValueError(f"lr_search={arg.lr_search!r}; expected true or false")
    lr_search = (s["lr_search"] if arg.lr_search is None
                 else str(arg.lr_search).lower() == "true")
    # seed_base=B: every seed of the ablation (pre-training's included) shifted by B, for
    # a re-run that checks its findings do not hang on the seeds.
    base = arg.seed_base
    seed_list = [base + i for i in range(s["seeds"])]
    pretrained = f"{{workdir}}/pretrain/seed={base}"
    # Final evaluations: the whole validation and test splits (11.5k / 11.6k glosses), or
    # at demo scale their first 40 batches of 64 (2,560 glosses each; reading and
    # tokenising whole splits would cost each of its 48 runs ~8 s more).
    evals = {"train.eval_steps": 8, "train.log_every": 50,
             "train.final_eval_steps": 40 if arg.scale == "demo" else -1}
    # Supervised runs: padded to length buckets (the median gloss is 13 pieces of 48),
    # evaluated on 16 validation batches every steps/4, early-stopped after two
    # evaluations without a gain; the best checkpoint is the one evaluated on test.
    supervised = {"data.batch_size": s["batch"], "train.num_steps": s["steps"],
                  "data.length_buckets": (16, 32, 48),
                  "train.eval_every": s["steps"] // 4, "train.checkpoint_every": s["steps"],
                  "train.early_stopping_patience": 2,
                  "optim.warmup_steps": s["steps"] // 10, **evals, "train.eval_steps": 16}
    # method=freeze: the bottom half of the blocks (and the embeddings) frozen.
    half = common.MODEL_SIZES[s["size"]]["num_layers"] // 2
    finetune = (f"configs/finetune.py:size={s['size']},lr_scale={s['lr_scale']},"
                f"freeze_blocks={half}")
    seeds = dict(seeds=seed_list)
    label_seeds = dict(seeds=[base + i for i in range(s["label_seeds"])])
    # A tiny model's run keeps one core busy: these parts run two trials at a time.
    parallel = dict(max_parallel=2)
    # Each method at the rate its lr_search trials chose on validation (or its default).
    selected_lr = {"optim.lr": "{best:lr_search:optim.lr}"} if lr_search else {}
    return dict(report="stages", parts=[
        dict(name="pretrain", title="MLM pre-training",
             config=f"configs/pretrain_mlm.py:size={s['size']}", sweep=dict(seeds=[base]),
             overrides={"train.num_steps": s["mlm_steps"], "data.seq_len": 64,
                        "optim.lr": 3e-3 if s["size"] == "tiny" else 1e-3,
                        "optim.warmup_steps": s["mlm_steps"] // 20,
                        "train.eval_every": s["mlm_steps"] // 2,
                        "train.checkpoint_every": s["mlm_steps"] // 2, **evals}),
        *([dict(name="lr_search", **parallel,
                title="Learning rate per method, chosen on validation",
                config=finetune,
                sweep=dict(grid={"arg.method": list(finetune_methods.METHODS),
                                 "arg.lr_scale": [s["lr_scale"] * m for m in s["lr_multipliers"]]},
                           seeds=[base], metric="validation/accuracy", mode="max"),
                overrides={"init_from": pretrained, "data.label_fraction": 1.0,
                           **supervised})] if lr_search else []),
        # From scratch, the rate is searched the same way (random init, 100% labels):
        # a comparison with pre-training must not hand scratch a rate tuned for another start.
        *([dict(name="lr_search_scratch", **parallel,
                title="Learning rate from scratch, chosen on validation",
                config=f"{finetune},method=full",
                sweep=dict(grid={"arg.lr_scale": [s["lr_scale"] * m for m in s["lr_multipliers"]]},
                           seeds=[base], metric="validation/accuracy", mode="max"),
                overrides={"data.label_fraction": 1.0, **supervised})] if lr_search else []),
        dict(name="scratch", **parallel, title="Training from scratch",
             config=f"{finetune},method=full",
             sweep=dict(grid={"data.label_fraction": s["label_fractions"]}, **label_seeds),
             overrides={**supervised, **({"optim.lr": "{best:lr_search_scratch:optim.lr}"}
                                         if lr_search else {})}),
        dict(name="finetune", **parallel, title="MLM pre-training, then full fine-tuning",
             config=f"{finetune},method=full",
             sweep=dict(grid={"data.label_fraction": s["label_fractions"]}, **label_seeds),
             overrides={"init_from": pretrained, **supervised, **selected_lr}),
        dict(name="methods", **parallel, title="Fine-tuning methods from the MLM checkpoint",
             config=finetune, sweep=dict(grid={"arg.method": list(s["methods"])}, **seeds),
             overrides={"init_from": pretrained, **supervised, **selected_lr}),
        *([dict(name="minilm", title="Fine-tuning the imported all-MiniLM-L6-v2",
                config="configs/finetune.py:hf=minilm",
                sweep=dict(grid={"arg.method": s["minilm_methods"]}, seeds=[base]),
                # 22M parameters: a CPU demo evaluates it on 8 batches, not whole splits.
                overrides={**supervised, "data.batch_size": 16, "data.seq_len": 48,
                           "data.length_buckets": (),
                           "train.final_eval_steps": -1 if arg.scale == "full" else 8,
                           "train.num_steps": s["minilm_steps"],
                           "train.eval_every": s["minilm_steps"],
                           "train.checkpoint_every": s["minilm_steps"],
                           "optim.warmup_steps": s["minilm_steps"] // 10})]
          if s["minilm_methods"] else []),
        # SmolLM2 answers a few questions a second on a 2-core CPU: the demo asks
        # `rag_questions` held-out questions in each mode, enough for its paired tests
        # over questions, and holds `rag_new_facts` test passages out of the index.
        dict(name="rag", title="Closed-book vs retrieval-augmented generation (SmolLM2)",
             config=f"configs/rag.py:{s['rag']}", sweep=dict(seeds=[0]),
             overrides={"rag.max_eval_questions": s["rag_questions"],
                        "rag.new_info_passages": s["rag_new_facts"],
                        "rag.in_context_k": s["in_context_k"],
                        "rag.in_context_settings": s["in_context"]}),
        *([dict(name="rag_tuned", title="RAG with the decoder fine-tuned RAFT style (LoRA)",
                config=f"configs/rag.py:{s['rag_tuned']}", sweep=dict(seeds=[0]),
                overrides={"rag.max_eval_questions": s["rag_questions"]})]
          if s["rag_tuned"] else []),
        # Post-training starts from rag_tuned's SFT decoder (its LoRA merged; a fresh one
        # trained on top, the SFT model itself the reference) and asks its test questions.
        *([dict(name="post_train", title="Post-training the RAFT-tuned decoder (GRPO, DPO)",
                config="configs/post_train.py:scale=full,sft={workdir}/rag_tuned/seed=0",
                sweep=dict(grid={"arg.algo": list(s["post_train"])}, seeds=[0]),
                overrides={"post_train.eval_questions": s["rag_questions"]})]
          if s["post_train"] and s["rag_tuned"] else []),
        *([dict(name="search", **parallel,
                title="Random search over learning rate and steps (LoRA)",
                config=f"{finetune},method=lora",
                sweep=dict(random={"optim.lr": ("loguniform", 1e-3, 5e-2),
                                   "train.num_steps": ("int", s["steps"] // 2, 2 * s["steps"])},
                           num_trials=s["search_trials"], seeds=[base],
                           metric="validation/accuracy", mode="max"),
                overrides={"init_from": pretrained, **{
                    k: v for k, v in supervised.items() if k != "train.num_steps"}})]
          if s["search_trials"] else []),
    ])
