from .configuration_qwen2_5_vl_vpt import VPT_Qwen2_5_VLConfig
from .modeling_qwen2_5_vl_vpt import VPT_Qwen2_5_VLForConditionalGeneration, VPT_Qwen2_5_VLModel
from .processing_qwen2_5_vl_vpt import VPT_Qwen2_5_VLProcessor

__all__ = [
    "VPT_Qwen2_5_VLConfig",
    "VPT_Qwen2_5_VLForConditionalGeneration",
    "VPT_Qwen2_5_VLModel",
    "VPT_Qwen2_5_VLProcessor",
]
