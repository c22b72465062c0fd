"""Shared fixtures: tiny VPT models and pipelines built in code (shared helpers are in utils.py)."""

from __future__ import annotations

import pytest
import torch
from utils import BASES, make_model, spy_generate

from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.tiny.assemble import build_tiny_vpt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vpt(tmp_path_factory):
    """A saved tiny VPT model (all branches): (directory, processor)."""
    directory = tmp_path_factory.mktemp("models") / "vpt"
    _, processor = build_tiny_vpt(save_dir=directory)
    return directory, processor


@pytest.fixture(scope="module")
def pipeline():
    """A `VPTPipeline` over the tiny VPT model (all branches) and its processor."""
    return VPTPipeline(*build_tiny_vpt())


@pytest.fixture
def generate_calls(pipeline, monkeypatch):
    """Every `model.generate` call of the test: (kwargs, output)."""
    return spy_generate(pipeline, monkeypatch)


@pytest.fixture(scope="session", params=BASES)
def model(request):
    """A tiny VPT model (all branches) with the token ids of `utils.TOKEN_IDS`, once per base (`utils.BASES`)."""
    return make_model(base=request.param)
