"""The Qwen-VL bases VPT runs on: one entry per base, the single place that lists them.

Everything that differs by base (which classes to build, which stock checkpoints are its baseline, which
LLaMA-Factory template trains it) is looked up here, by the base's name or by a config's ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from .qwen2_5_vl_vpt import VPT_Qwen2_5_VLConfig, VPT_Qwen2_5_VLForConditionalGeneration, VPT_Qwen2_5_VLProcessor
from .qwen2_vl_vpt import VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration, VRT_Qwen2VLConfig
from .qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_Qwen2VLProcessor
from .qwen3_vl_vpt import VPT_Qwen3VLConfig, VPT_Qwen3VLForConditionalGeneration, VPT_Qwen3VLProcessor


@dataclass(frozen=True)
class VPTBase:
    """One Qwen-VL base: its stock classes and their VPT counterparts."""

    name: str
    """The base's key and its stock ``model_type`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``)."""
    label: str
    """How people write it (``Qwen2-VL``)."""
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    stock_model_class: type[PreTrainedModel]
    stock_processor_class: type[ProcessorMixin]
    template: str
    """The LLaMA-Factory template of its VPT models."""
    model_types: tuple[str, ...] = ()
    """Every VPT ``model_type`` of the base (the released name included)."""
    stock_template: str = "qwen2_vl"
    """The LLaMA-Factory 0.9.5 template its VPT template is built from (0.9.5 formats Qwen2.5-VL with `qwen2_vl`)."""
    template_variants: tuple[tuple[str, str], ...] = ()
    """Further (VPT template, stock template) pairs of the base (Qwen3-VL's no-think template)."""
    released_labels: bool = True
    """Whether its VPT templates supervise turns as the released models were trained (LLaMA-Factory 0.9.1's
    `qwen2_vl` labels, see `llamafactory_patches.template`); False keeps the stock template's labels."""

    @property
    def templates(self) -> dict[str, str]:
        """Every VPT template of the base and the stock template it is built from."""
        return {self.template: self.stock_template, **dict(self.template_variants)}


VPT_BASES: dict[str, VPTBase] = {
    base.name: base
    for base in (
        VPTBase(
            "qwen2_vl", "Qwen2-VL", VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor,
            Qwen2VLForConditionalGeneration, Qwen2VLProcessor, "vpt_qwen2_vl",
            (VPT_Qwen2VLConfig.model_type, VRT_Qwen2VLConfig.model_type),
        ),
        VPTBase(
            "qwen2_5_vl", "Qwen2.5-VL", VPT_Qwen2_5_VLConfig, VPT_Qwen2_5_VLForConditionalGeneration,
            VPT_Qwen2_5_VLProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, "vpt_qwen2_5_vl",
            (VPT_Qwen2_5_VLConfig.model_type,),
        ),
        VPTBase(
            "qwen3_vl", "Qwen3-VL", VPT_Qwen3VLConfig, VPT_Qwen3VLForConditionalGeneration, VPT_Qwen3VLProcessor,
            Qwen3VLForConditionalGeneration, Qwen3VLProcessor, "vpt_qwen3_vl", (VPT_Qwen3VLConfig.model_type,),
            stock_template="qwen3_vl", template_variants=(("vpt_qwen3_vl_nothink", "qwen3_vl_nothink"),),
            released_labels=False,
        ),
    )
}
"""The supported bases, by name."""


def base_of(model_type: str) -> VPTBase | None:
    """The base of a VPT ``model_type`` (``qwen2_5_vl_vpt``) or of a stock one (``qwen2_5_vl``); None if neither."""
    for base in VPT_BASES.values():
        if model_type == base.name or model_type in base.model_types:
            return base
    return None


def get_base(name: str) -> VPTBase:
    """The base called ``name``; an unknown name is a `ValueError` that lists the known ones."""
    if name not in VPT_BASES:
        raise ValueError(f"unknown base {name!r}; choose from {', '.join(VPT_BASES)}")
    return VPT_BASES[name]


__all__ = ["VPT_BASES", "VPTBase", "base_of", "get_base"]
