"""Generation rules for Vision Re-Encoding Tokens."""

from __future__ import annotations

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

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        last = input_ids[:, -1]
        for start, action in self.action_after_start.items():
            rows = last == start
            if rows.any():
                scores[rows] = -float("inf")
                scores[rows, action] = 0.0
        return scores


def vpt_suppressed_tokens(action_after_start: dict[int, int], pads: list[int]) -> list[int]:
    """Tokens the model must never sample: action tokens (only ever forced) and VPT pads (a generated pad would have
    no image features)."""
    return sorted(set(pads) | set(action_after_start.values()))
