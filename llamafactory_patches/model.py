"""Model loading: VPT tokens, YAML values into the config, new-token embeddings, freeze and LoRA keys.

* `patch_tokenizer` adds the VPT tokens of the branches in use (the YAML's `vision_encoder_ls`, else the
  checkpoint's) before the dataset is tokenized, so placeholders and action tokens are single tokens.
* `patch_config` copies the YAML's VPT fields into a VPT config and fills its token ids from the tokenizer;
  `vpt_drop_branches: true` becomes `from_pretrained(..., drop_branches=True)` (without it, a checkpoint whose
  weights hold branches that `vision_encoder_ls` leaves out does not load).
* `patch_processor` gives the processor the recipe's `image_resolution` (the released image rule of the plugin).
* `patch_model` initialises the embedding rows of tokens added in this run (see `init_added_token_rows`).
* `freeze_vision_tower` also freezes DINOv2 and SAM; the projectors are trainable in full fine-tuning, never LoRA
  targets, and reachable with `additional_target` under LoRA (`_register_composite_model`, LLaMA-Factory's
  registry of composite models, and `MROPE_MODELS`). Each VPT model type's entry is its base's stock entry
  (`COMPOSITE_MODELS[base.name]`: Qwen3-VL's vision keys include `visual.pos_embed` and
  `visual.deepstack_merger_list`) plus the VPT encoders and projectors (`composite_model_keys`).

The four `patch_*` functions have no registry: `model.loader` imported them by name and resolves them when it runs,
so they are wrapped there (guarded private patch). Each wrapper calls the stock function first and adds nothing
for a model, tokenizer or processor that is not VPT.
"""

from functools import wraps

from llamafactory.extras import constants, logging
from llamafactory.extras.constants import MROPE_MODELS
from llamafactory.model import loader
from llamafactory.model.model_utils import visual

from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.models.vpt.configuration_vpt import VPTConfigMixin
from transformers_vpt.models.vpt.processing_vpt import VPTProcessorMixin
from transformers_vpt.perception import BRANCHES
from transformers_vpt.vocabulary import add_vpt_tokens, init_added_token_rows

from .args import VPT_CONFIG_FIELDS
from .guard import Private

logger = logging.get_logger(__name__)

VPT_MODEL_TYPES = tuple(model_type for base in VPT_BASES.values() for model_type in base.model_types)
_COMPOSITE_FIELDS = ("model_type", "projector_keys", "vision_model_keys", "language_model_keys", "lora_conflict_keys")


def _add_tokens(tokenizer, model_args, vision_encoder_ls, config=None) -> None:
    size = len(tokenizer)
    add_vpt_tokens(tokenizer, config, vision_encoder_ls=vision_encoder_ls)
    if len(tokenizer) > size:
        logger.info_rank0(f"Added {len(tokenizer) - size} VPT tokens for {vision_encoder_ls} to the tokenizer.")
        model_args.vpt_added_token_ids += range(size, len(tokenizer))
        model_args.resize_vocab = True


def _checkpoint_encoders(model_args) -> list[str] | None:
    if model_args.vision_encoder_ls is not None:
        return model_args.vision_encoder_ls

    config = loader.load_config(model_args)
    return config.vision_encoder_ls if isinstance(config, VPTConfigMixin) else None


def _wrap_patch_tokenizer(patch_tokenizer):
    @wraps(patch_tokenizer)
    def wrapper(tokenizer, model_args):
        patch_tokenizer(tokenizer, model_args)
        vision_encoder_ls = _checkpoint_encoders(model_args)
        if vision_encoder_ls is not None:
            _add_tokens(tokenizer, model_args, vision_encoder_ls)

    return wrapper


