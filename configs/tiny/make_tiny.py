#!/usr/bin/env python
"""Build everything the tiny recipes of this directory read, offline, in a few seconds.

Written into ``--out-dir`` (default ``outputs/tiny``, where the recipes look):

* ``sources/qwen2-vl``, ``sources/dinov2``, ``sources/sam``: tiny random Qwen2-VL, DINOv2 and SAM models in the
  Hugging Face layout of the real ones (safetensors, or ``.bin`` with ``--bin``), with their preprocessor configs;
* ``vpt-init``: the VPT checkpoint ``scripts/prepare_weights.py`` makes from them (dino, sam and clip branches);
* ``data``: a tiny synthetic dataset in the released JSON format with its ``dataset_info.json``.

Run from the repository root: ``python configs/tiny/make_tiny.py``, then e.g.
``llamafactory-cli train configs/tiny/alignment.yaml``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SamConfig,
    SamImageProcessor,
    SamModel,
)

from transformers_vpt.tiny import build_tiny_processor, build_tiny_tokenizer
from transformers_vpt.tiny.model import TINY_DINO, TINY_SAM, TINY_TEXT, TINY_VISION
from transformers_vpt.tiny.processor import TINY_DETECTION_PROCESSOR_CONFIG, TINY_SEG_PROCESSOR_CONFIG

ROOT = Path(__file__).resolve().parents[2]
DATA_OPTIONS = dict(train_size=16, test_size=4, alignment_size=8, image_size=112, distractors=2)
TINY_SAM_PROMPT = dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4, num_point_embeddings=4)
TINY_SAM_DECODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_sources(out_dir: str | Path, safe_serialization: bool = True) -> dict[str, Path]:
    """Tiny random source models as the real ones are published; returns their directories by kind."""
    out = Path(out_dir)
    dirs = {"qwen2_vl": out / "qwen2-vl", "dino": out / "dinov2", "sam": out / "sam"}

    tokenizer = build_tiny_tokenizer(vision_encoder_ls=(), with_regions=False)
    special_ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("vision_start", "vision_end", "image_pad", "video_pad")
    }
    config = Qwen2VLConfig(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        vision_start_token_id=special_ids["vision_start_token_id"],
        vision_end_token_id=special_ids["vision_end_token_id"],
        image_token_id=special_ids["image_pad_token_id"],
        video_token_id=special_ids["video_pad_token_id"],
        tie_word_embeddings=False,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(dirs["qwen2_vl"], safe_serialization=safe_serialization)
    tiny = build_tiny_processor(tokenizer)
    Qwen2VLProcessor(tiny.image_processor, tokenizer, tiny.video_processor).save_pretrained(dirs["qwen2_vl"])

    Dinov2Model(Dinov2Config(**TINY_DINO)).save_pretrained(dirs["dino"], safe_serialization=safe_serialization)
    BitImageProcessor(**TINY_DETECTION_PROCESSOR_CONFIG).save_pretrained(dirs["dino"])

    sam_config = SamConfig(
        vision_config=TINY_SAM, prompt_encoder_config=TINY_SAM_PROMPT, mask_decoder_config=TINY_SAM_DECODER
    )
    SamModel(sam_config).save_pretrained(dirs["sam"], safe_serialization=safe_serialization)
    SamImageProcessor(**TINY_SEG_PROCESSOR_CONFIG).save_pretrained(dirs["sam"])
    return dirs


def make_tiny(out_dir: str | Path, safe_serialization: bool = True, data: bool = True) -> dict[str, Path]:
    """Sources, the VPT checkpoint and (with ``data``) the dataset (see the module docstring); returns their
    directories."""
    out = Path(out_dir)
    sources = build_sources(out / "sources", safe_serialization)
    _load_script("prepare_weights").prepare_weights(
        sources["qwen2_vl"],
        out / "vpt-init",
        vision_encoder_ls=["dino", "sam", "clip"],
        dino=sources["dino"],
        sam=sources["sam"],
        seg_projector_stride=1,
    )
    if not data:
        return {**sources, "model": out / "vpt-init"}

    _load_script("make_synthetic_data").generate(out / "data", **DATA_OPTIONS)
    return {**sources, "model": out / "vpt-init", "data": out / "data"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="outputs/tiny")
    parser.add_argument("--bin", action="store_true", help="save the source models as pytorch_model.bin")
    parser.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the tiny synthetic dataset into OUT_DIR/data (--no-data: the models only)",
    )
    args = parser.parse_args(argv)
    for name, path in make_tiny(args.out_dir, safe_serialization=not args.bin, data=args.data).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
