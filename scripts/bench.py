#!/usr/bin/env python
"""Benchmark VPT against its plain base model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) on the same token sequences, and
against the upstream VPT design.

For each variant (``region``: region-selection tokens and a crop; ``dino`` / ``sam`` / ``clip``: an action triple
and a re-encoded image) one process builds a VPT model of ``--base`` with random weights and the base's stock model
(`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`) holding
the same text and vision weights (the state dict is copied; only the branch modules are left out), then measures,
with the two sides alternating within every repetition:

* ``train_step_s``: forward + backward (no optimizer) on a training batch in the released layout: system turn, user
  turn with an image and a question, assistant action triple or region span, user turn with the extra image's pads,
  answer (as long as needed to reach ``--seq-len``). Labels cover the assistant turns but not the action token. The
  vision tower and the extra encoder are frozen, as in the released training configs. The switch to training mode
  and ``zero_grad`` stay outside the timed region (as does the switch to eval mode for the prefill): they walk every
  module and parameter, and are not part of a step.
* ``train_peak_mib``: the model's parameters and buffers plus the peak of what one training step allocates on top.
  On CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the step. On CPU: the allocation trace
  of ``torch.profiler`` (``profile_memory=True``): every allocation and free of PyTorch's CPU allocator during the
  step, ordered by time, summed; the peak of that sum. It counts tensor bytes, like the CUDA figure, not the process
  RSS (which malloc caching and library memory make useless for a before/after comparison). Measured once, after the
  timing warm-ups.
* ``decode_tokens_per_s``: greedy ``generate`` of ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``) from
  the round-1 prompt; the action start is forced as the second generated token, so VPT generates an action triple
  and runs its action path. Time is taken after every generated token (a stopping criterion that never stops);
  throughput = (new tokens - 1) / (last - first), i.e. the decode steps without the prefill.
* ``round2_prefill_s``: one cached forward over the round-2 prompt (the action and the extra image included): VPT's
  two-pass prefill against plain's single pass over the same tokens.

The plain model sees the VPT tokens as ordinary tokens and simply embeds the extra image's pad tokens; it never runs
the extra encoder (DINOv2, SAM, or for ``clip`` the vision tower re-encoding the image). So that ratios measure what
VPT's design adds rather than what the extra features cost, that encoder's forward is timed separately (median of
the same repetitions) and added to plain's training step and prefill, and its weights are added to plain's memory.
For ``clip`` the re-encoded image is the round-1 image, whose features VPT's forward reuses instead of encoding it
again; what is timed and added is what VPT runs for it, the identity check (microseconds).
Reported values are medians over ``--repeats`` runs after ``--warmup`` runs; ratios are VPT / plain.

The ``upstream-design`` rows run the design of the released implementation on the ``--upstream-variant`` model, with
the same weights: pass 1 and pass 2 each over every input column (no prefix reuse) in training and prefill, and in
generation two decoder passes and two ``copy.deepcopy`` of the KV cache on every decode step, re-feeding the last two
tokens after an action token. Its ratios use the same plain figures.

``--sections compile`` (alone or with ``compare``, the comparison above and the default) measures compiled decoding:
the ``--compile-variant`` VPT model generates ``--new-tokens`` tokens greedily with ``cache_implementation="static"``
from the round-1 prompt, once as plain text and once with the action start forced as the second token (so the
action's decode step runs), each eager (``disable_compile=True``) and with transformers' compiled decode step
(``CompileConfig(fullgraph=True, backend=--compile-backend, dynamic=False)``, for inductor in transformers' default
mode ``reduce-overhead``; the prefill stays eager). Per scenario it reports ``first_call_s`` (the first compiled
``generate``, compilation included; dynamo is reset before the section), ``warm_call_s`` (median of the timed
compiled calls), ``compile_s`` (their difference), ``eager_ms_per_token`` and ``compiled_ms_per_token`` (medians after
the warm-up, decode steps only, as ``decode_tokens_per_s``), ``ratio`` (compiled / eager), ``graphs`` (decode graphs
dynamo compiled in the scenario), ``tokens_equal`` (every compiled run generated the eager run's tokens) and
``action_taken``. These entries join the ``--out`` list with ``"figure": "compiled_decode"``.

``--sections eval`` measures the evaluation's throughput (`transformers_vpt.evaluation`) for one and several
processes: the demo's tiny VPT model of ``--base`` (`transformers_vpt.tiny.sources.make_tiny` seeded with ``--seed``,
as ``scripts/demo_model.py`` builds it) answers the three synthetic test splits (``--eval-records`` scenes each,
`transformers_vpt.tiny.synthetic`) with the demo's evaluation settings (greedy, 16 new tokens, batch 16, float32),
once per entry of ``--eval-processes``: ``python evaluation/evaluation.py`` for 1, ``torchrun --standalone
--nproc-per-node N evaluation/evaluation.py`` for N > 1, each process with ``--threads`` threads (default: the
machine's cores divided by N; on CUDA every rank takes its own device and N is at most the device count). Per run it
reports ``wall_s`` (the whole command: start-up, model loading, merge, scoring and reports included) and
``records_per_s`` over it, ``answer_s`` (the longest rank's answering time, from the evaluation log's "Answered N
records ... in S s" lines: model loading excluded) and ``answer_records_per_s`` over it, ``speedup`` (answer
throughput over the first run's) and ``answers_equal`` (every answers.jsonl equals the first run's, byte for byte).
These entries join the ``--out`` list with ``"figure": "eval_throughput"``.

Bases (``--base``): those of `transformers_vpt.models.bases` (``qwen2_vl``, the default, ``qwen2_5_vl`` and
``qwen3_vl``; on Qwen3-VL both sides add the DeepStack features after the first decoder layers). Sizes: ``tiny``
(default; the tiny test configs of the base, CPU) or a real size of the base (``2b`` / ``7b`` for Qwen2-VL, ``3b`` /
``7b`` for Qwen2.5-VL, ``4b`` / ``8b`` for Qwen3-VL: the public configs in configs/models/ with DINOv2-large and SAM
ViT-L, random weights; bf16 on a GPU when one is present, float32 on CPU). ``--layers`` and ``--encoder-layers`` cut
the depth at real widths for a CPU smoke run (Qwen2.5-VL keeps a full-attention block, Qwen3-VL a DeepStack block).
Real sizes use Qwen2-VL's special token ids followed by the VPT tokens for every base (the weights are random).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters as dynamo_counters
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm
from transformers import (
    CompileConfig,
    GenerationMixin,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import no_init_weights

from transformers_vpt import VPTCausalLMOutputWithPast
from transformers_vpt.files import write_json
from transformers_vpt.generation import ForceTokenAtStepLogitsProcessor
from transformers_vpt.models.bases import VPT_BASES, VPTBase, base_of, get_base
from transformers_vpt.models.qwen2_vl_vpt.modeling_qwen2_vl_vpt import (
    EXTRA_IMAGE_INPUTS,
)
from transformers_vpt.models.vpt.processing_vpt import (
    DEFAULT_DETECTION_PROCESSOR_CONFIG,
    DEFAULT_SEG_PROCESSOR_CONFIG,
)
from transformers_vpt.perception import BRANCHES, ENCODED_IMAGES
from transformers_vpt.tiny import build_tiny_tokenizer
from transformers_vpt.tiny.model import TINY_BASES, TINY_DINO, TINY_SAM
from transformers_vpt.tiny.processor import (
    TINY_DETECTION_PROCESSOR_CONFIG,
    TINY_SEG_PROCESSOR_CONFIG,
)
from transformers_vpt.tiny.sources import make_tiny
from transformers_vpt.tiny.synthetic import generate as generate_synthetic
from transformers_vpt.tiny.tokenizer import QWEN2_VL_SPECIAL_TOKENS
from transformers_vpt.vocabulary import (
    BRANCH_KINDS,
    BRANCH_TOKENS,
    IM_END,
    IM_START,
    IMAGE_PAD,
    REGION_END,
    REGION_START,
    VISION_END,
    VISION_START,
    vpt_tokens,
    x_token,
    y_token,
)

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
VARIANTS = ("region", "dino", "sam", "clip")
UPSTREAM = "upstream-design"
# figure -> (comparison, target ratio VPT / plain)
FIGURES = {
    "train_step_s": ("<=", 1.35),
    "train_peak_mib": ("<=", 1.30),
    "decode_tokens_per_s": (">=", 0.95),
    "round2_prefill_s": ("<=", 1.15),
}
QWEN2_VL_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; Qwen2-VL's 14 special tokens (Qwen2.5-VL's too), then VPT's
QUESTION_TOKENS = 32
FORCED_STEP = 1  # the action start is the second generated token
SECTIONS = ("compare", "compile", "eval")
COMPILE_FIGURE = "compiled_decode"
COMPILE_SCENARIOS = {"text": False, "action": True}  # scenario -> whether the action start is forced
# the fields of a compile entry, in the JSON report
COMPILE_FIELDS = ("figure", "variant", "scenario", "backend", "new_tokens", "eager_ms_per_token",
                  "compiled_ms_per_token", "ratio", "first_call_s", "warm_call_s", "compile_s", "graphs",
                  "tokens_equal", "action_taken")


EVAL_FIGURE = "eval_throughput"
# the fields of an eval entry, in the JSON report
EVAL_FIELDS = ("figure", "processes", "threads", "device", "records", "wall_s", "records_per_s", "answer_s",
               "answer_records_per_s", "speedup", "answers_equal")
EVAL_SETTINGS = ("--greedy", "--max-new-tokens", "16", "--batch-size", "16", "--dtype", "float32")  # configs/demo
ANSWERED_LINE = re.compile(r"(?:\[rank (\d+) of \d+\]: )?Answered (\d+) records of \S+ in ([0-9.]+) s")


# -------------------------------------------------------------------------------------------------- the upstream design
class UpstreamDesign(GenerationMixin):
    """The released implementation's two-pass design, same numerics as VPT (mask modelling aside), upstream's work.

    It holds a VPT model of any base (the same modules and weights: nothing is copied) and runs its steps through the
    model's public methods. `upstream_view` makes the wrapper a model of the VPT model's base (this class over the
    base's ``PreTrainedModel`` class, e.g. `Qwen2_5_VLPreTrainedModel`), so that its attention and generation settings
    are the base's. Every forward runs pass 1 and pass 2 over all of its input columns, each on a `copy.deepcopy` of
    the KV cache, so training and prefill run the decoder twice over the whole sequence and each decode step runs it
    twice and copies the cache twice. A decode step whose new token is `<|x_action|>` drops the cached
    `<|x_action_start|>` and re-feeds the last two tokens, so that pass 1 recomputes the control state. The loss
    takes full float32 logits, as upstream.
    """

    def __init__(self, vpt: PreTrainedModel):
        super().__init__(vpt.config)
        self.vpt = vpt
        self.generation_config = vpt.generation_config

    def generate(self, inputs=None, generation_config=None, logits_processor=None, *args, **kwargs):
        """`generate` with the VPT generation rules around the caller's processors, as the VPT model's `generate`."""
        first, last = self.vpt.get_vpt_logits_processors()
        processors = LogitsProcessorList([*first, *(logits_processor or []), *last])
        return super().generate(inputs, generation_config, processors, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache_position=None, **kwargs):
        inputs = self.vpt.prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, cache_position=cache_position, **kwargs
        )
        if inputs["cache_position"][0] != 0 and self.vpt.model.get_action_mask(input_ids[:, -1:]).any():
            past_key_values.crop(-1)
            two_tokens = cache_position[-1:] + torch.tensor([-1, 0], device=cache_position.device)
            inputs.update(input_ids=input_ids[:, -2:], cache_position=two_tokens, position_ids=None)
        return inputs

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, pixel_values=None, image_grid_thw=None, cache_position=None, **kwargs):
        vpt, model = self.vpt, self.vpt.model  # the VPT ForConditionalGeneration and its VPT model
        if use_cache is None:  # Qwen3-VL keeps it in the text config only
            use_cache = getattr(self.config, "use_cache", self.config.text_config.use_cache)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:  # the base's further rope inputs (Qwen2.5-VL: second_per_grid_ts) as keywords
            rope_inputs = {name: kwargs.get(name) for name in model.rope_index_inputs}
            position_ids = model.get_position_ids(input_ids, attention_mask, image_grid_thw, None, cache_position,
                                                  past_length, **rope_inputs)
        if cache_position is None:
            cache_position = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        # upstream re-encodes clip images (no `extra_image_inputs`: no reuse of the original images' features)
        embeds, deepstack = model.embed_inputs(input_ids, pixel_values, image_grid_thw)
        extra_images = model.get_extra_image_features(input_ids, {key: kwargs.get(key) for key in EXTRA_IMAGE_INPUTS})
        # A DeepStack base (Qwen3-VL) adds its images' (and re-encoded clip images') features after the first decoder
        # layers in both passes, as the VPT model does.
        deepstack = model.get_extra_deepstack(deepstack, extra_images)
        stack = deepstack.decoder_kwargs(0, input_ids.shape[1]) if deepstack is not None else {}
        decode = partial(model.language_model, attention_mask=attention_mask, position_ids=position_ids,
                         cache_position=cache_position, use_cache=use_cache, **stack)
        first = embeds
        for images in extra_images:
            first = model.scatter_extra_image_features(first, images)
        pass1 = decode(inputs_embeds=first, past_key_values=copy.deepcopy(past_key_values))
        control = torch.zeros_like(embeds)
        control[:, 1:] = pass1.last_hidden_state[:, :-1]
        second = embeds
        for images in extra_images:
            images.embedded = None  # upstream projects the features again in pass 2
            second = model.scatter_extra_image_features(
                second, images, model.get_control_states_per_image(images, input_ids, control)
            )
        second = torch.where(model.get_action_mask(input_ids).unsqueeze(-1), control, second)
        pass2 = decode(inputs_embeds=second, past_key_values=copy.deepcopy(past_key_values))

        hidden_states = pass2.last_hidden_state
        logits = vpt.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = vpt.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return VPTCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=pass2.past_key_values,
                                         rope_deltas=model.rope_deltas, last_hidden_state=hidden_states[:, -1])


def pretrained_class(base: VPTBase) -> type[PreTrainedModel]:
    """The base's ``PreTrainedModel`` class (`Qwen2VLPreTrainedModel`, `Qwen2_5_VLPreTrainedModel`): the first class
    of its stock model's bases that derives from `PreTrainedModel`."""
    return next(cls for cls in base.stock_model_class.__bases__ if issubclass(cls, PreTrainedModel))


_UPSTREAM_CLASSES: dict[str, type] = {}


def upstream_view(model: PreTrainedModel) -> UpstreamDesign:
    """The upstream design over the modules and weights of the VPT `model` of any base (shared, nothing is
    duplicated): an `UpstreamDesign` that is also a model of the base (see `UpstreamDesign`)."""
    base = base_of(model.config.model_type)
    if base.name not in _UPSTREAM_CLASSES:
        _UPSTREAM_CLASSES[base.name] = type(
            f"UpstreamDesign_{base.name}", (UpstreamDesign, pretrained_class(base)), {"__module__": __name__}
        )
    return _UPSTREAM_CLASSES[base.name](model)


# ---------------------------------------------------------------------------------------------------- models
def vocabulary(size: str) -> dict[str, int]:
    """Token ids: the tiny tokenizer's, or for real sizes Qwen2-VL's special ids (Qwen2.5-VL's are the same) followed
    by the VPT tokens."""
    if size == "tiny":
        return build_tiny_tokenizer().get_vocab()
    special, normal = vpt_tokens(BRANCH_KINDS)
    return {name: QWEN2_VL_FIRST_SPECIAL_ID + i for i, name in enumerate([*QWEN2_VL_SPECIAL_TOKENS, *special, *normal])}


def token_id_fields(vocab: dict[str, int]) -> dict[str, int]:
    fields = dict(
        image_token_id=vocab[IMAGE_PAD], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END],
        para_start_id=vocab[IM_START], para_end_id=vocab[IM_END],
    )
    for branch in BRANCH_TOKENS.values():
        fields[branch.image_token_id_field] = vocab[branch.image_pad]
        fields[branch.action_id_field] = vocab[branch.action]
        fields[branch.action_start_id_field] = vocab[branch.action_start]
    return fields


