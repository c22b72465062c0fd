"""Generation rules for Vision Re-Encoding Tokens."""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessor


class VPTActionLogitsProcessor(LogitsProcessor):
    """Force `<|x_action|>` right after `<|x_action_start|>`.

    The action token is never a training target (its label is masked): it is a soft token whose input embedding is the
    control state, so generation places it. Runs after the samplers' warpers, so the forced token always wins; the
    model's own choice of action or pad tokens is suppressed before them (see `vpt_suppressed_tokens`).
    """

    def __init__(self, action_after_start: dict[int, int]):
        self.action_after_start = action_after_start
        self.starts = torch.tensor(list(action_after_start), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        last = input_ids[:, -1]
        if self.starts.device != last.device:
            self.starts = self.starts.to(last.device)
        forced = torch.isin(last, self.starts)
        if not forced.any():  # one check per step; the scores are copied only when a token is forced
            return scores
        scores = scores.masked_fill(forced[:, None], -float("inf"))
        for row in forced.nonzero().flatten().tolist():
            scores[row, self.action_after_start[int(last[row])]] = 0.0
        return scores


class VPTSuppressTokensLogitsProcessor(LogitsProcessor):
    """Set the scores of `tokens` to -inf: `SuppressTokensLogitsProcessor`'s result by one `index_fill`, without its
    per-step vocabulary-sized `isin` (ids outside the scores are ignored, as there)."""

    def __init__(self, tokens: list[int]):
        self.tokens = sorted(set(tokens))
        self._index = None  # (device, vocabulary size, index tensor), built on the first call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab_size = scores.shape[-1]
        if self._index is None or self._index[:2] != (scores.device, vocab_size):
            index = torch.tensor([t for t in self.tokens if 0 <= t < vocab_size], dtype=torch.long, device=scores.device)
            self._index = (scores.device, vocab_size, index)
        return scores.index_fill(-1, self._index[2], -float("inf"))


# LogitsProcessorList calls inspect.signature(processor.__call__) for every processor on every step; with the
# signature precomputed that is a lookup instead of a parse of the function.
for _processor in (VPTActionLogitsProcessor, VPTSuppressTokensLogitsProcessor):
    _processor.__call__.__signature__ = inspect.signature(_processor.__call__)


def vpt_suppressed_tokens(action_after_start: dict[int, int], pads: list[int]) -> list[int]:
    """Tokens the model must never sample: action tokens (only ever forced) and VPT pads (a generated pad would have
    no image features)."""
    return sorted(set(pads) | set(action_after_start.values()))
