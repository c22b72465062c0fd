from .configuration_qwen3_vl_vpt import VPT_Qwen3VLConfig
from .modeling_qwen3_vl_vpt import VPT_Qwen3VLForConditionalGeneration, VPT_Qwen3VLModel
from .processing_qwen3_vl_vpt import VPT_Qwen3VLProcessor

__all__ = [
    "VPT_Qwen3VLConfig",
    "VPT_Qwen3VLForConditionalGeneration",
    "VPT_Qwen3VLModel",
    "VPT_Qwen3VLProcessor",
]