def real_size_file(base: VPTBase, size: str) -> Path:
    """The public config of ``base`` at ``size`` in configs/models/ (``qwen2-vl-2b-instruct.json``,
    ``qwen2.5-vl-3b-instruct.json``, ...)."""
    return MODELS / f"{base.label.lower()}-{size}-instruct.json"


def real_sizes(base: VPTBase) -> list[str]:
    """The real sizes configs/models/ holds for ``base`` (``2b``, ``7b`` / ``3b``, ``7b``)."""
    prefix = base.label.lower() + "-"
    return sorted(path.name[len(prefix):].removesuffix("-instruct.json")
                  for path in MODELS.glob(f"{prefix}*-instruct.json"))


def image_unit(base: VPTBase, size: str) -> int:
    """The image side, in pixels, of one merged image token of ``base`` at ``size`` (patch size x spatial merge
    size): 28 for the tiny configs, Qwen2-VL and Qwen2.5-VL, 32 for real-size Qwen3-VL (16-pixel patches)."""
    if size == "tiny":
        vision = TINY_BASES[base.name][1]
    else:
        vision = json.loads(real_size_file(base, size).read_text())["vision_config"]
    return vision["patch_size"] * vision["spatial_merge_size"]


def build_config(args, variant: str, vocab: dict[str, int]) -> PretrainedConfig:
    base = get_base(args.base)
    if args.size == "tiny":
        _, vision, text = TINY_BASES[base.name]
        fields = copy.deepcopy(dict(text_config=text, vision_config=vision,
                                    detection_config=TINY_DINO, seg_config=TINY_SAM, seg_projector_stride=1,
                                    tie_word_embeddings=False))
        text = fields["text_config"]
    else:
        fields = json.loads(real_size_file(base, args.size).read_text())
        fields["detection_config"] = json.loads((MODELS / "dinov2-large.json").read_text())
        fields["seg_config"] = json.loads((MODELS / "sam-vit-large-vision.json").read_text())
        for sub in (fields, fields["detection_config"], fields["seg_config"]):
            sub.pop("model_type")
            sub.pop("architectures", None)
        # Qwen3-VL's configs nest the text fields; Qwen2-VL's and Qwen2.5-VL's have them at the top level (4.45 layout)
        text = fields.get("text_config", fields)
    if args.layers:
        text["num_hidden_layers"] = args.layers
    if args.encoder_layers:
        depth, seg, vision = args.encoder_layers, fields["seg_config"], fields["vision_config"]
        vision["depth"] = depth
        fields["detection_config"]["num_hidden_layers"] = seg["num_hidden_layers"] = depth
        seg["global_attn_indexes"] = [i for i in seg["global_attn_indexes"] if i < depth] or [depth - 1]
        # Qwen2.5-VL's full-attention blocks (the others use windows), Qwen3-VL's DeepStack blocks: those left
        # (at least the last block, so that the cut model still runs that path)
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if key in vision:
                vision[key] = [i for i in vision[key] if i < depth] or [depth - 1]
    vision = fields["vision_config"]
    if "deepstack_visual_indexes" in vision:  # feature k is added after decoder layer k: no more than the layers
        vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][: text["num_hidden_layers"]]
    return base.config_class(**{
        **fields, **token_id_fields(vocab),
        "vision_encoder_ls": [] if variant == "region" else [variant],
        "num_inner_forward_run": 2,
        "para_mask_id": int(args.para_mask_ratio > 0),
        "para_mask_ratio": args.para_mask_ratio,
    })


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """The stock config of the VPT ``config``'s base with its text and vision configs and token ids."""
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings")
    stock_config_class = base_of(config.model_type).stock_model_class.config_class
    return stock_config_class(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                              **{key: getattr(config, key) for key in keys})


