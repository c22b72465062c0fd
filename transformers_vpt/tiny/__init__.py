"""Tiny VPT models, tokenizers and processors built in code: for tests, the demo and CPU benchmarks."""

from .model import TINY_DINO_TOKENS, TINY_SAM_TOKENS, tiny_config
from .processor import build_tiny_processor
from .tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

__all__ = ["TINY_DINO_TOKENS", "TINY_SAM_TOKENS", "TINY_VOCAB_SIZE", "build_tiny_processor", "build_tiny_tokenizer", "tiny_config"]
