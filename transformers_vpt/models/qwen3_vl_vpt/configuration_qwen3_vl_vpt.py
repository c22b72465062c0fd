"""Configuration of Qwen3-VL with Visual Perception Tokens."""

from __future__ import annotations

from transformers import Qwen3VLConfig

from ..vpt.configuration_vpt import VPT_SUB_CONFIGS, VPTConfigMixin


class VPT_Qwen3VLConfig(VPTConfigMixin, Qwen3VLConfig):
    r"""
    Configuration of [`VPT_Qwen3VLForConditionalGeneration`]: a [`Qwen3VLConfig`] plus the Visual Perception Token
    fields (see [`VPTConfigMixin`]).

    Args:
        clip_deepstack (`bool`, *optional*, defaults to `True`):
            Whether an image re-encoded by the clip branch (Qwen3-VL's own vision tower) also brings its DeepStack
            features, added to the hidden states of the first decoder layers at its pad positions, as Qwen3-VL does
            for the images of the prompt. DINOv2 and SAM features enter the input embeddings only.
    """

    model_type = "qwen3_vl_vpt"
    sub_configs = {**Qwen3VLConfig.sub_configs, **VPT_SUB_CONFIGS}

    def __init__(self, *args, clip_deepstack: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(clip_deepstack, bool):
            raise ValueError(f"clip_deepstack must be true or false, got {clip_deepstack!r}")
        self.clip_deepstack = clip_deepstack


__all__ = ["VPT_Qwen3VLConfig"]