def build_vpt(args, variant: str, vocab: dict[str, int], device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The VPT model of ``--base`` at ``--size`` for ``variant``, with random weights (seeded by ``--seed``)."""
    config = build_config(args, variant, vocab)
    torch.manual_seed(args.seed)
    with torch.device(device):
        return get_base(args.base).model_class(config).to(dtype)


def build_models(args, variant: str, vocab: dict[str, int], device: torch.device, dtype: torch.dtype):
    """(plain, vpt): random VPT weights of ``--base``, and the base's stock model with the same text and vision
    weights; vision frozen."""
    vpt = build_vpt(args, variant, vocab, device, dtype)
    with torch.device(device):
        with no_init_weights():  # every weight is copied from the VPT model below
            plain = get_base(args.base).stock_model_class(plain_config(vpt.config)).to(dtype)
    plain.tie_weights()  # skipped by no_init_weights
    branch_modules = tuple(
        f"model.{name}." for branch in vpt.vpt_branches for name in (branch.encoder_attr, branch.projector_attr) if name
    )
    missing, unexpected = plain.load_state_dict(vpt.state_dict(), strict=False)
    if missing or not all(key.startswith(branch_modules) for key in unexpected):
        raise RuntimeError(f"plain and VPT weights differ: missing {missing}, unexpected {unexpected}")
    tied = [m.lm_head.weight is m.get_input_embeddings().weight for m in (plain, vpt)]
    if tied[0] != tied[1]:
        raise RuntimeError(f"plain and VPT disagree on tied embeddings: {tied}")
    for model in (plain, vpt):
        model.model.visual.requires_grad_(False)  # freeze_vision_tower, as the released training configs
    for branch in vpt.vpt_branches:
        if branch.encoder_attr:
            getattr(vpt, branch.encoder_attr).requires_grad_(False)
    return plain, vpt


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Shapes:
    image: int  # side of the original image, pixels
    crop: int  # side of a region crop
    dino: int  # DINOv2 input side
    sam: int  # SAM input side


def shapes(args) -> Shapes:
    detection, seg = (
        (TINY_DETECTION_PROCESSOR_CONFIG, TINY_SEG_PROCESSOR_CONFIG) if args.size == "tiny"
        else (DEFAULT_DETECTION_PROCESSOR_CONFIG, DEFAULT_SEG_PROCESSOR_CONFIG)
    )
    unit = image_unit(get_base(args.base), args.size)
    crop = max(2 * unit, args.image_size // 2 // unit * unit)
    return Shapes(args.image_size, crop, detection["crop_size"]["height"], seg["pad_size"]["height"])


def qwen_image(side: int, config, generator) -> tuple[torch.Tensor, list[int], int]:
    """Random patches of a side x side image in Qwen2-VL's format (Qwen2.5-VL's too), its (t, h, w) grid and its
    number of tokens."""
    vision = config.vision_config
    grid = side // vision.patch_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    tokens = grid**2 // vision.spatial_merge_size**2
    return torch.randn(grid * grid, patch_dim, generator=generator), [1, grid, grid], tokens


def make_inputs(variant: str, config, vocab: dict[str, int], shape: Shapes, seq_len: int, batch_size: int,
                seed: int) -> dict[str, dict]:
    """Model inputs of one conversation, repeated `batch_size` times: "train" (with labels), "round1", "round2".

    The layout is the released one: system, user (image, question), assistant (action triple or region span), user
    (the extra image), assistant (answer). Round 1 is the prompt up to the first assistant header; round 2 the prompt
    up to the last one.
    """
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=generator).tolist()  # byte tokens: ordinary text

    def turn(body: list[int]) -> list[int]:
        return [vocab[IM_START], *text(1), *body, vocab[IM_END], *text(1)]

    def image_run(pad: str, count: int) -> list[int]:
        return [vocab[VISION_START], *[vocab[pad]] * count, vocab[VISION_END]]

    image, grid, image_tokens = qwen_image(shape.image, config, generator)
    images, grids, extra = [image], [grid], {}
    if variant == "region":
        reply = [vocab[t] for t in (REGION_START, x_token(1), y_token(2), x_token(5), y_token(6), REGION_END)]
        crop, crop_grid, crop_tokens = qwen_image(shape.crop, config, generator)
        images.append(crop)
        grids.append(crop_grid)
        extra_run = image_run(IMAGE_PAD, crop_tokens)
    else:
        branch = BRANCH_TOKENS[variant]
        reply = [vocab[branch.action_start], vocab[branch.action], vocab[branch.action_end]]
        if variant == "dino":
            extra = {"detection_images": torch.randn(1, 3, shape.dino, shape.dino, generator=generator)}
            pads = (shape.dino // config.detection_config.patch_size) ** 2
        elif variant == "sam":
            extra = {"seg_images": torch.randn(1, 3, shape.sam, shape.sam, generator=generator)}
            pads = (shape.sam // config.seg_config.patch_size // config.seg_projector_stride) ** 2
        else:  # clip re-encodes the original image at its resolution
            extra = {"clip_pixel_values": image, "clip_images_grid_thw": torch.tensor([grid])}
            pads = image_tokens
        extra_run = image_run(branch.image_pad, pads)

    system = turn(text(8))
    user = turn([*image_run(IMAGE_PAD, image_tokens), *text(QUESTION_TOKENS)])
    first_reply, second_user = turn(reply), turn(extra_run)
    header = [vocab[IM_START], *text(1)]
    answer_length = seq_len - len(system + user + first_reply + second_user + header) - 1
    if answer_length < 1:
        raise ValueError(f"--seq-len {seq_len} is too short for the {variant} layout: it needs at least "
                         f"{seq_len - answer_length + 1} tokens")
    answer = [*text(answer_length), vocab[IM_END]]
    round1 = system + user + header
    round2 = system + user + first_reply + second_user + header
    train = round2 + answer

    reply_labels = reply if variant == "region" else [reply[0], -100, reply[2]]  # the action is never a target
    labels = torch.full((len(train),), -100)
    reply_start = len(system + user) + 2  # after <|im_start|> and the role token
    labels[reply_start : reply_start + len(reply) + 1] = torch.tensor([*reply_labels, vocab[IM_END]])
    labels[len(round2) :] = torch.tensor(answer)

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor] * batch_size)

    def batch(ids: list[int], images: list[torch.Tensor], grids: list[list[int]], extra: dict) -> dict:
        return dict(
            input_ids=torch.tensor([ids] * batch_size),
            attention_mask=torch.ones(batch_size, len(ids), dtype=torch.long),
            pixel_values=repeat(torch.cat(images)),
            image_grid_thw=repeat(torch.tensor(grids)),
            **{key: repeat(value) for key, value in extra.items()},
        )

    return {
        "train": {**batch(train, images, grids, extra), "labels": labels.repeat(batch_size, 1)},
        "round1": batch(round1, images[:1], grids[:1], {}),
        "round2": batch(round2, images, grids, extra),
    }


def without_extra(inputs: dict) -> dict:
    """The plain base model's view of a batch: the same tokens, no extra-image inputs."""
    return {key: value for key, value in inputs.items() if key not in EXTRA_IMAGE_INPUTS}


