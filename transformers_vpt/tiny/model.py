"""Tiny VPT configurations for tests, the demo and CPU benchmarks: every branch, built in milliseconds."""

from __future__ import annotations

from ..models.qwen2_5_vl_vpt.configuration_qwen2_5_vl_vpt import VPT_Qwen2_5_VLConfig
from ..models.qwen2_vl_vpt import VPT_Qwen2VLConfig
from ..models.qwen3_vl_vpt import VPT_Qwen3VLConfig
from .processor import (
    TINY_DETECTION_IMAGE_SEQLEN,
    TINY_DINO_CROP_SIZE,
    TINY_DINO_PATCH_SIZE,
    TINY_MERGE_SIZE,
    TINY_PATCH_SIZE,
    TINY_SAM_IMAGE_SIZE,
    TINY_SAM_PATCH_SIZE,
    TINY_SEG_IMAGE_SEQLEN,
    TINY_TEMPORAL_PATCH_SIZE,
)
from .tokenizer import TINY_VOCAB_SIZE

TINY_TEXT = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    rope_theta=10000.0,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=TINY_PATCH_SIZE,
    spatial_merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
)
TINY_VISION_2_5 = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=TINY_TEXT["hidden_size"],
    patch_size=TINY_PATCH_SIZE, spatial_merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
    window_size=56, fullatt_block_indexes=[1],
)
"""Qwen2.5-VL's vision tower at the tiny sizes: window attention (56 px windows) in block 0, full attention in 1."""
TINY_VISION_3 = dict(
    depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_TEXT["hidden_size"],
    patch_size=TINY_PATCH_SIZE, spatial_merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
    num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
)
"""Qwen3-VL's vision tower at the tiny sizes: DeepStack features from blocks 0 and 1 (added after decoder layers 0
and 1), learned position embeddings on an 8x8 grid."""
TINY_TEXT_3 = {
    **TINY_TEXT,
    "head_dim": TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"],
    "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
}
"""Qwen3-VL's text model at the tiny sizes: `TINY_TEXT` with its interleaved M-RoPE and an explicit head size."""
TINY_BASES = {
    "qwen2_vl": (VPT_Qwen2VLConfig, TINY_VISION, TINY_TEXT),
    "qwen2_5_vl": (VPT_Qwen2_5_VLConfig, TINY_VISION_2_5, TINY_TEXT),
    "qwen3_vl": (VPT_Qwen3VLConfig, TINY_VISION_3, TINY_TEXT_3),
}
"""Per base: the VPT config class, the tiny vision config and the tiny text config."""
# DINOv2 at 28x28 input -> 2x2 = 4 patch tokens; SAM at 64x64 -> 4x4 map -> 16 tokens with stride 1: exactly the pad
# counts of the tiny processor.
TINY_DINO = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=TINY_DINO_CROP_SIZE,
    patch_size=TINY_DINO_PATCH_SIZE,
)
TINY_SAM = dict(
    hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=TINY_SAM_IMAGE_SIZE,
    patch_size=TINY_SAM_PATCH_SIZE, mlp_dim=64, window_size=2, global_attn_indexes=[1], num_pos_feats=8,
)
TINY_DINO_TOKENS = TINY_DETECTION_IMAGE_SEQLEN
TINY_SAM_TOKENS = TINY_SEG_IMAGE_SEQLEN


def tiny_config(
    vision_encoder_ls=("dino", "sam", "clip"), token_ids: dict | None = None, base: str = "qwen2_vl", **overrides
):
    """A tiny VPT config of ``base`` (a key of `TINY_BASES`). `token_ids` are the VPT id fields (see
    `vocabulary.fill_config_token_ids`)."""
    if base not in TINY_BASES:
        raise ValueError(f"unknown base {base!r}; choose from {sorted(TINY_BASES)}")
    config_class, vision, text = TINY_BASES[base]
    fields = dict(
        text_config=text,
        vision_config=vision,
        detection_config=TINY_DINO,
        seg_config=TINY_SAM,
        vision_encoder_ls=list(vision_encoder_ls),
        seg_projector_stride=1,
        num_inner_forward_run=2,
        tie_word_embeddings=False,
    )
    fields.update(token_ids or {})
    fields.update(overrides)
    return config_class(**fields)
