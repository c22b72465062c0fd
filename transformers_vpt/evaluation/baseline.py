"""A plain base model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as the baseline: `transformers_vpt.pipeline.BaselinePipeline`
(one round, same images and scoring as VPT). Kept here for the evaluation's imports."""

from transformers_vpt.pipeline import BaselinePipeline

__all__ = ["BaselinePipeline"]