def to_device(inputs: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in inputs.items()}


# ---------------------------------------------------------------------------------------------------- measurements
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable, *args) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def forward_backward(model, batch: dict) -> None:
    model(**batch, use_cache=False).loss.backward()


def cached_forward(model, batch: dict) -> None:
    with torch.no_grad():
        model(**batch, use_cache=True)


def train_step(model, batch: dict) -> None:
    model.train()
    forward_backward(model, batch)
    model.zero_grad(set_to_none=True)


def prefill(model, batch: dict) -> None:
    model.eval()
    cached_forward(model, batch)


# The mode switch and zero_grad walk every module and parameter (the VPT side has more: its frozen extra encoder);
# they are not part of a step, so the timed figures leave them out.
def timed_train_step(device: torch.device, model, batch: dict) -> float:
    model.train()
    seconds = timed(device, forward_backward, model, batch)
    model.zero_grad(set_to_none=True)
    return seconds


def timed_prefill(device: torch.device, model, batch: dict) -> float:
    model.eval()
    return timed(device, cached_forward, model, batch)


def encode_extra(model, variant: str, batch: dict) -> None:
    """The extra encoder's forward alone, as VPT's forward runs it: DINOv2, SAM, or for clip the vision tower on the
    clip images that are not already among the batch's images (here none: the clip image is the round-1 image, whose
    features the forward has computed anyway, so only the identity check remains)."""
    with torch.no_grad():
        BRANCHES[variant].encode(model, batch)


