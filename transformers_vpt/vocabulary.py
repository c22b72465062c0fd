"""The VPT vocabulary: every token string, its role, and how it is added to a tokenizer.

This module is the single source of truth for token strings. The processor, the region parser, the
LLaMA-Factory patches and the evaluation all import from here.

Two kinds of tokens are added, as the released models did:

* image placeholders (``<|detection_image_pad|>`` ...) are *special* tokens: they never appear in decoded text;
* region and action tokens are *normal* added tokens: atomic, yet they survive ``skip_special_tokens=True``,
  which is what lets the two-round inference parse them out of decoded round-1 text.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable, Sequence

GRID_SIZE = 8

# Qwen2 chat delimiters, reused as "paragraph" markers by mask modelling.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Dataset-style (LLaMA-Factory) placeholders of a Qwen2-VL image / video.
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

REGION_START = "<|region_token_start|>"
REGION_END = "<|region_token_end|>"


def x_token(i: int) -> str:
    return f"<|x_{i}|>"


def y_token(j: int) -> str:
    return f"<|y_{j}|>"


X_TOKENS = tuple(x_token(i) for i in range(GRID_SIZE))
Y_TOKENS = tuple(y_token(j) for j in range(GRID_SIZE))
REGION_TOKENS = (REGION_START, REGION_END) + X_TOKENS + Y_TOKENS

# Trigger phrases the released data and evaluation append to the question.
REGION_TRIGGER = "Identify the region that can help you answer the question, and then answer the question."
REENCODE_TRIGGER = "Require additional perception features, and then answer the question."
TRIGGER_MODES = ("region", "reencode", "free")
"""Round-1 trigger modes: the question gets `REGION_TRIGGER`, `REENCODE_TRIGGER`, or no trigger phrase (free)."""


@dataclass(frozen=True)
class BranchTokens:
    """Token strings and config-field names of one vision re-encoding branch.

    ``kind`` is the name used in ``vision_encoder_ls`` (dino / sam / clip); ``prefix`` is the name used by the
    released token strings, config fields, module names and dataset columns (detection / seg / clip).
    """

    kind: str
    prefix: str

    @property
    def image_pad(self) -> str:
        return f"<|{self.prefix}_image_pad|>"

    @property
    def placeholder(self) -> str:
        """The text placeholder used in dataset JSON, e.g. ``<detection_image>``."""
        return f"<{self.prefix}_image>"

    @property
    def action_start(self) -> str:
        return f"<|{self.prefix}_action_start|>"

    @property
    def action(self) -> str:
        return f"<|{self.prefix}_action|>"

    @property
    def action_end(self) -> str:
        return f"<|{self.prefix}_action_end|>"

    @property
    def action_triple(self) -> str:
        """The canonical re-encoding answer of round 1."""
        return self.action_start + self.action + self.action_end

    @property
    def images_key(self) -> str:
        """Dataset column and processor input name (``detection_images`` ...)."""
        return f"{self.prefix}_images"

    # Config fields filled from the tokenizer.
    @property
    def image_token_id_field(self) -> str:
        return f"{self.prefix}_image_token_id"

    @property
    def action_id_field(self) -> str:
        return f"{self.prefix}_action_id"

    @property
    def action_start_id_field(self) -> str:
        return f"{self.prefix}_action_start_id"


BRANCH_TOKENS = {
    "dino": BranchTokens("dino", "detection"),
    "sam": BranchTokens("sam", "seg"),
    "clip": BranchTokens("clip", "clip"),
}
BRANCH_KINDS = tuple(BRANCH_TOKENS)


def branch_by_prefix(prefix: str) -> BranchTokens:
    for branch in BRANCH_TOKENS.values():
        if branch.prefix == prefix:
            return branch
    raise KeyError(prefix)


def normalize_encoder_list(value: str | Iterable[str] | None) -> list[str]:
    """Turn ``"dino,clip"`` / ``["dino", "clip"]`` / ``None`` into a validated, de-duplicated list."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"vision_encoder_ls entries must be strings, got {item!r}")
        kind = item.strip().lower()
        if not kind:
            continue
        if kind not in BRANCH_TOKENS:
            raise ValueError(f"Unknown vision encoder {item!r} in vision_encoder_ls; choose from {list(BRANCH_KINDS)}")
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def vpt_tokens(vision_encoder_ls: Sequence[str], with_regions: bool = True) -> tuple[list[str], list[str]]:
    """Return ``(special_tokens, normal_tokens)`` in the released add order.

    Released order: the image pads first (special), then the 18 region tokens, then each branch's
    ``action_start, action, action_end`` (normal). With the real Qwen2 vocabulary and a single branch this gives
    pad 151657, ``<|region_token_start|>`` 151658, ``<|x_0|>`` 151660, ``<|y_0|>`` 151668 and the triple
    151676-151678.
    """
    kinds = normalize_encoder_list(vision_encoder_ls)
    special = [BRANCH_TOKENS[k].image_pad for k in kinds]
    normal = list(REGION_TOKENS) if with_regions else []
    for k in kinds:
        b = BRANCH_TOKENS[k]
        normal += [b.action_start, b.action, b.action_end]
    return special, normal


