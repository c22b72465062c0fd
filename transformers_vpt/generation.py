"""Generation rules for Vision Re-Encoding Tokens."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class VPTActionLogitsProcessor(LogitsProcessor):
    """Force `<|x_action|>` right after `<|x_action_start|>`.

    The action token is never a training target (its label is masked): it is a soft token whose input embedding is the
    control state, so generation places it. `VPT_Qwen2VLForConditionalGeneration.generate` puts it after the caller's
    processors; the sampling warpers that `generate` adds after those keep a forced row's single finite score, so the
    forced token always wins. The model's own choice of action or pad tokens is suppressed before (see
    `vpt_suppressed_tokens`).
    """

    def __init__(self, action_after_start: dict[int, int]):
        self.action_after_start = action_after_start
        self.starts = torch.tensor(list(action_after_start), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:  # generation from `inputs_embeds` only: no token yet
            return scores
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


class ForceTokenAtStepLogitsProcessor(LogitsProcessor):
    """Force `token` as the `step`-th generated token (0-based) of every row: its score 0, all others -inf.

    For example, make a VPT model take a perception action: `<|detection_action_start|>` at step 0, after which
    `generate` forces `<|detection_action|>` itself. `prompt_length` is the (padded) length of the prompt given to
    `generate`.
    """

    def __init__(self, prompt_length: int, step: int, token: int):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.position, self.token = prompt_length + step, token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.position:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.token] = 0.0
        return forced


class PerRowSeededSampler(LogitsProcessor):
    """Draw each row's next token from its own generator, seeded per row: a row's samples do not depend on which
    other rows share its batch, so a resumed or re-batched run repeats them.

    It runs after the sampling warpers and leaves a single finite score per row (0 at the drawn token), so
    `generate`'s own multinomial draw can only pick that token. Built by [`seeded_sampling_kwargs`].
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(seed) for seed in seeds]
        self._generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for {scores.shape[0]} sequences; give one seed per sequence")
        if self._generators is None:
            self._generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        probabilities = torch.softmax(scores.float(), dim=-1)
        drawn = torch.cat(
            [torch.multinomial(row, 1, generator=generator) for row, generator in zip(probabilities, self._generators)]
        )
        return torch.full_like(scores, -float("inf")).scatter_(1, drawn[:, None], 0.0)


def seeded_sampling_kwargs(
    generation_kwargs: dict[str, Any], seeds: Sequence[int], generation_config: Any = None
) -> dict[str, Any]:
    """``generate`` kwargs that sample like ``generation_kwargs`` but with one generator per row, seeded by ``seeds``.

    The temperature / top-k / top-p warpers move into the custom processor list ahead of a [`PerRowSeededSampler`]
    (custom processors run before `generate`'s own warpers, which are then neutral). Greedy kwargs are returned as
    they are. Warper values missing from ``generation_kwargs`` come from ``generation_config`` (the model's).
    """
    if not generation_kwargs.get("do_sample", getattr(generation_config, "do_sample", False)):
        return generation_kwargs
    if generation_kwargs.get("num_return_sequences", 1) != 1 or generation_kwargs.get("num_beams", 1) != 1:
        raise ValueError("Per-record seeds need num_return_sequences=1 and num_beams=1")
    kwargs = dict(generation_kwargs)
    temperature, top_k, top_p = (
        kwargs.pop(name, getattr(generation_config, name, None)) for name in ("temperature", "top_k", "top_p")
    )
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(PerRowSeededSampler(seeds))
    return {**kwargs, "logits_processor": processors, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


# LogitsProcessorList calls inspect.signature(processor.__call__) for every processor on every step; with the
# signature precomputed that is a lookup instead of a parse of the function.
for _processor in (
    VPTActionLogitsProcessor, VPTSuppressTokensLogitsProcessor, ForceTokenAtStepLogitsProcessor, PerRowSeededSampler
):
    _processor.__call__.__signature__ = inspect.signature(_processor.__call__)


def vpt_suppressed_tokens(action_after_start: dict[int, int], pads: list[int]) -> list[int]:
    """Tokens the model must never sample: action tokens (only ever forced) and VPT pads (a generated pad would have
    no image features)."""
    return sorted(set(pads) | set(action_after_start.values()))
