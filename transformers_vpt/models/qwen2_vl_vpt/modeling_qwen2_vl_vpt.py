"""Qwen2-VL with Visual Perception Tokens: the VPT layer (`..vpt.modeling_vpt`) over the stock Qwen2-VL classes."""

from __future__ import annotations

from transformers import Qwen2VLForConditionalGeneration, Qwen2VLModel

from ..vpt.modeling_vpt import (
    EXTRA_IMAGE_INPUTS,
    UNUSED_RELEASED_KEYS,
    ExtraImageFeatures,
    VPTCausalLMOutputWithPast,
    VPTForConditionalGenerationMixin,
    VPTModelMixin,
    VPTModelOutputWithPast,
)
from .configuration_qwen2_vl_vpt import VPT_Qwen2VLConfig, VRT_Qwen2VLConfig


class VPT_Qwen2VLModel(VPTModelMixin, Qwen2VLModel):
    """[`Qwen2VLModel`] (vision tower, language model) plus the re-encoding branches and the two-pass forward."""

    config_class = VPT_Qwen2VLConfig
    _no_split_modules = Qwen2VLModel._no_split_modules + ["Dinov2Layer", "SamVisionLayer"]


class VPT_Qwen2VLForConditionalGeneration(VPTForConditionalGenerationMixin, Qwen2VLForConditionalGeneration):
    """[`VPT_Qwen2VLModel`] with the LM head, the loss and the VPT generation rules."""

    config_class = VPT_Qwen2VLConfig
    vpt_model_class = VPT_Qwen2VLModel
    _no_split_modules = VPT_Qwen2VLModel._no_split_modules


class VRT_Qwen2VLModel(VPT_Qwen2VLModel):
    """The same model under the name the released checkpoints carry (`"model_type": "vrt_qwen2_vl"`)."""

    config_class = VRT_Qwen2VLConfig


class VRT_Qwen2VLForConditionalGeneration(VPT_Qwen2VLForConditionalGeneration):
    """The same model under the name the released checkpoints carry (`"model_type": "vrt_qwen2_vl"`)."""

    config_class = VRT_Qwen2VLConfig
    vpt_model_class = VRT_Qwen2VLModel


__all__ = [
    "EXTRA_IMAGE_INPUTS",
    "UNUSED_RELEASED_KEYS",
    "ExtraImageFeatures",
    "VPTCausalLMOutputWithPast",
    "VPTModelOutputWithPast",
    "VPT_Qwen2VLModel",
    "VPT_Qwen2VLForConditionalGeneration",
    "VRT_Qwen2VLForConditionalGeneration",
    "VRT_Qwen2VLModel",
]
