"""Generation rules for Vision Re-Encoding Tokens."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class VPTActionLogitsProcessor(LogitsProcessor):
    """Force `<|x_action|>` right after `<|x_action_start|>`, and never sample it (or a VPT pad token) otherwise.

    The action token is never a training target (its label is masked): it is a soft token whose input embedding is the
    control state, so generation places it. VPT pad tokens only stand for features of images given with the prompt;
    a generated one would have no features.
    """

    def __init__(self, action_after_start: dict[int, int], never_generate: list[int]):
        self.action_after_start = action_after_start
        self.never_generate = sorted(set(never_generate) | set(action_after_start.values()))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.never_generate] = -float("inf")
        last = input_ids[:, -1]
        for start, action in self.action_after_start.items():
            rows = last == start
            if rows.any():
                scores[rows] = -float("inf")
                scores[rows, action] = 0.0
        return scores
