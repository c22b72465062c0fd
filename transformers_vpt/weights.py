"""The initial VPT checkpoint from a local base model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) and DINOv2 / SAM directories
(Hugging Face format).

`prepare_weights` writes one VPT model of the base (`qwen2_vl_vpt`, `qwen2_5_vl_vpt` or `qwen3_vl_vpt`, the bases of
`transformers_vpt.models.bases.VPT_BASES`): the base's weights, the DINOv2 weights as `detection_model.*`, SAM's
`vision_encoder.*` as `seg_model.*`, freshly initialised projectors, and the encoder configs taken from their
directories. Next to it: the tokenizer with the VPT tokens added (their embedding rows set to the mean embedding)
and the base's VPT processor (`VPT_Qwen2VLProcessor`, `VPT_Qwen2_5_VLProcessor`, ...) whose DINOv2/SAM preprocessing is
read from the encoders' `preprocessor_config.json` (the released preprocessing when absent). Everything loads with
`from_pretrained`; nothing is downloaded. The base is the one the base directory's ``config.json`` declares
(``model_type`` ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``); a ``base`` given explicitly must agree with it.
Before loading anything it checks each source's `model_type`, the output directory, and every tensor's shape. The
base's word-embedding tying is kept (Qwen2.5-VL-3B and Qwen3-VL-4B tie them): a tied base gives a tied VPT model.

The command line is ``scripts/prepare_weights.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import load_state_dict

from .errors import VPTUserError, one_line
from .models.bases import VPT_BASES, VPTBase, base_of
from .models.vpt.processing_vpt import DEFAULT_DETECTION_PROCESSOR_CONFIG, DEFAULT_SEG_PROCESSOR_CONFIG
from .perception import BRANCHES
from .vocabulary import add_vpt_tokens, init_added_token_rows, normalize_encoder_list

logger = logging.getLogger(__name__)

SAM_VISION_PREFIX = "vision_encoder."
DINOV2_TASK_PREFIX = "dinov2."  # checkpoints saved from a DINOv2 task model (e.g. Dinov2ForImageClassification)
QWEN_CONFIG_KEYS_DROPPED = ("model_type", "architectures", "transformers_version")
SOURCE_MODEL_TYPES = {"dino": ("dinov2",), "sam": ("sam",), **{name: (name,) for name in VPT_BASES}}
"""The ``model_type`` each source directory must declare: an encoder's, or a base's (its stock type)."""
BASE_MODEL_FLAG = "--base-model"
"""The command-line flag of the base model's directory, for every base."""
SOURCE_FLAGS = {"qwen2_vl": "--qwen2-vl", "dino": "--dino", "sam": "--sam"}
"""The command-line flag of each source that has its own (other bases: `BASE_MODEL_FLAG`)."""
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def source_flag(kind: str) -> str:
    """The command-line flag that names the source ``kind`` (an encoder or a base) in messages."""
    return SOURCE_FLAGS.get(kind, BASE_MODEL_FLAG)


def source_model_type(directory: str | os.PathLike, flag: str) -> str | None:
    """The ``model_type`` of a local checkpoint directory; a clear error (naming ``flag``) when it is none."""
    path = Path(directory)
    if not path.is_dir():
        raise VPTUserError(f"{flag} {directory}: no such directory")
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise VPTUserError(f"{flag} {directory} is not a model directory (no config.json)") from None
    except (OSError, ValueError, AttributeError) as error:
        raise VPTUserError(f"{flag} {directory}: cannot read config.json ({one_line(error)})") from error


def _not_a_base_hint(model_type: str | None) -> str:
    found = base_of(str(model_type))
    if found is not None and model_type != found.name:
        return f" (that is a {found.label} VPT checkpoint; give the plain {found.label} model it starts from)"
    return ""


def check_source(kind: str, directory: str | os.PathLike, flag: str | None = None) -> None:
    """A clear error unless ``directory`` is a local checkpoint directory of the right kind for ``kind`` (``dino``,
    ``sam`` or a base name); ``flag`` names the source in messages (default: `source_flag`)."""
    flag = flag or source_flag(kind)
    model_type = source_model_type(directory, flag)
    if model_type not in SOURCE_MODEL_TYPES[kind]:
        hint, other = "", VPT_BASES.get(str(model_type))
        if kind in VPT_BASES and other is not None:  # the base model of another base
            fix = f"pass --base {other.name} or leave --base out" if flag == BASE_MODEL_FLAG else (
                f"give it with {BASE_MODEL_FLAG} DIR"
            )
            hint = f" (a {other.label} base model: {fix})"
        elif kind in VPT_BASES:
            hint = _not_a_base_hint(model_type)
        raise VPTUserError(
            f"{flag} {directory} holds a {model_type!r} model, expected {' or '.join(SOURCE_MODEL_TYPES[kind])}{hint}"
        )


