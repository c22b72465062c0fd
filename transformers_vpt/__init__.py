"""Visual Perception Tokens for the Qwen-VL family, as a transformers-compatible package.

Importing the package registers the VPT classes with the transformers Auto classes: Qwen2-VL under the current
model type ``qwen2_vl_vpt`` and under ``vrt_qwen2_vl``, the type the released checkpoints declare; Qwen2.5-VL under
``qwen2_5_vl_vpt``; Qwen3-VL under ``qwen3_vl_vpt``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor

from .models.qwen2_5_vl_vpt import (
    VPT_Qwen2_5_VLConfig,
    VPT_Qwen2_5_VLForConditionalGeneration,
    VPT_Qwen2_5_VLModel,
    VPT_Qwen2_5_VLProcessor,
)
from .models.qwen2_vl_vpt import (
    VPT_Qwen2VLConfig,
    VPT_Qwen2VLForConditionalGeneration,
    VPT_Qwen2VLModel,
    VPTCausalLMOutputWithPast,
    VRT_Qwen2VLConfig,
    VRT_Qwen2VLForConditionalGeneration,
    VRT_Qwen2VLModel,
)
from .models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_Qwen2VLProcessor
from .models.qwen3_vl_vpt import (
    VPT_Qwen3VLConfig,
    VPT_Qwen3VLForConditionalGeneration,
    VPT_Qwen3VLModel,
    VPT_Qwen3VLProcessor,
)
from .pipeline import VPTPipeline, VPTResult
from .vocabulary import add_vpt_tokens

for _config, _base, _model, _processor in (
    (VPT_Qwen2VLConfig, VPT_Qwen2VLModel, VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor),
    (VRT_Qwen2VLConfig, VRT_Qwen2VLModel, VRT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor),
    (VPT_Qwen2_5_VLConfig, VPT_Qwen2_5_VLModel, VPT_Qwen2_5_VLForConditionalGeneration, VPT_Qwen2_5_VLProcessor),
    (VPT_Qwen3VLConfig, VPT_Qwen3VLModel, VPT_Qwen3VLForConditionalGeneration, VPT_Qwen3VLProcessor),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)
    AutoModelForVision2Seq.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)

__all__ = [
    "VPT_Qwen2_5_VLConfig",
    "VPT_Qwen2_5_VLForConditionalGeneration",
    "VPT_Qwen2_5_VLModel",
    "VPT_Qwen2_5_VLProcessor",
    "VPT_Qwen2VLConfig",
    "VPT_Qwen2VLModel",
    "VPT_Qwen2VLForConditionalGeneration",
    "VPTCausalLMOutputWithPast",
    "VPT_Qwen2VLProcessor",
    "VPT_Qwen3VLConfig",
    "VPT_Qwen3VLForConditionalGeneration",
    "VPT_Qwen3VLModel",
    "VPT_Qwen3VLProcessor",
    "VPTPipeline",
    "VPTResult",
    "VRT_Qwen2VLConfig",
    "VRT_Qwen2VLForConditionalGeneration",
    "add_vpt_tokens",
]