def _wrap_patch_config(patch_config):
    @wraps(patch_config)
    def wrapper(config, tokenizer, model_args, init_kwargs, is_trainable):
        patch_config(config, tokenizer, model_args, init_kwargs, is_trainable)
        values = {name: getattr(model_args, name) for name in VPT_CONFIG_FIELDS}
        values = {name: value for name, value in values.items() if value is not None}
        if not isinstance(config, VPTConfigMixin):
            set_keys = sorted(values) + (["vpt_drop_branches"] if model_args.vpt_drop_branches else [])
            if set_keys:
                raise ValueError(
                    f"{set_keys} are set but {model_args.model_name_or_path} is not a VPT checkpoint "
                    f"(model_type {config.model_type!r}); build one with scripts/prepare_weights.py"
                )
            return

        for name, value in values.items():
            setattr(config, name, value)

        if model_args.vpt_drop_branches:  # else loading refuses weights of branches vision_encoder_ls leaves out
            init_kwargs["drop_branches"] = True

        _add_tokens(tokenizer, model_args, config.vision_encoder_ls, config)
        config.validate_vpt()

    return wrapper


def _wrap_patch_model(patch_model):
    @wraps(patch_model)
    def wrapper(model, tokenizer, model_args, is_trainable, add_valuehead):
        initialised = init_added_token_rows(model, model_args.vpt_added_token_ids)
        if initialised:
            logger.info_rank0(f"Initialised the embeddings of new tokens {initialised} to the mean embedding.")

        patch_model(model, tokenizer, model_args, is_trainable, add_valuehead)

    return wrapper


def _wrap_patch_processor(patch_processor):
    @wraps(patch_processor)
    def wrapper(processor, tokenizer, model_args):
        patch_processor(processor, tokenizer, model_args)
        if isinstance(processor, VPTProcessorMixin):
            processor.image_resolution = model_args.image_resolution  # read by the VPT plugin (the released rule)

    return wrapper


PRIVATE = (
    Private(loader, "patch_processor", ("processor", "tokenizer", "model_args"), patch="image rule"),
    Private(loader, "patch_tokenizer", ("tokenizer", "model_args"), patch="VPT tokens"),
    Private(loader, "patch_config", ("config", "tokenizer", "model_args", "init_kwargs", "is_trainable"),
            patch="VPT config values"),
    Private(loader, "patch_model", ("model", "tokenizer", "model_args", "is_trainable", "add_valuehead"),
            patch="new-token embeddings"),
    Private(loader, "load_config", ("model_args",), patch="the checkpoint's branches"),
    Private(visual, "_register_composite_model", _COMPOSITE_FIELDS, patch="freeze and LoRA keys"),
    Private(visual, "CompositeModel", _COMPOSITE_FIELDS, patch="freeze and LoRA keys of the bases"),
    Private(visual, "COMPOSITE_MODELS", contains=tuple(VPT_BASES), patch="freeze and LoRA keys of the bases"),
    Private(constants, "MROPE_MODELS", contains=tuple(VPT_BASES), patch="M-RoPE positions"),
)


def composite_model_keys(base_name: str) -> dict[str, list[str]]:
    r"""The `_register_composite_model` keys of a VPT model of base ``base_name``: the base's stock entry
    (`visual.COMPOSITE_MODELS`), whose vision keys also freeze the DINOv2 and SAM encoders, and whose LoRA conflict
    keys also keep LoRA off the VPT projectors (they train in full, or through `additional_target`)."""
    stock = visual.COMPOSITE_MODELS[base_name]
    encoders = [branch.encoder_attr for branch in BRANCHES.values() if branch.encoder_attr]
    projectors = [branch.projector_attr for branch in BRANCHES.values()]
    return {
        "projector_keys": list(stock.projector_keys),
        "vision_model_keys": [*stock.vision_model_keys, *encoders],
        "language_model_keys": list(stock.language_model_keys),
        "lora_conflict_keys": [*stock.lora_conflict_keys, *projectors],
    }


def patch() -> None:
    loader.patch_processor = _wrap_patch_processor(loader.patch_processor)
    loader.patch_tokenizer = _wrap_patch_tokenizer(loader.patch_tokenizer)
    loader.patch_config = _wrap_patch_config(loader.patch_config)
    loader.patch_model = _wrap_patch_model(loader.patch_model)
    for base in VPT_BASES.values():
        keys = composite_model_keys(base.name)
        for model_type in base.model_types:
            visual._register_composite_model(model_type=model_type, **keys)
            if base.name in MROPE_MODELS:  # every Qwen-VL base: 3-D (M-RoPE) position ids from `get_rope_index`
                MROPE_MODELS.add(model_type)
