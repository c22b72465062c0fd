"""Qwen3-VL with Visual Perception Tokens: the VPT layer (`..vpt.modeling_vpt`) over the stock Qwen3-VL classes.

What Qwen3-VL adds to the layer: its vision tower returns DeepStack features besides the merged ones
(`get_vision_features` unpacks them), which the layer adds to the hidden states of the first decoder layers at the
image and video positions in both passes, as stock Qwen3-VL does; the clip branch's re-encoded images bring theirs
too (`config.clip_deepstack`). Its checkpoints are already in the current key layout.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

from ...perception import EncodedImages
from ..vpt.modeling_vpt import VPTForConditionalGenerationMixin, VPTModelMixin, vpt_checkpoint_conversion_mapping
from .configuration_qwen3_vl_vpt import VPT_Qwen3VLConfig


class VPT_Qwen3VLModel(VPTModelMixin, Qwen3VLModel):
    """[`Qwen3VLModel`] (vision tower with DeepStack, language model) plus the re-encoding branches and the two-pass
    forward."""

    config_class = VPT_Qwen3VLConfig
    _no_split_modules = Qwen3VLModel._no_split_modules + ["Dinov2Layer", "SamVisionLayer"]

    def get_vision_features(
        self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, videos: bool = False
    ) -> EncodedImages:
        encode = self.get_video_features if videos else self.get_image_features
        features, deepstack = encode(pixel_values, grid_thw)
        return EncodedImages(pixel_values, grid_thw, tuple(features), list(deepstack))


class VPT_Qwen3VLForConditionalGeneration(VPTForConditionalGenerationMixin, Qwen3VLForConditionalGeneration):
    """[`VPT_Qwen3VLModel`] with the LM head, the loss and the VPT generation rules."""

    config_class = VPT_Qwen3VLConfig
    vpt_model_class = VPT_Qwen3VLModel
    _checkpoint_conversion_mapping = vpt_checkpoint_conversion_mapping(legacy_layout=False)
    _no_split_modules = VPT_Qwen3VLModel._no_split_modules


__all__ = ["VPT_Qwen3VLModel", "VPT_Qwen3VLForConditionalGeneration"]