def with_encoded_images(model, batch: dict) -> dict:
    """`batch` plus its original images' vision-tower features, as the forward hands them to the clip branch."""
    with torch.no_grad():
        encoded = model.model.get_vision_features(batch["pixel_values"], batch["image_grid_thw"])
    return {**batch, ENCODED_IMAGES: encoded}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_peak_mib(model, batch: dict, device: torch.device) -> float:
    """The model's parameters and buffers plus the peak allocated on top of them by one training step, in MiB."""
    own = tensor_bytes(chain(model.parameters(), model.buffers()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, batch)
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, batch)
        events = prof.profiler.kineto_results.events()
        trace = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        step_peak = max(accumulate((nbytes for _, nbytes in trace), initial=0))
    return (own + step_peak) / 2**20


class StepClock(StoppingCriteria):
    """Records the time after every generated token; never stops generation."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, prompt: dict, new_tokens: int, force: int | None, vocab: dict[str, int],
                   device: torch.device, **generate_kwargs) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens from ``prompt``, forcing ``force`` (if given) as the
    token of step `FORCED_STEP`: (the sequences, the call's wall time in seconds, the time after every generated
    token)."""
    model.eval()
    clock = StepClock(device)
    processors = (
        [ForceTokenAtStepLogitsProcessor(prompt["input_ids"].shape[1], FORCED_STEP, force)] if force is not None else []
    )
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   logits_processor=LogitsProcessorList(processors),
                                   stopping_criteria=StoppingCriteriaList([clock]),
                                   pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab[IM_END], **generate_kwargs)
    synchronize(device)
    return sequences, time.perf_counter() - start, clock.times


def decode_tokens_per_s(model, prompt: dict, new_tokens: int, force: int | None, vocab: dict[str, int],
                        device: torch.device) -> float:
    _, _, times = timed_generate(model, prompt, new_tokens, force, vocab, device)
    return (new_tokens - 1) / (times[-1] - times[0])


