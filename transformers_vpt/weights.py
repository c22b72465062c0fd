"""The initial VPT checkpoint from local Qwen2-VL, DINOv2 and SAM directories (Hugging Face format).

`prepare_weights` writes one `qwen2_vl_vpt` model: Qwen2-VL's weights, the DINOv2 weights as `detection_model.*`,
SAM's `vision_encoder.*` as `seg_model.*`, freshly initialised projectors, and the encoder configs taken from their
directories. Next to it: the tokenizer with the VPT tokens added (their embedding rows set to the mean embedding)
and a `VPT_Qwen2VLProcessor` whose DINOv2/SAM preprocessing is read from the encoders' `preprocessor_config.json`
(the released preprocessing when absent). Everything loads with `from_pretrained`; nothing is downloaded. Before
loading anything it checks each source's `model_type`, the output directory, and every tensor's shape.

The command line is ``scripts/prepare_weights.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.modeling_utils import load_state_dict

from .errors import VPTUserError, one_line
from .models.qwen2_vl_vpt import VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration
from .models.qwen2_vl_vpt.processing_qwen2_vl_vpt import (
    DEFAULT_DETECTION_PROCESSOR_CONFIG,
    DEFAULT_SEG_PROCESSOR_CONFIG,
    VPT_Qwen2VLProcessor,
)
from .perception import BRANCHES
from .vocabulary import add_vpt_tokens, init_added_token_rows, normalize_encoder_list

logger = logging.getLogger(__name__)

SAM_VISION_PREFIX = "vision_encoder."
DINOV2_TASK_PREFIX = "dinov2."  # checkpoints saved from a DINOv2 task model (e.g. Dinov2ForImageClassification)
QWEN_CONFIG_KEYS_DROPPED = ("model_type", "architectures", "transformers_version")
SOURCE_MODEL_TYPES = {"qwen2_vl": ("qwen2_vl",), "dino": ("dinov2",), "sam": ("sam",)}
"""The ``model_type`` each source directory must declare."""
SOURCE_FLAGS = {"qwen2_vl": "--qwen2-vl", "dino": "--dino", "sam": "--sam"}
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_source(kind: str, directory: str | os.PathLike) -> None:
    """A clear error unless ``directory`` is a local checkpoint directory of the right kind for ``kind``."""
    flag, path = SOURCE_FLAGS[kind], Path(directory)
    if not path.is_dir():
        raise VPTUserError(f"{flag} {directory}: no such directory")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise VPTUserError(f"{flag} {directory} is not a model directory (no config.json)") from None
    except (OSError, ValueError, AttributeError) as error:
        raise VPTUserError(f"{flag} {directory}: cannot read config.json ({one_line(error)})") from error
    if model_type not in SOURCE_MODEL_TYPES[kind]:
        raise VPTUserError(
            f"{flag} {directory} holds a {model_type!r} model, expected {' or '.join(SOURCE_MODEL_TYPES[kind])}"
        )


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
    qwen2_vl: str | os.PathLike,
    output_dir: str | os.PathLike,
    vision_encoder_ls: str | list[str],
    dino: str | os.PathLike | None = None,
    sam: str | os.PathLike | None = None,
    seg_projector_stride: int = 4,
) -> VPT_Qwen2VLForConditionalGeneration:
    """Build and save the initial VPT checkpoint; returns the model (see the module docstring)."""
    kinds = normalize_encoder_list(vision_encoder_ls)
    encoder_dirs = {"dino": dino, "sam": sam}
    missing = [kind for kind in kinds if kind in encoder_dirs and encoder_dirs[kind] is None]
    if missing:
        raise VPTUserError(
            f"vision_encoder_ls={kinds} needs the local directory of {missing}: "
            + " ".join(f"{SOURCE_FLAGS[kind]} DIR" for kind in missing)
        )
    sources = {"qwen2_vl": qwen2_vl, **{kind: encoder_dirs[kind] for kind in kinds if kind in encoder_dirs}}
    for kind, directory in sources.items():
        check_source(kind, directory)
    check_output_dir(output_dir, list(sources.values()))

    qwen_config = AutoConfig.from_pretrained(qwen2_vl)
    fields = {key: value for key, value in qwen_config.to_dict().items() if key not in QWEN_CONFIG_KEYS_DROPPED}
    if "dino" in kinds:
        fields["detection_config"] = AutoConfig.from_pretrained(dino).to_dict()
    if "sam" in kinds:
        fields["seg_config"] = AutoConfig.from_pretrained(sam).vision_config.to_dict()

    config = VPT_Qwen2VLConfig.from_dict(
        {**fields, "vision_encoder_ls": kinds, "seg_projector_stride": seg_projector_stride}
    )
    tokenizer = AutoTokenizer.from_pretrained(qwen2_vl)
    vocabulary_size = len(tokenizer)
    add_vpt_tokens(tokenizer, config)

    state_dict = load_weights(qwen2_vl)
    for kind in kinds:
        if kind in encoder_dirs:
            state_dict.update(encoder_weights(kind, encoder_dirs[kind]))

    check_shapes(config, state_dict)
    model, info = VPT_Qwen2VLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=qwen_config.dtype, output_loading_info=True
    )
    projectors = tuple(f"model.{BRANCHES[kind].projector_attr}." for kind in kinds)  # new: not in any source
    not_loaded = [key for key in info["missing_keys"] if not key.startswith(projectors)]
    if not_loaded or info["unexpected_keys"]:
        raise ValueError(f"Checkpoint mismatch: missing {not_loaded}, unexpected {info['unexpected_keys']}")

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    init_added_token_rows(model, range(vocabulary_size, len(tokenizer)))
    if Path(qwen2_vl, "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(qwen2_vl)

    detection_config = preprocessing_config(dino, DEFAULT_DETECTION_PROCESSOR_CONFIG)
    seg_config = preprocessing_config(sam, DEFAULT_SEG_PROCESSOR_CONFIG)
    crop, pad = detection_config["crop_size"], seg_config["pad_size"]
    dino_patch, sam_patch = config.detection_config.patch_size, config.seg_config.patch_size
    qwen_processor = AutoProcessor.from_pretrained(qwen2_vl)
    processor = VPT_Qwen2VLProcessor(
        image_processor=qwen_processor.image_processor,
        tokenizer=tokenizer,
        video_processor=qwen_processor.video_processor,
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


def check_shapes(config: VPT_Qwen2VLConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Name the first source tensor whose shape differs from the model the config describes (meta device, free)."""
    with torch.device("meta"):
        expected = VPT_Qwen2VLForConditionalGeneration(config).state_dict()
    renamed = {VPT_Qwen2VLForConditionalGeneration._fix_state_dict_key_on_load(k)[0]: k for k in state_dict}
    mapping = VPT_Qwen2VLForConditionalGeneration._checkpoint_conversion_mapping
    for key, source_key in renamed.items():
        for pattern, replacement in mapping.items():
            key = re.sub(pattern, replacement, key)
        if key in expected and tuple(expected[key].shape) != tuple(state_dict[source_key].shape):
            raise VPTUserError(
                f"tensor {source_key} has shape {tuple(state_dict[source_key].shape)} but the model built from the "
                f"source configs needs {tuple(expected[key].shape)}; do the weights belong to these config.json files?"
            )
