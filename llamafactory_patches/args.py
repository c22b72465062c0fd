"""YAML keys of VPT: `ModelArguments` and `DataArguments` subclasses swapped into LLaMA-Factory's argument parsers.

Unknown keys are still rejected (the parsers are LLaMA-Factory's own, over the subclasses). LLaMA-Factory has no
registry for argument classes: the parsers' class lists are edited in place (guarded private patch). Every new
field has a default that leaves a run that is not VPT as it was; `patch_config` (see `model`) refuses VPT keys
for a checkpoint that is not VPT.
"""

from dataclasses import dataclass, field, fields

from llamafactory.hparams import parser
from llamafactory.hparams.data_args import DataArguments
from llamafactory.hparams.model_args import ModelArguments
from llamafactory.train import trainer_utils

from transformers_vpt.vocabulary import normalize_encoder_list

from .guard import Private


@dataclass
class VPTModelArguments(ModelArguments):
    r"""Model arguments plus the VPT fields of the model config; unset (None) keeps the checkpoint's value."""

    vision_encoder_ls: str | None = field(
        default=None,
        metadata={"help": "Re-encoding branches to build, a comma-separated subset of `dino`, `sam`, `clip`."},
    )
    num_inner_forward_run: int | None = field(
        default=None,
        metadata={"help": "1: single pass with unconditioned projections (alignment); 2: the two-pass VPT forward."},
    )
    para_mask_id: int | None = field(
        default=None,
        metadata={"help": "Mask modelling: 0 off, 1 mask chat turn #1, 2 mask turns #1 and #3."},
    )
    para_mask_ratio: float | None = field(
        default=None,
        metadata={"help": "Probability, drawn per sample and per paragraph, of applying the paragraph mask."},
    )
    projector_scale: int | None = field(
        default=None,
        metadata={"help": "Number of control-token hidden states concatenated into one projector condition."},
    )
    image_resolution: int = field(
        default=512,
        metadata={
            "help": "The released image rule of VPT templates: the long side of every image, crop and clip image is "
            "capped at this (NEAREST), sides under 28 px are stretched to 28 (DINOv2 inputs capped at 512, SAM at "
            "1024). It replaces `image_max_pixels`/`image_min_pixels` for the VPT templates (`vpt_qwen2_vl`, ...)."
        },
    )
    vpt_drop_branches: bool = field(
        default=False,
        metadata={
            "help": "Load a checkpoint whose weights hold branches that `vision_encoder_ls` leaves out, dropping "
            "them (the trained model will not have them). Off: such a load is an error naming the branches."
        },
    )
    vpt_added_token_ids: list[int] = field(
        default_factory=list,
        init=False,
        metadata={"help": "Ids of the VPT tokens added to the tokenizer in this run, derived. Do not specify it."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.vision_encoder_ls is not None:  # a YAML list or a comma string; idempotent for `copyfrom`
            self.vision_encoder_ls = normalize_encoder_list(self.vision_encoder_ls)


@dataclass
class VPTDataArguments(DataArguments):
    r"""Data arguments plus the VPT record checks (`llamafactory_patches.records`)."""

    vpt_skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Train without the records of a VPT-template dataset that break the VPT record rules, and log "
            "how many and which. Off: the first bad records stop the run before tokenisation, with their index."
        },
    )


VPT_CONFIG_FIELDS = (
    "vision_encoder_ls",
    "num_inner_forward_run",
    "para_mask_id",
    "para_mask_ratio",
    "projector_scale",
)
"""The `VPTModelArguments` fields copied into the model config when set."""


_ARGUMENT_LISTS = ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS")
PRIVATE = (
    *(
        Private(parser, name, contains=(ModelArguments, DataArguments), patch="VPT YAML keys")
        for name in _ARGUMENT_LISTS
    ),
    Private(trainer_utils, "ModelArguments", expected=ModelArguments, patch="VPT YAML keys of reference models"),
)


def vpt_keys() -> list[str]:
    r"""The YAML keys the VPT argument classes add (`recipe.VPT_KEYS` must list them)."""
    stock = {f.name for cls in (ModelArguments, DataArguments) for f in fields(cls)}
    added = [f.name for cls in (VPTModelArguments, VPTDataArguments) for f in fields(cls) if f.init]
    return [name for name in added if name not in stock]


def patch() -> None:
    lists = [getattr(parser, name) for name in _ARGUMENT_LISTS]
    mca = getattr(parser, "_TRAIN_MCA_ARGS", None)  # Megatron arguments (USE_MCA), when this release has them
    lists += [mca] if mca and ModelArguments in mca and DataArguments in mca else []
    for arg_classes in lists:
        arg_classes[arg_classes.index(ModelArguments)] = VPTModelArguments
        arg_classes[arg_classes.index(DataArguments)] = VPTDataArguments

    trainer_utils.ModelArguments = VPTModelArguments  # `copyfrom` for reference and reward models
