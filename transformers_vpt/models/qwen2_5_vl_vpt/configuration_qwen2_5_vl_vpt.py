"""Configuration of Qwen2.5-VL with Visual Perception Tokens."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

from ..vpt.configuration_vpt import VPT_SUB_CONFIGS, VPTConfigMixin


class VPT_Qwen2_5_VLConfig(VPTConfigMixin, Qwen2_5_VLConfig):
    r"""
    Configuration of [`VPT_Qwen2_5_VLForConditionalGeneration`]: a [`Qwen2_5_VLConfig`] plus the Visual Perception
    Token fields (see [`VPTConfigMixin`]).
    """

    model_type = "qwen2_5_vl_vpt"
    sub_configs = {**Qwen2_5_VLConfig.sub_configs, **VPT_SUB_CONFIGS}


__all__ = ["VPT_Qwen2_5_VLConfig"]
