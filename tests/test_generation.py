"""VPT generation: forced action token, control state from the previous step, equality with a slow recompute."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from utils import IM_END, IM_START, PAD, PREFIX, TOKEN_IDS, Sample, collate, make_model
from vpt_reference import reference_forward

from transformers_vpt.generation import ForceTokenAtStepLogitsProcessor

STARTS = {TOKEN_IDS[f"{p}_action_start_id"]: TOKEN_IDS[f"{p}_action_id"] for p in ("detection", "seg", "clip")}
NEVER = [TOKEN_IDS[f"{p}_image_token_id"] for p in ("detection", "seg", "clip")] + list(STARTS.values())


class Ban(LogitsProcessor):
    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.tokens] = -float("inf")
        return scores


def prompt(sample: Sample) -> Sample:
    """Cut the sample before its final answer: the model generates from the last assistant header."""
    last = len(sample.ids) - 1 - sample.ids[::-1].index(IM_START)
    sample.ids = sample.ids[: last + 2]
    return sample


def slow_greedy(model, batch, steps, force=None, ban=()):
    """Upstream semantics recomputed from scratch every step with the plain reference forward."""
    batch = dict(batch)
    prompt_length = batch["input_ids"].shape[1]
    all_logits = []
    for step in range(steps):
        with torch.no_grad():
            logits, _ = reference_forward(model, **{k: v for k, v in batch.items() if k != "labels"})
        logits = logits[:, -1].clone()
        all_logits.append(logits.clone())
        logits[:, NEVER + list(ban)] = -float("inf")
        if force is not None and step == force[0]:
            logits[:] = -float("inf")
            logits[:, force[1]] = 0.0
        nxt = logits.argmax(-1)
        for row, last in enumerate(batch["input_ids"][:, -1].tolist()):
            if last in STARTS:
                nxt[row] = STARTS[last]
        batch["input_ids"] = torch.cat([batch["input_ids"], nxt[:, None]], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(nxt)[:, None]], 1)
    return batch["input_ids"][:, prompt_length:], torch.stack(all_logits, 1)


def fast_greedy(model, batch, steps, force=None, ban=()):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prompt_length = inputs["input_ids"].shape[1]
    forced = [ForceTokenAtStepLogitsProcessor(prompt_length, *force)] if force else []
    processors = LogitsProcessorList(forced + ([Ban(ban)] if ban else []))
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         logits_processor=processors, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=PAD, eos_token_id=IM_END)
    return out.sequences[:, prompt_length:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", ["dino", "sam", "clip"])
def test_round_one_action_generation_equals_slow_recompute(model, kind):
    start = TOKEN_IDS[f"{ {'dino': 'detection', 'sam': 'seg', 'clip': 'clip'}[kind] }_action_start_id"]
    batch = collate([prompt(Sample("plain", seed=3))])
    fast, fast_logits = fast_greedy(model, batch, steps=6, force=(1, start))
    slow, slow_logits = slow_greedy(model, batch, steps=6, force=(1, start))
    assert fast[0, 1] == start and fast[0, 2] == STARTS[start]  # the action token is forced after its start
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-4)


def test_round_two_prefill_with_extra_images_equals_slow_recompute(model):
    # A second action after a re-encoded image is out of the released training distribution; there generation follows
    # upstream generation (control state against the cached prefix), not training-time pass 1 (see DevNote), so this
    # comparison bans new action starts.
    batch = collate([prompt(Sample("dino", seed=5)), prompt(Sample("clip", seed=6, extra_images=2))], "left")
    fast, fast_logits = fast_greedy(model, batch, steps=5, ban=STARTS)
    slow, slow_logits = slow_greedy(model, batch, steps=5, ban=STARTS)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(model):
    samples = [Sample("plain", seed=1, question=(50,)), Sample("dino", seed=2), Sample("region", seed=3, question=(51, 52, 53))]
    start = TOKEN_IDS["seg_action_start_id"]
    batched, _ = fast_greedy(model, collate([prompt(s) for s in samples], "left"), steps=6, force=(2, start))
    for row, sample in enumerate(samples):
        single, _ = fast_greedy(model, collate([prompt(sample)]), steps=6, force=(2, start))
        assert torch.equal(batched[row], single[0]), row


def test_generation_never_emits_pads_or_unforced_actions():
    model = make_model(seed=11)
    # Bias the head towards the forbidden tokens: they must still never be sampled.
    with torch.no_grad():
        model.lm_head.weight[NEVER] *= 50
    batch = collate([prompt(Sample("plain", seed=2))])
    out, _ = fast_greedy(model, batch, steps=8)
    assert not torch.isin(out, torch.tensor(NEVER)).any()


def test_sampling_with_tight_top_k_never_crashes_on_forbidden_tokens():
    """The forbidden tokens are removed before top-k/top-p, so those samplers never keep only forbidden tokens."""
    model = make_model(seed=12)
    with torch.no_grad():
        model.lm_head.weight[NEVER] *= 50
    batch = collate([prompt(Sample("plain", seed=2))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=2, top_p=0.1, temperature=0.95,
                         pad_token_id=PAD, eos_token_id=IM_END)
    assert not torch.isin(out[:, batch["input_ids"].shape[1]:], torch.tensor(NEVER)).any()


class ActionOnSomeBeams(LogitsProcessor):
    """A rule of each sequence's content (so that beam search and the slow per-beam loop apply it alike) that makes
    beam search reorder beams right after they start an action: at length `at`, a sequence ending in an odd token
    starts an action at log-prob `cost` (ranking it below the others), any other keeps only its best token; at the
    next step every sequence that did not start an action pays `penalty` (ranking the action beams first)."""

    def __init__(self, at: int, start: int, cost: float = -12.0, penalty: float = -50.0):
        self.at, self.start, self.cost, self.penalty = at, start, cost, penalty

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            best = scores.argmax(-1, keepdim=True)
            kept = torch.full_like(scores, -float("inf")).scatter(1, best, scores.gather(1, best))
            odd = input_ids[:, -1] % 2 == 1
            kept[odd] = -float("inf")
            kept[odd, self.start] = self.cost
            return kept
        if input_ids.shape[1] == self.at + 1:
            return scores + self.penalty * (input_ids[:, -1] != self.start).float()[:, None]
        return scores


def slow_beam_search(model, batch, steps, num_beams, rule):
    """Beam search written out: every beam recomputed from scratch with the plain reference forward, log-probs
    processed as generate processes them (VPT suppression, `rule`, action forcing), the best `num_beams`
    continuations kept by total log-prob. Returns the beams, best first, and their total log-probs."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    beams = [(inputs["input_ids"][0], 0.0)]
    for _ in range(steps):
        candidates = []
        for ids, score in beams:
            step = {**inputs, "input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
            with torch.no_grad():
                logits, _ = reference_forward(model, **step)
            log_probs = torch.log_softmax(logits[0, -1].float(), -1)[None]
            log_probs[:, NEVER] = -float("inf")
            log_probs = rule(ids[None], log_probs)
            if int(ids[-1]) in STARTS:
                log_probs[:] = -float("inf")
                log_probs[:, STARTS[int(ids[-1])]] = 0.0
            candidates += [(score + float(value), ids, token) for token, value in enumerate(log_probs[0].tolist())]
        candidates.sort(key=lambda candidate: -candidate[0])
        beams = [(torch.cat([ids, torch.tensor([token])]), score) for score, ids, token in candidates[:num_beams]]
    return beams


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_beam_search_equals_the_slow_per_beam_loop(model, kind):
    """Beams that start an action move up right after (`ActionOnSomeBeams`): the control state must follow its beam
    (it rides on the cache, `_reorder_cache`)."""
    start = TOKEN_IDS[f"{PREFIX[kind]}_action_start_id"]
    batch = collate([prompt(Sample("plain", seed=4))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prompt_length, steps, num_beams = inputs["input_ids"].shape[1], 6, 4
    rule = ActionOnSomeBeams(prompt_length + 2, start)
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, num_beams=num_beams,
                         num_return_sequences=num_beams, do_sample=False, logits_processor=[rule],
                         return_dict_in_generate=True, output_scores=True, pad_token_id=PAD, eos_token_id=None,
                         length_penalty=0.0)
    slow = slow_beam_search(model, batch, steps, num_beams, rule)
    assert [ids.tolist() for ids, _ in slow] == out.sequences.tolist()
    torch.testing.assert_close(out.sequences_scores, torch.tensor([score for _, score in slow]), rtol=1e-4, atol=1e-4)
    assert any(STARTS[start] in ids[prompt_length:].tolist() for ids, _ in slow)  # actions in the final beams


def test_beam_search_expands_the_extra_images_per_sample(model):
    """Round two with beams and several return sequences: each sample's DINOv2 and clip images go with its rows."""
    batch = collate([prompt(Sample("dino", seed=5)), prompt(Sample("clip", seed=6, extra_images=2))], "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prompt_length = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                           logits_processor=[Ban(STARTS)], pad_token_id=PAD, eos_token_id=None)
    alone = [
        model.generate(**{k: v for k, v in collate([prompt(sample)]).items() if k != "labels"}, max_new_tokens=3,
                       num_beams=2, num_return_sequences=2, do_sample=False, logits_processor=[Ban(STARTS)],
                       pad_token_id=PAD, eos_token_id=None)
        for sample in (Sample("dino", seed=5), Sample("clip", seed=6, extra_images=2))
    ]
    for row, single in enumerate(alone):
        assert torch.equal(beams[2 * row : 2 * row + 2, prompt_length:], single[:, -3:])