def resolve_base(base_model: str | os.PathLike, base: str | None = None, flag: str | None = None) -> VPTBase:
    """The base of the base-model directory ``base_model``: the one its ``config.json`` declares (``model_type``
    ``qwen2_vl``, ``qwen2_5_vl``, ...). A given ``base`` must be that one (a `VPTUserError` otherwise)."""
    if base is not None:
        if base not in VPT_BASES:
            raise VPTUserError(f"unknown base {base!r}; choose from {', '.join(VPT_BASES)}")
        check_source(base, base_model, flag or source_flag(base))
        return VPT_BASES[base]
    flag = flag or BASE_MODEL_FLAG
    model_type = source_model_type(base_model, flag)
    if model_type not in VPT_BASES:
        raise VPTUserError(
            f"{flag} {base_model} holds a {model_type!r} model, expected a base model: "
            f"{' or '.join(VPT_BASES)}{_not_a_base_hint(model_type)}"
        )
    return VPT_BASES[model_type]


def check_output_dir(output_dir: str | os.PathLike, sources: list[str | os.PathLike], overwrite: bool = True) -> None:
    """Refuse an output directory that is, or lies inside, a source directory (writing there would replace or mix
    with the source's files); without ``overwrite`` also one that already holds a checkpoint."""
    output = Path(output_dir).resolve()
    for source in sources:
        source_path = Path(source).resolve()
        if output == source_path or source_path in output.parents:
            raise VPTUserError(f"--output-dir {output_dir} is inside the source directory {source}; choose another")
    if output.is_file():
        raise VPTUserError(f"--output-dir {output_dir} is a file")
    if not overwrite and any((output / name).exists() for name in CHECKPOINT_FILES):
        raise VPTUserError(f"--output-dir {output_dir} already holds a checkpoint; choose another or pass --overwrite")


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: its `*.safetensors` files, else its `pytorch_model*.bin` files."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors or pytorch_model*.bin weights in {directory}")

    state_dict = {}
    for file in files:
        try:
            state_dict.update(load_state_dict(str(file)))
        except Exception as error:  # truncated or corrupt files fail in safetensors / torch with many types
            raise VPTUserError(f"cannot read the weights file {file}: {one_line(error)}") from error

    return state_dict


