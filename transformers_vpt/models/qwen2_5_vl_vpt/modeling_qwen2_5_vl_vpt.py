"""Qwen2.5-VL with Visual Perception Tokens: the VPT layer (`..vpt.modeling_vpt`) over the stock Qwen2.5-VL classes.

What Qwen2.5-VL adds to the layer: its vision tower (window attention, `fullatt_block_indexes`), which also serves
the clip branch, and `second_per_grid_ts`, an input of its `get_rope_index`.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from ..vpt.modeling_vpt import VPTForConditionalGenerationMixin, VPTModelMixin
from .configuration_qwen2_5_vl_vpt import VPT_Qwen2_5_VLConfig


class VPT_Qwen2_5_VLModel(VPTModelMixin, Qwen2_5_VLModel):
    """[`Qwen2_5_VLModel`] (vision tower, language model) plus the re-encoding branches and the two-pass forward."""

    config_class = VPT_Qwen2_5_VLConfig
    rope_index_inputs = ("second_per_grid_ts",)
    _no_split_modules = Qwen2_5_VLModel._no_split_modules + ["Dinov2Layer", "SamVisionLayer"]


class VPT_Qwen2_5_VLForConditionalGeneration(VPTForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """[`VPT_Qwen2_5_VLModel`] with the LM head, the loss and the VPT generation rules."""

    config_class = VPT_Qwen2_5_VLConfig
    vpt_model_class = VPT_Qwen2_5_VLModel
    _no_split_modules = VPT_Qwen2_5_VLModel._no_split_modules


__all__ = ["VPT_Qwen2_5_VLModel", "VPT_Qwen2_5_VLForConditionalGeneration"]