def add_vpt_tokens(tokenizer, config=None, vision_encoder_ls: Sequence[str] | None = None, with_regions: bool = True):
    """Add the VPT tokens to ``tokenizer`` (in place) and fill the id fields of ``config`` if given.

    ``vision_encoder_ls`` defaults to ``config.vision_encoder_ls``. Tokens already in the vocabulary are not added
    again, so the call is idempotent. Returns the number of tokens added.
    """
    if vision_encoder_ls is None:
        vision_encoder_ls = getattr(config, "vision_encoder_ls", None) or []
    special, normal = vpt_tokens(vision_encoder_ls, with_regions=with_regions)
    vocab = tokenizer.get_vocab()
    new_special = [t for t in special if t not in vocab]
    new_normal = [t for t in normal if t not in vocab]
    added = 0
    if new_special:
        added += tokenizer.add_special_tokens(
            {"additional_special_tokens": new_special}, replace_additional_special_tokens=False
        )
    if new_normal:
        added += tokenizer.add_tokens(new_normal, special_tokens=False)
    if config is not None:
        fill_config_token_ids(config, tokenizer)
    return added


def init_added_token_rows(model, token_ids: Iterable[int]) -> list[int]:
    r"""Set the input and output embedding rows of newly added tokens to the mean of the rows before them.

    Qwen2-VL's matrices have spare rows (151,936 for 151,657 tokens), so added tokens take untrained padding rows
    and no resize (or LLaMA-Factory's noisy-mean initialisation) happens; their rows would otherwise start from
    whatever the padding rows hold. The mean of the trained rows (every row before the first added token) is a
    neutral start for both the input embedding and the output (lm_head) row. Ids past the matrices are left to
    the resize. Returns the ids that were initialised.
    """
    import torch

    token_ids = sorted(set(token_ids))
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    matrices = {id(module.weight): module.weight for module in modules}  # tied embeddings count once
    rows = min(weight.shape[0] for weight in matrices.values())
    initialised = [i for i in token_ids if i < rows]
    if initialised:
        with torch.no_grad():
            for weight in matrices.values():
                weight[initialised] = weight[: token_ids[0]].float().mean(dim=0).to(weight.dtype)

    return initialised


def token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` or None when the tokenizer does not have it (Qwen2 has no unk token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return tid


def fill_config_token_ids(config, tokenizer) -> None:
    """Copy every VPT token id the tokenizer knows into the config (None for absent tokens)."""
    for branch in BRANCH_TOKENS.values():
        setattr(config, branch.image_token_id_field, token_id(tokenizer, branch.image_pad))
        setattr(config, branch.action_id_field, token_id(tokenizer, branch.action))
        setattr(config, branch.action_start_id_field, token_id(tokenizer, branch.action_start))
    config.para_start_id = token_id(tokenizer, IM_START)
    config.para_end_id = token_id(tokenizer, IM_END)


# User text that must stay text. Private-use code points bracket it through rendering and placeholder expansion;
# the processor tokenizes what lies between them without matching any added token, then drops them.
LITERAL_START = "\ue000"
LITERAL_END = "\ue001"


def literal_text(text: str) -> str:
    """``text`` marked so that the processor tokenizes it as plain text: a control-token string (``<|x_1|>``,
    ``<|detection_action|>``, ``<|image_pad|>``) or a dataset placeholder (``<image>``) in it never becomes a
    control token or an image slot. Text without ``<`` is returned unchanged (it cannot hold either)."""
    text = text.replace(LITERAL_START, "").replace(LITERAL_END, "")
    return LITERAL_START + text + LITERAL_END if "<" in text else text
