"""Shared fixtures: tiny VPT models and pipelines built in code (shared helpers are in utils.py)."""

from __future__ import annotations

import pytest
import torch
from utils import BASES, make_model, spy_generate

from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.tiny.assemble import build_tiny_vpt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(request):
    """The base of the tiny models of `vpt` and `pipeline`: ``qwen2_vl``, unless the test runs them on every base
    with ``@pytest.mark.parametrize("base", BASES, indirect=True)``."""
    return getattr(request, "param", "qwen2_vl")


@pytest.fixture(scope="module")
def vpt(base, tmp_path_factory):
    """A saved tiny VPT model of `base` (all branches): (directory, processor)."""
    directory = tmp_path_factory.mktemp(f"models-{base}") / "vpt"
    _, processor = build_tiny_vpt(save_dir=directory, base=base)
    return directory, processor


@pytest.fixture(scope="module")
def pipeline(base):
    """A `VPTPipeline` over the tiny VPT model of `base` (all branches) and its processor."""
    return VPTPipeline(*build_tiny_vpt(base=base))


@pytest.fixture
def generate_calls(pipeline, monkeypatch):
    """Every `model.generate` call of the test: (kwargs, output)."""
    return spy_generate(pipeline, monkeypatch)


@pytest.fixture(scope="session", params=BASES)
def model(request):
    """A tiny VPT model (all branches) with the token ids of `utils.TOKEN_IDS`, once per base (`utils.BASES`)."""
    return make_model(base=request.param)