def medians(runs: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, float]:
    """Median value per side; the sides alternate within each repetition, so drift affects them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples = {side: [] for side in runs}
    for _ in range(repeats):
        for side, run in runs.items():
            samples[side].append(run())
    return {side: statistics.median(values) for side, values in samples.items()}


def bench_variant(args, variant: str, vocab: dict[str, int], device: torch.device, dtype: torch.dtype,
                  progress: tqdm) -> list[dict]:
    plain, vpt = build_models(args, variant, vocab, device, dtype)
    config = vpt.config
    inputs = {key: to_device(batch, device) for key, batch in
              make_inputs(variant, config, vocab, shapes(args), args.seq_len, args.batch_size, args.seed).items()}
    models = {"plain": plain, "vpt": vpt}
    if variant == args.upstream_variant:
        models[UPSTREAM] = upstream_view(vpt)
    side_inputs = {side: {key: without_extra(batch) if side == "plain" else batch for key, batch in inputs.items()}
                   for side in models}

    encoder_s, encoder_mib = 0.0, 0.0
    if variant != "region":
        encode_inputs = with_encoded_images(vpt, inputs["round2"]) if variant == "clip" else inputs["round2"]
        run = partial(timed, device, encode_extra, vpt, variant, encode_inputs)
        encoder_s = medians({"encoder": run}, args.warmup, args.repeats)["encoder"]
        encoder_attr = BRANCHES[variant].encoder_attr
        if encoder_attr:
            encoder = getattr(vpt, encoder_attr)
            encoder_mib = tensor_bytes(chain(encoder.parameters(), encoder.buffers())) / 2**20
    logger.info(f"{variant}: extra encoder forward {encoder_s:.4g} s, weights {encoder_mib:.4g} MiB (added to plain)")
    progress.update()

    force = None if variant == "region" else getattr(config, BRANCHES[variant].tokens.action_start_id_field)
    figures = {
        "train_step_s": (lambda m, side: timed_train_step(device, m, side_inputs[side]["train"]), encoder_s),
        "train_peak_mib": (lambda m, side: train_peak_mib(m, side_inputs[side]["train"], device), encoder_mib),
        "decode_tokens_per_s": (lambda m, side: decode_tokens_per_s(
            m, side_inputs[side]["round1"], args.new_tokens, force, vocab, device), 0.0),
        "round2_prefill_s": (lambda m, side: timed_prefill(device, m, side_inputs[side]["round2"]), encoder_s),
    }
    entries = []
    for figure, (measure, plain_extra) in figures.items():
        warmup, repeats = (0, 1) if figure == "train_peak_mib" else (args.warmup, args.repeats)
        values = medians({side: partial(measure, m, side) for side, m in models.items()}, warmup, repeats)
        plain_value = values.pop("plain") + plain_extra
        for side, value in values.items():
            entries.append(dict(figure=figure, variant=variant if side == "vpt" else side, plain=plain_value,
                                vpt=value, ratio=value / plain_value))
        progress.update()
    del plain, vpt, models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entries


def compile_mode(backend: str) -> str | None:
    """transformers' default mode for inductor; none for the other backends, which ignore it."""
    return CompileConfig().mode if backend == "inductor" else None


def bench_compile(args, vocab: dict[str, int], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Static-cache greedy decoding of the ``--compile-variant`` VPT model, eager against transformers' compiled decode
    step (``CompileConfig(fullgraph=True, backend=--compile-backend, dynamic=False)``, see `compile_mode`), in
    each of `COMPILE_SCENARIOS`: one entry per scenario (see `COMPILE_FIELDS`).

    Dynamo is reset first, so the first compiled call of the first scenario compiles the decode step; the second
    scenario's first call reuses that graph unless a guard fails (``graphs`` counts what each scenario compiles). The
    prefill runs eager on both sides, as transformers' ``generate`` does. Every compiled run's tokens are compared
    with the eager run's."""
    variant = args.compile_variant
    vpt = build_vpt(args, variant, vocab, device, dtype).eval()
    prompt = to_device(
        make_inputs(variant, vpt.config, vocab, shapes(args), args.seq_len, args.batch_size, args.seed)["round1"],
        device,
    )
    tokens = BRANCHES[variant].tokens
    action_start, action = (getattr(vpt.config, field) for field in (tokens.action_start_id_field,
                                                                     tokens.action_id_field))
    compile_config = CompileConfig(fullgraph=True, backend=args.compile_backend, dynamic=False,
                                   mode=compile_mode(args.compile_backend))
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    torch.compiler.reset()
    entries = []
    for scenario, forced in COMPILE_SCENARIOS.items():
        run = partial(timed_generate, vpt, prompt, args.new_tokens, action_start if forced else None, vocab, device,
                      cache_implementation="static")
        calls = {"eager": partial(run, disable_compile=True), "compiled": partial(run, compile_config=compile_config)}
        reference, _, _ = calls["eager"]()  # also the eager side's first call (its static cache is allocated)
        graphs = dynamo_counters["stats"]["unique_graphs"]
        first, first_call_s, _ = calls["compiled"]()
        graphs = dynamo_counters["stats"]["unique_graphs"] - graphs
        sequences, walls = {"eager": [reference], "compiled": [first]}, {"eager": [], "compiled": []}

        def ms_per_token(side: str) -> float:
            output, wall, times = calls[side]()
            sequences[side].append(output)
            walls[side].append(wall)
            return 1000 * (times[-1] - times[0]) / (args.new_tokens - 1)

        values = medians({side: partial(ms_per_token, side) for side in calls}, args.warmup, args.repeats)
        warm_call_s = statistics.median(walls["compiled"][-args.repeats:])
        generated = reference[:, prompt["input_ids"].shape[1]:]
        entries.append(dict(
            figure=COMPILE_FIGURE, variant=variant, scenario=scenario, backend=args.compile_backend,
            new_tokens=args.new_tokens, eager_ms_per_token=values["eager"], compiled_ms_per_token=values["compiled"],
            ratio=values["compiled"] / values["eager"], first_call_s=first_call_s, warm_call_s=warm_call_s,
            compile_s=first_call_s - warm_call_s, graphs=graphs,
            tokens_equal=all(torch.equal(output, reference) for output in chain(*sequences.values())),
            action_taken=bool((generated == action).any()),
        ))
        if not entries[-1]["tokens_equal"]:
            logger.warning(f"compiled decoding ({scenario}) generated other tokens than eager decoding")
    del vpt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entries


def eval_inputs(args, root: Path) -> tuple[Path, Path]:
    """The demo's tiny VPT model of ``--base`` (seeded as scripts/demo_model.py seeds it) and the synthetic test
    splits (``--eval-records`` scenes each) under ``root``: (model directory, data directory)."""
    torch.manual_seed(args.seed)
    model = make_tiny(root / "demo", data=False, base=args.base)["model"]
    generate_synthetic(root / "data", train_size=0, alignment_size=0, test_size=args.eval_records, seed=args.seed)
    return model, root / "data"


def eval_command(processes: int, model: Path, data: Path, out: Path, device: str) -> list[str]:
    """The documented command: ``python evaluation/evaluation.py`` for one process, ``torchrun`` for more."""
    script = str(ROOT / "evaluation" / "evaluation.py")
    if processes == 1:
        launcher = [sys.executable, script]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun if torchrun.exists() else shutil.which("torchrun") or "torchrun"), "--standalone",
                    "--nproc-per-node", str(processes), script]
    return [*launcher, "--model", f"vpt={model}", "--data-dir", str(data), "--output-dir", str(out),
            "--device", device, *EVAL_SETTINGS]


