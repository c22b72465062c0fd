"""Visual Perception Tokens for Qwen2-VL, as a transformers-compatible package.

Importing the package registers the VPT classes with the transformers Auto classes, under the current model type
``qwen2_vl_vpt`` and under ``vrt_qwen2_vl``, the type the released checkpoints declare.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor

from .models.qwen2_vl_vpt import (
    VPT_Qwen2VLConfig,
    VPT_Qwen2VLForConditionalGeneration,
    VPTCausalLMOutputWithPast,
    VRT_Qwen2VLConfig,
    VRT_Qwen2VLForConditionalGeneration,
)
from .models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_Qwen2VLProcessor
from .pipeline import VPTPipeline, VPTResult
from .vocabulary import add_vpt_tokens

for _config, _model in (
    (VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration),
    (VRT_Qwen2VLConfig, VRT_Qwen2VLForConditionalGeneration),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)
    AutoModelForVision2Seq.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, VPT_Qwen2VLProcessor, exist_ok=True)

__all__ = [
    "VPT_Qwen2VLConfig",
    "VPT_Qwen2VLForConditionalGeneration",
    "VPTCausalLMOutputWithPast",
    "VPT_Qwen2VLProcessor",
    "VPTPipeline",
    "VPTResult",
    "VRT_Qwen2VLConfig",
    "VRT_Qwen2VLForConditionalGeneration",
    "add_vpt_tokens",
]
