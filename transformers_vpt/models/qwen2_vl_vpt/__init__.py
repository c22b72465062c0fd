from .configuration_qwen2_vl_vpt import VPT_Qwen2VLConfig, VRT_Qwen2VLConfig
from .modeling_qwen2_vl_vpt import (
    VPT_Qwen2VLForConditionalGeneration,
    VPT_Qwen2VLModel,
    VPTCausalLMOutputWithPast,
    VRT_Qwen2VLForConditionalGeneration,
    VRT_Qwen2VLModel,
)

__all__ = [
    "VPT_Qwen2VLConfig",
    "VRT_Qwen2VLConfig",
    "VPT_Qwen2VLForConditionalGeneration",
    "VPT_Qwen2VLModel",
    "VRT_Qwen2VLForConditionalGeneration",
    "VRT_Qwen2VLModel",
    "VPTCausalLMOutputWithPast",
]