def answer_times(log: str) -> tuple[int, float]:
    """Records answered and the longest rank's answering seconds, from an evaluation log's "Answered" lines."""
    records, seconds = 0, {}
    for rank, count, spent in ANSWERED_LINE.findall(log):
        records += int(count)
        seconds[rank] = seconds.get(rank, 0.0) + float(spent)
    return records, max(seconds.values(), default=0.0)


def answer_files(out: Path) -> dict[str, str]:
    """Every answers.jsonl under ``out`` (model/dataset -> text)."""
    paths = sorted(out.glob("*/*/answers.jsonl"))
    return {str(path.parent.relative_to(out)): path.read_text(encoding="utf-8") for path in paths}


def bench_eval(args, device: torch.device) -> list[dict]:
    """One `EVAL_FIELDS` entry per ``--eval-processes`` value (see the module docstring)."""
    root = Path(args.eval_dir) if args.eval_dir else Path(tempfile.mkdtemp(prefix="vpt-bench-eval-"))
    try:
        model, data = eval_inputs(args, root)
        entries, first = [], None
        for processes in args.eval_processes:
            if device.type == "cuda" and processes > torch.cuda.device_count():
                logger.warning(f"eval: skipping {processes} processes: {torch.cuda.device_count()} CUDA device(s)")
                continue
            threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
            out = root / f"eval-{processes}"
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
            env.pop("VPT_DEBUG", None)
            command = eval_command(processes, model, data, out, device.type)
            logger.info(f"eval: {processes} process(es), {threads} thread(s) each: {' '.join(command)}")
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            wall_s = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"eval with {processes} process(es) failed (exit {done.returncode}): "
                                   + (done.stderr.strip().splitlines() or ["no output"])[-1])
            records, answer_s = answer_times((out / "evaluation.log").read_text(encoding="utf-8"))
            answers = answer_files(out)
            entry = dict(figure=EVAL_FIGURE, processes=processes, threads=threads, device=device.type, records=records,
                         wall_s=wall_s, records_per_s=records / wall_s, answer_s=answer_s,
                         answer_records_per_s=records / answer_s if answer_s else 0.0, speedup=1.0,
                         answers_equal=True)
            if first is None:
                first = entry, answers
            else:
                entry["speedup"] = entry["answer_records_per_s"] / first[0]["answer_records_per_s"]
                entry["answers_equal"] = answers == first[1]
                if not entry["answers_equal"]:
                    logger.warning(f"eval: {processes} processes answered otherwise than {first[0]['processes']}")
            entries.append(entry)
        return entries
    finally:
        if not args.eval_dir:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- reporting
def machine_description(device: torch.device, dtype: torch.dtype) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    gpu = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU"
    return (f"{platform.platform()}; CPU {cpu} ({os.cpu_count()} logical cores); {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); transformers {transformers.__version__}; running on {device}, "
            f"{str(dtype).removeprefix('torch.')}")


def meets(entry: dict) -> bool:
    comparison, target = FIGURES[entry["figure"]]
    return entry["ratio"] <= target if comparison == "<=" else entry["ratio"] >= target


def format_table(entries: list[dict]) -> str:
    lines = [f"{'figure':<21}{'variant':<17}{'plain':>11}{'vpt':>11}{'ratio':>8}  {'target':<8}met",
             "-" * 79]
    for e in entries:
        comparison, target = FIGURES[e["figure"]]
        lines.append(f"{e['figure']:<21}{e['variant']:<17}{e['plain']:>11.4g}{e['vpt']:>11.4g}{e['ratio']:>8.3f}  "
                     f"{comparison + str(target):<8}{'yes' if meets(e) else 'NO'}")
    lines.append(f"(ratio = vpt / plain; plain includes the extra encoder's forward time and weights; "
                 f"{UPSTREAM} rows: the upstream design in the vpt column)")
    return "\n".join(lines)


def format_compile_table(entries: list[dict]) -> str:
    lines = [f"{'scenario':<10}{'variant':<9}{'backend':<10}{'eager ms/tok':>13}{'compiled ms/tok':>16}{'ratio':>8}"
             f"{'first call s':>14}{'compile s':>11}{'graphs':>8}  tokens equal",
             "-" * 113]
    for e in entries:
        lines.append(f"{e['scenario']:<10}{e['variant']:<9}{e['backend']:<10}{e['eager_ms_per_token']:>13.4g}"
                     f"{e['compiled_ms_per_token']:>16.4g}{e['ratio']:>8.3f}{e['first_call_s']:>14.4g}"
                     f"{e['compile_s']:>11.4g}{e['graphs']:>8}  {'yes' if e['tokens_equal'] else 'NO'}")
    lines.append("(static-cache greedy decoding; ms/tok: decode steps after warm-up, prefill excluded; "
                 "ratio = compiled / eager; first call: the first compiled generate, compilation included; "
                 "compile = first call - warm call; graphs: decode graphs compiled in the scenario)")
    return "\n".join(lines)


