"""Configuration of Qwen2-VL with Visual Perception Tokens."""

from __future__ import annotations

from transformers import Qwen2VLConfig

from ..vpt.configuration_vpt import DINOV2_LARGE, SAM_VIT_LARGE, TOKEN_ID_FIELDS, VPT_SUB_CONFIGS, VPTConfigMixin


class VPT_Qwen2VLConfig(VPTConfigMixin, Qwen2VLConfig):
    r"""
    Configuration of [`VPT_Qwen2VLForConditionalGeneration`]: a [`Qwen2VLConfig`] plus the Visual Perception Token
    fields (see [`VPTConfigMixin`]).
    """

    model_type = "qwen2_vl_vpt"
    sub_configs = {**Qwen2VLConfig.sub_configs, **VPT_SUB_CONFIGS}


class VRT_Qwen2VLConfig(VPT_Qwen2VLConfig):
    """The same configuration under the name the released checkpoints carry (`"model_type": "vrt_qwen2_vl"`)."""

    model_type = "vrt_qwen2_vl"


__all__ = ["VPT_Qwen2VLConfig", "VRT_Qwen2VLConfig", "DINOV2_LARGE", "SAM_VIT_LARGE", "TOKEN_ID_FIELDS"]