def encoder_weights(kind: str, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder's tensors under the model's module name (`detection_model.*` / `seg_model.*`)."""
    module = BRANCHES[kind].encoder_attr
    weights = load_weights(directory)
    if kind == "sam":
        weights = {
            key.removeprefix(SAM_VISION_PREFIX): value
            for key, value in weights.items()
            if key.startswith(SAM_VISION_PREFIX)
        }
    else:
        weights = {key.removeprefix(DINOV2_TASK_PREFIX): value for key, value in weights.items()}

    return {f"{module}.{key}": value for key, value in weights.items()}


def preprocessing_config(directory: str | os.PathLike | None, defaults: dict) -> dict:
    """`defaults` updated with the keys of `directory/preprocessor_config.json` that it knows."""
    path = Path(directory, "preprocessor_config.json") if directory is not None else None
    if path is None or not path.is_file():
        return dict(defaults)

    saved = json.loads(path.read_text())
    return {**defaults, **{key: value for key, value in saved.items() if key in defaults}}


def prepare_weights(
    base_model: str | os.PathLike,
    output_dir: str | os.PathLike,
    vision_encoder_ls: str | list[str],
    dino: str | os.PathLike | None = None,
    sam: str | os.PathLike | None = None,
    seg_projector_stride: int = 4,
    base: str | None = None,
    base_model_flag: str | None = None,
) -> PreTrainedModel:
    """Build and save the initial VPT checkpoint; returns the model (see the module docstring).

    Args:
        base_model: The local directory of the stock base model (Qwen2-VL-2B-Instruct, Qwen3-VL-4B-Instruct, ...).
        output_dir: A new directory for the VPT checkpoint (not inside a source).
        vision_encoder_ls: Branches to build: ``dino``, ``sam``, ``clip`` (a list or a comma string).
        dino: The DINOv2 directory (`Dinov2Model` weights), needed for ``dino``.
        sam: The SAM directory (`SamModel` weights; ``vision_encoder.*`` is used), needed for ``sam``.
        seg_projector_stride: The SAM projector's conv kernel and stride.
        base: The base (a key of `VPT_BASES`); None: the one ``base_model``'s config declares. Given, it must agree.
        base_model_flag: How messages name ``base_model`` (the command line's flag); default ``--qwen2-vl`` for
            Qwen2-VL, ``--base-model`` otherwise.
    """
    kinds = normalize_encoder_list(vision_encoder_ls)
    entry = resolve_base(base_model, base, base_model_flag)
    encoder_dirs = {"dino": dino, "sam": sam}
    missing = [kind for kind in kinds if kind in encoder_dirs and encoder_dirs[kind] is None]
    if missing:
        raise VPTUserError(
            f"vision_encoder_ls={kinds} needs the local directory of {missing}: "
            + " ".join(f"{SOURCE_FLAGS[kind]} DIR" for kind in missing)
        )
    sources = {kind: encoder_dirs[kind] for kind in kinds if kind in encoder_dirs}
    for kind, directory in sources.items():
        check_source(kind, directory)
    check_output_dir(output_dir, [base_model, *sources.values()])

    base_config = AutoConfig.from_pretrained(base_model)
    fields = {key: value for key, value in base_config.to_dict().items() if key not in QWEN_CONFIG_KEYS_DROPPED}
    if "dino" in kinds:
        fields["detection_config"] = AutoConfig.from_pretrained(dino).to_dict()
    if "sam" in kinds:
        fields["seg_config"] = AutoConfig.from_pretrained(sam).vision_config.to_dict()

    config = entry.config_class.from_dict(
        {**fields, "vision_encoder_ls": kinds, "seg_projector_stride": seg_projector_stride}
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    vocabulary_size = len(tokenizer)
    add_vpt_tokens(tokenizer, config)

    state_dict = load_weights(base_model)
    for kind in kinds:
        if kind in encoder_dirs:
            state_dict.update(encoder_weights(kind, encoder_dirs[kind]))

    check_shapes(config, state_dict, entry.model_class)
    # The source keys are in the checkpoint layout (`detection_model.*` top level, the base's own layout otherwise),
    # which the VPT class's `from_pretrained` maps to module names on every base.
    model, info = entry.model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=base_config.dtype, output_loading_info=True
    )
    projectors = tuple(f"model.{BRANCHES[kind].projector_attr}." for kind in kinds)  # new: not in any source
    not_loaded = [key for key in info["missing_keys"] if not key.startswith(projectors)]
    if not_loaded or info["unexpected_keys"]:
        raise ValueError(f"Checkpoint mismatch: missing {not_loaded}, unexpected {info['unexpected_keys']}")

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    init_added_token_rows(model, range(vocabulary_size, len(tokenizer)))
    if Path(base_model, "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base_model)

    detection_config = preprocessing_config(dino, DEFAULT_DETECTION_PROCESSOR_CONFIG)
    seg_config = preprocessing_config(sam, DEFAULT_SEG_PROCESSOR_CONFIG)
    crop, pad = detection_config["crop_size"], seg_config["pad_size"]
    dino_patch, sam_patch = config.detection_config.patch_size, config.seg_config.patch_size
    base_processor = AutoProcessor.from_pretrained(base_model)
    processor = entry.processor_class(
        image_processor=base_processor.image_processor,
        tokenizer=tokenizer,
        video_processor=base_processor.video_processor,
        detection_processor_config=detection_config,
        seg_processor_config=seg_config,
        detection_image_seqlen=(crop["height"] // dino_patch) * (crop["width"] // dino_patch),
        seg_image_seqlen=(pad["height"] // sam_patch // seg_projector_stride)
        * (pad["width"] // sam_patch // seg_projector_stride),
    )

    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)  # the tokenizer too
    logger.info("Wrote a %s checkpoint with branches %s to %s", config.model_type, kinds, output_dir)
    return model


def check_shapes(
    config: PretrainedConfig, state_dict: dict[str, torch.Tensor], model_class: type[PreTrainedModel] | None = None
) -> None:
    """Name the first source tensor whose shape differs from the model the config describes (meta device, free).
    ``model_class``: the VPT model class of the config's base (default: looked up by its ``model_type``)."""
    if model_class is None:
        model_class = base_of(config.model_type).model_class
    with torch.device("meta"):
        expected = model_class(config).state_dict()
    renamed = {model_class._fix_state_dict_key_on_load(k)[0]: k for k in state_dict}
    mapping = model_class._checkpoint_conversion_mapping
    for key, source_key in renamed.items():
        for pattern, replacement in mapping.items():
            key = re.sub(pattern, replacement, key)
        if key in expected and tuple(expected[key].shape) != tuple(state_dict[source_key].shape):
            raise VPTUserError(
                f"tensor {source_key} has shape {tuple(state_dict[source_key].shape)} but the model built from the "
                f"source configs needs {tuple(expected[key].shape)}; do the weights belong to these config.json files?"
            )
