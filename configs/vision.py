r"""Images through the shared transformer (ViT patches): scikit-learn's handwritten digits
(1,797 8x8 grey images, 10 classes; 1,439 / 179 / 179 stratified train / validation /
test) or a folder of your own images, at three stages.

  python -m launch.main --config configs/vision.py:stage=scratch --workdir runs/vit_scratch
  python -m launch.main --config configs/vision.py:stage=pretrain --workdir runs/vit_simmim
  python -m launch.main --config configs/vision.py:stage=finetune,method=lora \
      --config.init_from=runs/vit_simmim --workdir runs/vit_lora
  python -m launch.main --config configs/vision.py:stage=scratch,runlocal --workdir W

Stages: `scratch` (task classify_image from random weights), `pretrain` (task
masked_patches: SimMIM on the training split's images, labels unused; the checkpoint
initialises `finetune`), `finetune` (classify_image from --config.init_from with
`method=` any of configs/finetune.py's METHODS and their arguments, e.g. lora_rank=4).
Other arguments: `runlocal` (a CPU run of seconds), `size=` (configs/common.py
MODEL_SIZES; default tiny), `patch=` (patch side in pixels; must divide the image),
`image_dir=` (a folder with one sub-folder of PNG/JPEG images per class; default: the
digits), `image_size=HxWxC` (that folder's image shape, e.g. 32x32x3),
`positions=learned|sincos2d`, `steps=`, `lr_scale=`.

Any stage takes `--config.data.label_fraction=0.1` (stratified subset of the training
labels, as for text) and the augmentation fields below (train/data/image_augmentation.py).
"""

from configs import common
from configs import finetune as finetune_config
from model import finetune_methods

STAGES = ("scratch", "pretrain", "finetune")
DIGITS_SHAPE = (8, 8, 1)


def _image_shape(text):
    if not text:
        return DIGITS_SHAPE
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"image_size={text!r}; expected HxWxC, e.g. 32x32x3")
    return shape


def get_config(arg=None):
    arg = finetune_config.parse_method_arg(
        arg, stage="scratch", runlocal=False, size="tiny", patch=2, image_dir="",
        image_size="", positions="learned", steps=0, lr_scale=1.0)
    if arg.stage not in STAGES:
        raise ValueError(f"stage={arg.stage!r} in configs/vision.py; expected one of {STAGES}")
    shape = _image_shape(arg.image_size)
    patches = (shape[0] // arg.patch) * (shape[1] // arg.patch)
    c = common.base_config()
    pretrain = arg.stage == "pretrain"
    c.task = "masked_patches" if pretrain else "classify_image"
    # Pre-LN as ViT; [CLS] first, then the patches: seq = 1 + patches.
    c.model = common.model_config(
        arg.size, heads=("pixels",) if pretrain else ("classify",), num_classes=10,
        norm="pre", patch_size=arg.patch, image_shape=shape, max_len=1 + patches,
        position_embedding=arg.positions, dropout=0.1, attention_dropout=0.0)
    c.model.vocab_size = 1  # No vocabulary: the patch projection replaces the embedding.
    c.data.source = "images"
    c.data.image_dir = arg.image_dir  # "" = scikit-learn's digits.
    c.data.seq_len = 1 + patches
    c.data.batch_size = 64
    c.data.eval_batch_size = 64
    # Augmentation (training only). Flips stay off for digits: a mirrored 2, 3, 4, 5, 7
    # or 9 is not that digit; turn image_flip on only where mirroring keeps the label.
    c.data.image_rotation = 0.0  # Max degrees, e.g. 10.
    c.data.image_flip = False
    c.data.image_shift = 0  # Max pixels, e.g. 1 on 8x8 digits.
    c.data.image_noise = 0.0  # Std on [0, 1] pixels, e.g. 0.05.
    # SimMIM's masked share of the patches (8 of 16 at patch 2 on 8x8).
    c.data.patch_mask_ratio = 0.5
    c.data.image_patch_size = c.model.get_ref("patch_size")  # The targets' patches.
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.train.num_steps = 1500 if pretrain else 600
    c.train.eval_every = 100
    c.train.checkpoint_every = 300
    c.train.log_every = 50
    c.train.report_forgetting = False
    if pretrain:
        c.train.best_metric, c.train.best_mode = "eval/loss", "min"
    if arg.stage == "finetune":
        finetune_config.apply_method(c, arg)
        c.optim.lr = finetune_methods.get(arg.method).lr * arg.lr_scale
    else:
        c.optim.lr *= arg.lr_scale
    if arg.runlocal:
        c.model.update(common.MODEL_SIZES["tiny"])
        c.train.num_steps = 60
        c.train.eval_every = c.train.checkpoint_every = 30
        c.train.log_every = 10
        c.optim.warmup_steps = 10
    if arg.steps:
        c.train.num_steps = arg.steps
        c.train.checkpoint_every = arg.steps
    return c