def format_eval_table(entries: list[dict]) -> str:
    lines = [f"{'processes':>9}{'threads':>9}{'device':>8}{'records':>9}{'wall s':>9}{'records/s':>11}"
             f"{'answer s':>10}{'answer rec/s':>14}{'speedup':>9}  answers equal",
             "-" * 103]
    for e in entries:
        lines.append(f"{e['processes']:>9}{e['threads']:>9}{e['device']:>8}{e['records']:>9}{e['wall_s']:>9.2f}"
                     f"{e['records_per_s']:>11.3g}{e['answer_s']:>10.2f}{e['answer_records_per_s']:>14.3g}"
                     f"{e['speedup']:>9.2f}  {'yes' if e['answers_equal'] else 'NO'}")
    lines.append("(evaluation of the demo's tiny VPT model on the synthetic test splits, greedy; wall: the whole "
                 "command, start-up and model loading included; answer: the longest rank's answering time; speedup = "
                 "answer records/s over the first row's; answers equal: answers.jsonl byte for byte)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", choices=list(VPT_BASES), default="qwen2_vl",
                        help="the base of the VPT model and the plain side's stock model: "
                             + ", ".join(f"{name} ({base.label})" for name, base in VPT_BASES.items())
                             + " (default: qwen2_vl)")
    sizes = sorted({size for base in VPT_BASES.values() for size in real_sizes(base)})
    parser.add_argument("--size", choices=("tiny", *sizes), default="tiny",
                        help="tiny test configs, or a real size of the base with random weights: "
                             + "; ".join(f"{base.label} {', '.join(real_sizes(base))}" for base in VPT_BASES.values())
                             + " (default: tiny)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the size's own)")
    parser.add_argument("--encoder-layers", type=int,
                        help="layers of the vision tower, DINOv2 and SAM (default: the size's own)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to measure (default: all)")
    parser.add_argument("--upstream-variant", choices=VARIANTS[1:], default="dino",
                        help=f"variant on which the {UPSTREAM} rows are measured; must be in --variants "
                             "(default: dino)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["compare"],
                        help="what to measure: compare (VPT / plain / upstream design, the table of figures), compile "
                             "(static-cache decoding eager against compiled), eval (evaluation records per second "
                             "for --eval-processes processes) (default: compare)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile section (default: inductor; eager traces the "
                             "graph without generating code, for tests)")
    parser.add_argument("--compile-variant", choices=VARIANTS[1:], default="dino",
                        help="variant whose VPT model the compile section decodes, with and without its action "
                             "(default: dino)")
    parser.add_argument("--eval-processes", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="process counts of the eval section, the first one the speed-up's reference "
                             "(default: 1 2)")
    parser.add_argument("--eval-records", type=int, default=16, metavar="K",
                        help="scenes per synthetic test split in the eval section, three splits (default: 16)")
    parser.add_argument("--eval-dir", type=Path,
                        help="keep the eval section's model, data and outputs here (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, help="training sequence length (default: 256 tiny, 1024 real sizes)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per batch (default: 1)")
    parser.add_argument("--image-size", type=int,
                        help="side of the original image in pixels, a multiple of the base's patch size x merge size "
                             "(28; 32 for real-size Qwen3-VL) (default: 2 x that tiny, 12 x that real sizes: 56, "
                             "336 / 384 px)")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens generated per decode run, >= 4 (default: 32)")
    parser.add_argument("--para-mask-ratio", type=float, default=0.0,
                        help="mask modelling of the first user turn in training, as the released configs (0.5); "
                             "default 0: off")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, medians reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the repetitions (default: 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    parser.add_argument("--out", type=Path, help="also write the entries as JSON to this file")
    args = parser.parse_args(argv)
    real = args.size != "tiny"
    if real and args.size not in real_sizes(VPT_BASES[args.base]):
        parser.error(f"--size {args.size} is not a size of {VPT_BASES[args.base].label}: choose tiny or "
                     f"{' or '.join(real_sizes(VPT_BASES[args.base]))}")
    args.seq_len = args.seq_len or (1024 if real else 256)
    unit = image_unit(VPT_BASES[args.base], args.size)
    args.image_size = args.image_size or unit * (12 if real else 2)
    if args.image_size <= 0 or args.image_size % unit:
        parser.error(f"--image-size must be a positive multiple of {unit} for {VPT_BASES[args.base].label} at size "
                     f"{args.size} (patch size x merge size)")
    if args.new_tokens < FORCED_STEP + 3:
        parser.error(f"--new-tokens must be at least {FORCED_STEP + 3}, so that a decode step consumes the action")
    if args.upstream_variant not in args.variants:
        parser.error("--upstream-variant must be one of --variants")
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1, --warmup >= 0")
    if args.eval_records < 1 or min(args.eval_processes) < 1:
        parser.error("--eval-records and every --eval-processes value must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = vocabulary(args.size)
    print(f"Machine: {machine_description(device, dtype)}")
    print(f"Setup: base {args.base}, size {args.size}, layers {args.layers or 'all'}, "
          f"encoder layers {args.encoder_layers or 'all'}, seq-len {args.seq_len}, batch {args.batch_size}, "
          f"image {args.image_size}px, {args.new_tokens} new tokens, "
          f"para-mask-ratio {args.para_mask_ratio}, {args.warmup} warm-up + {args.repeats} repeats (medians), "
          f"sections {' '.join(args.sections)}"
          + (f", compile: {args.compile_variant} model, backend {args.compile_backend}, mode "
             f"{compile_mode(args.compile_backend)}, fullgraph, static shapes" if "compile" in args.sections else "")
          + (f", eval: demo tiny model, {args.eval_records} scenes x 3 splits, processes "
             f"{' '.join(map(str, args.eval_processes))}" if "eval" in args.sections else ""))
    entries = []
    if "compare" in args.sections:
        with tqdm(total=len(args.variants) * (len(FIGURES) + 1), desc="measurements", disable=None) as progress:
            for variant in args.variants:
                entries += bench_variant(args, variant, vocab, device, dtype, progress)
        entries.sort(key=lambda e: (list(FIGURES).index(e["figure"]), [*VARIANTS, UPSTREAM].index(e["variant"])))
        print(format_table(entries))
    if "compile" in args.sections:
        compiled = bench_compile(args, vocab, device, dtype)
        print(format_compile_table(compiled))
        entries += compiled
    if "eval" in args.sections:
        evaluated = bench_eval(args, device)
        print(format_eval_table(evaluated))
        entries += evaluated
    if args.out:
        write_json(args.out, entries)
    return entries


if __name__ == "__main__":
    main()
