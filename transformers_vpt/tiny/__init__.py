"""Tiny VPT models, tokenizers and processors built in code: for tests, the demo and CPU benchmarks."""

from .assemble import build_tiny_base, build_tiny_qwen2_vl, build_tiny_vpt
from .model import TINY_DINO_TOKENS, TINY_SAM_TOKENS, tiny_config
from .processor import build_tiny_processor
from .tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

__all__ = [
    "TINY_DINO_TOKENS",
    "TINY_SAM_TOKENS",
    "TINY_VOCAB_SIZE",
    "build_tiny_base",
    "build_tiny_processor",
    "build_tiny_qwen2_vl",
    "build_tiny_tokenizer",
    "build_tiny_vpt",
    "tiny_config",
]
