#!/usr/bin/env python
"""Write the initial VPT checkpoint from local Qwen2-VL, DINOv2 and SAM directories (Hugging Face format).

The output directory holds one `qwen2_vl_vpt` model: Qwen2-VL's weights, the DINOv2 weights as `detection_model.*`,
SAM's `vision_encoder.*` as `seg_model.*`, freshly initialised projectors, and the encoder configs taken from their
directories. Next to it: the tokenizer with the VPT tokens added (their embedding rows set to the mean embedding)
and a `VPT_Qwen2VLProcessor` whose DINOv2/SAM preprocessing is read from the encoders' `preprocessor_config.json`
(the released preprocessing when absent). Everything loads with `from_pretrained`; nothing is downloaded.

Example:
    python scripts/prepare_weights.py --qwen2-vl models/Qwen2-VL-2B-Instruct --dino models/dinov2-large \\
        --vision-encoder-ls dino --output-dir models/Qwen2-VL-2B-VPT-Det-init
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.modeling_utils import load_state_dict

from llamafactory_patches.embeddings import init_added_token_rows
from transformers_vpt import VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor
from transformers_vpt.models.qwen2_vl_vpt.processing_qwen2_vl_vpt import (
    DEFAULT_DETECTION_PROCESSOR_CONFIG,
    DEFAULT_SEG_PROCESSOR_CONFIG,
)
from transformers_vpt.perception import BRANCHES
from transformers_vpt.vocabulary import add_vpt_tokens, normalize_encoder_list

logger = logging.getLogger(__name__)

SAM_VISION_PREFIX = "vision_encoder."
DINOV2_TASK_PREFIX = "dinov2."  # checkpoints saved from a DINOv2 task model (e.g. Dinov2ForImageClassification)
QWEN_CONFIG_KEYS_DROPPED = ("model_type", "architectures", "transformers_version")


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: its `*.safetensors` files, else its `pytorch_model*.bin` files."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors or pytorch_model*.bin weights in {directory}")

    state_dict = {}
    for file in files:
        state_dict.update(load_state_dict(str(file)))

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
        raise ValueError(f"vision_encoder_ls={kinds} needs the local directory of {missing}")

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

    model, info = VPT_Qwen2VLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=qwen_config.dtype, output_loading_info=True
    )
    projectors = tuple(f"{BRANCHES[kind].projector_attr}." for kind in kinds)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen2-vl", required=True, help="Qwen2-VL-2B/7B-Instruct directory")
    parser.add_argument("--vision-encoder-ls", required=True, help="branches to build: dino, sam, clip (comma list)")
    parser.add_argument("--dino", help="DINOv2 directory (Dinov2Model weights), needed for dino")
    parser.add_argument("--sam", help="SAM directory (SamModel weights; vision_encoder.* is used), needed for sam")
    parser.add_argument(
        "--seg-projector-stride", type=int, default=4, help="SAM projector conv kernel and stride (64x64 -> 16x16)"
    )
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_weights(
        args.qwen2_vl, args.output_dir, args.vision_encoder_ls, args.dino, args.sam, args.seg_projector_stride
    )


if __name__ == "__main__":
    main()
