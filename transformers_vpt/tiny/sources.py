"""Everything the tiny recipes (configs/tiny) read, offline, in a few seconds: `make_tiny`.

Written into ``out_dir``:

* ``sources/qwen2-vl`` (or ``sources/qwen2.5-vl``, by ``base``), ``sources/dinov2``, ``sources/sam``: tiny random
  stock base (Qwen2-VL, Qwen2.5-VL or Qwen3-VL), DINOv2 and SAM models in the Hugging Face layout of the real ones
  (safetensors, or ``.bin``), with their processor configs (`build_sources`);
* ``vpt-init``: the VPT checkpoint of that base `transformers_vpt.weights.prepare_weights` makes from them (dino,
  sam and clip branches);
* ``data``: a tiny synthetic dataset in the released JSON format with its ``dataset_info.json``
  (`transformers_vpt.tiny.synthetic`).

The command line is ``configs/tiny/make_tiny.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, SamConfig, SamImageProcessor, SamModel

from ..models.bases import get_base
from ..weights import prepare_weights
from .assemble import build_tiny_base
from .model import TINY_BASES, TINY_DINO, TINY_SAM
from .processor import TINY_DETECTION_PROCESSOR_CONFIG, TINY_SEG_PROCESSOR_CONFIG
from .synthetic import generate

DATA_OPTIONS = {"train_size": 16, "test_size": 4, "alignment_size": 8, "image_size": 112, "distractors": 2}
TINY_SAM_PROMPT = {"hidden_size": 16, "image_size": 64, "patch_size": 16, "mask_input_channels": 4,
                   "num_point_embeddings": 4}
TINY_SAM_DECODER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 32,
                    "iou_head_hidden_dim": 16}


def build_sources(
    out_dir: str | os.PathLike,
    safe_serialization: bool = True,
    base: str = "qwen2_vl",
    text_config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Tiny random source models as the real ones are published; returns their directories by kind: ``base`` (its
    name, e.g. ``"qwen2_vl"``: the stock model of `build_tiny_base`, in ``qwen2-vl`` / ``qwen2.5-vl``), ``"dino"``
    and ``"sam"``. ``text_config`` overrides fields of the base's tiny text config (e.g. ``{"rope_theta": 10.0}``,
    the demo's)."""
    out = Path(out_dir)
    dirs = {base: out / get_base(base).label.lower(), "dino": out / "dinov2", "sam": out / "sam"}

    # Unseeded, and without eos/pad ids in the config: the generation config the demo's models have always had.
    build_tiny_base(
        base,
        seed=None,
        save_dir=dirs[base],
        safe_serialization=safe_serialization,
        eos_token_id=None,
        pad_token_id=None,
        **({"text_config": {**TINY_BASES[base][2], **text_config}} if text_config else {}),
    )

    Dinov2Model(Dinov2Config(**TINY_DINO)).save_pretrained(dirs["dino"], safe_serialization=safe_serialization)
    BitImageProcessor(**TINY_DETECTION_PROCESSOR_CONFIG).save_pretrained(dirs["dino"])

    sam_config = SamConfig(
        vision_config=TINY_SAM, prompt_encoder_config=TINY_SAM_PROMPT, mask_decoder_config=TINY_SAM_DECODER
    )
    SamModel(sam_config).save_pretrained(dirs["sam"], safe_serialization=safe_serialization)
    SamImageProcessor(**TINY_SEG_PROCESSOR_CONFIG).save_pretrained(dirs["sam"])
    return dirs


def make_tiny(
    out_dir: str | os.PathLike,
    safe_serialization: bool = True,
    data: bool = True,
    base: str = "qwen2_vl",
    text_config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Sources, the VPT checkpoint of ``base`` and (with ``data``) the dataset (see the module docstring); returns
    their directories (the keys of `build_sources`, ``"model"`` and ``"data"``). ``text_config``: see
    `build_sources`; the VPT checkpoint inherits it."""
    out = Path(out_dir)
    sources = build_sources(out / "sources", safe_serialization, base=base, text_config=text_config)
    prepare_weights(
        sources[base],
        out / "vpt-init",
        vision_encoder_ls=["dino", "sam", "clip"],
        dino=sources["dino"],
        sam=sources["sam"],
        seg_projector_stride=1,
        base=base,
    )
    if not data:
        return {**sources, "model": out / "vpt-init"}

    generate(out / "data", **DATA_OPTIONS)
    return {**sources, "model": out / "vpt-init", "data": out / "data"}
