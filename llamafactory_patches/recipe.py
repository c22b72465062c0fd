"""Whether the command line of this process runs a VPT recipe, read as LLaMA-Factory reads it, without importing it.

Used where the patches cannot take part and must say so rather than let a VPT recipe run without them: under
``USE_V1=1`` (LLaMA-Factory's experimental v1 stack, which the patches do not reach) and when the installed
LLaMA-Factory is not the tested release. A run that is not VPT is left alone in both cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VPT_TEMPLATES = ("vpt_qwen2_vl", "vpt_qwen2_5_vl", "vpt_qwen3_vl", "vpt_qwen3_vl_nothink")
"""LLaMA-Factory templates of VPT models (every `VPTBase.templates` of `transformers_vpt.models.bases.VPT_BASES`,
written out so that this module imports nothing; a test holds the two equal)."""
VPT_KEYS = (
    "vision_encoder_ls",
    "num_inner_forward_run",
    "para_mask_id",
    "para_mask_ratio",
    "projector_scale",
    "image_resolution",
    "vpt_drop_branches",
    "vpt_skip_bad_records",
)
"""YAML keys only the VPT argument classes (`args.VPTModelArguments`, `args.VPTDataArguments`) know."""
VPT_MODEL_TYPES = ("qwen2_vl_vpt", "vrt_qwen2_vl", "qwen2_5_vl_vpt", "qwen3_vl_vpt")
"""``model_type`` of VPT checkpoints (every `VPTBase.model_types`; written out, held to `VPT_BASES` by a test)."""
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _load(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def recipe_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """The ``key: value`` arguments of a `llamafactory-cli` command line (``argv`` without the program): a YAML or
    JSON file among the first two words (the command may precede it) merged with ``key=value`` overrides, or
    ``--key value`` / ``--key=value`` words. Unreadable files read as no arguments (LLaMA-Factory reports them)."""
    words = list(argv)
    for i, word in enumerate(words[:2]):
        if word.endswith(CONFIG_SUFFIXES):
            try:
                values = _load(Path(word))
            except Exception:  # LLaMA-Factory's own parser reports a missing or broken file
                return {}
            if not isinstance(values, dict):
                return {}
            for override in words[i + 1 :]:
                key, sep, value = override.partition("=")
                if sep:
                    values[key.lstrip("-")] = value
            return values

    values: dict[str, Any] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            key, sep, value = word[2:].partition("=")
            values[key] = value if sep else (words[i + 1] if i + 1 < len(words) else True)
    return values


def _model_type(path: Any) -> str | None:
    config = Path(str(path)) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def vpt_markers(argv: Sequence[str]) -> list[str]:
    """What makes the command line a VPT run (empty when nothing does): a VPT template, VPT keys, or a local VPT
    checkpoint as ``model_name_or_path``."""
    values = recipe_arguments(argv)
    markers = [f"template: {values['template']}"] if values.get("template") in VPT_TEMPLATES else []
    markers += [key for key in VPT_KEYS if key in values]
    model_type = _model_type(values["model_name_or_path"]) if values.get("model_name_or_path") else None
    if model_type in VPT_MODEL_TYPES:
        markers.append(f"model_name_or_path: a {model_type} checkpoint")
    return markers
