"""The Visual Perception Token layer of a Qwen-VL model: written once, mixed into each base's stock classes.

A base provides its stock ``…Model`` and ``…ForConditionalGeneration`` (Qwen2-VL, Qwen2.5-VL), and gets

* ``VPT_<Base>Model(VPTModelMixin, <Base>Model)``: owns the towers (the base's) and the re-encoding branches
  (DINOv2, SAM, the clip projector), runs the two-pass forward with the pass-1 prefix reuse and the uniform module
  calls, and returns hidden states (`VPTModelOutputWithPast`);
* ``VPT_<Base>ForConditionalGeneration(VPTForConditionalGenerationMixin, <Base>ForConditionalGeneration)``: adds
  the LM head, the loss and the VPT generation rules, and loads the released checkpoint layout.

The base's own methods do the base's work: `get_image_features`, `get_video_features`, `get_placeholder_mask`,
`get_rope_index` (called with keywords; `rope_index_inputs` names the base's extra inputs, e.g. Qwen2.5-VL's
`second_per_grid_ts`), `language_model`, `visual`. A base whose vision tower also returns DeepStack features
(Qwen3-VL) unpacks them in `get_vision_features`; the layer then adds them after the first decoder layers at the
image and video positions in every decoder pass (`DeepStackFeatures`), as the base's own forward does.

The forward. Pass 1 runs the decoder up to the last re-encoding action token; the final hidden state of the token
right before each `<|*_action|>` (its `<|*_action_start|>`) is that action's *control state*. Pass 2 runs the
decoder on the same sequence with (a) the extra-image features projected under the control states, f + (f.c)c,
scattered into their pad tokens and (b) every `<|*_action|>` input embedding replaced by its control state. Logits
and loss come from pass 2. Region Selection Tokens need no model support: they are ordinary tokens, and their crops
arrive as ordinary images in the next round.

Which modules run depends on the batch (pass 1 only with action tokens, an encoder only with its images). Under
DeepSpeed ZeRO-3 or FSDP every module call gathers its parameters collectively, so all ranks must call the same
modules in the same order: `uniform_module_calls` makes every forward do so (see its docstring).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, modeling_utils
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLCausalLMOutputWithPast
from transformers.utils import is_torchdynamo_compiling, logging

from ...generation import VPTActionLogitsProcessor, VPTSuppressTokensLogitsProcessor, vpt_suppressed_tokens
from ...perception import (
    BRANCHES,
    ENCODED_IMAGES,
    ConditionedProjector,
    EncodedImages,
    VisionBranch,
    vision_tower_dummy_inputs,
)

logger = logging.get_logger(__name__)


EXTRA_IMAGE_INPUTS = ("detection_images", "seg_images", "clip_pixel_values", "clip_images_grid_thw")

# Config fields of every branch's pad and action token ids.
_PAD_AND_ACTION_FIELDS = tuple(
    getattr(branch.tokens, field) for branch in BRANCHES.values() for field in ("image_token_id_field", "action_id_field")
)

# Layers the released projectors built but never used in their forward. We do not build them; their checkpoint
# tensors are dropped on load (and logged) instead of being reported as unexpected.
UNUSED_RELEASED_KEYS = (
    r"^(model\.)?clip_projector\.layernorm_feature\.",
    r"^(model\.)?clip_projector\.linear_feature\.",
    r"^(model\.)?seg_projector\.linear_feature\.",
)
RELEASED_CLIP_PROJECTOR = "depth_projector"
"""The released CLIP checkpoint's name of `clip_projector` (renamed on load)."""

CONTROL_STATE_ATTR = "vpt_control_state"
"""The attribute of a generation cache that holds each sequence's last final hidden state: the control state of an
action token that starts the next decode step."""

# Whether the `from_pretrained` call in progress may drop branches the config does not build (`drop_branches`).
_DROP_BRANCHES: ContextVar[bool] = ContextVar("vpt_drop_branches", default=False)


def _branch_modules(branch: VisionBranch) -> tuple[str, ...]:
    """The module names a branch's checkpoint tensors start with (the released CLIP name included)."""
    names = (branch.encoder_attr, branch.projector_attr)
    if branch.kind == "clip":
        names += (RELEASED_CLIP_PROJECTOR,)
    return tuple(name for name in names if name)


def _unbuilt_branch_keys(keys: list[str], built: list[str]) -> dict[str, list[str]]:
    """The checkpoint keys of every branch that is not built, by branch kind (only branches with keys)."""
    found = {}
    for kind, branch in BRANCHES.items():
        if kind in built:
            continue
        prefixes = tuple(f"{where}{name}." for name in _branch_modules(branch) for where in ("", "model."))
        branch_keys = [key for key in keys if key.startswith(prefixes)]
        if branch_keys:
            found[kind] = branch_keys
    return found


BRANCH_MODULES = tuple(
    name for branch in BRANCHES.values() for name in (branch.encoder_attr, branch.projector_attr) if name
)
"""The modules the branches add (`detection_model`, `detection_projector`, `seg_model`, ...), owned by the VPT
model (``model.<name>``) and saved at the top level of a checkpoint, as the released checkpoints have them."""


def vpt_checkpoint_conversion_mapping(legacy_layout: bool) -> dict[str, str]:
    r"""`_checkpoint_conversion_mapping` of a VPT ForConditionalGeneration: checkpoint keys -> module names.

    The branch modules (`BRANCH_MODULES`) are top-level keys in a checkpoint and live in the VPT model. With
    ``legacy_layout`` (Qwen2-VL, Qwen2.5-VL: checkpoints hold `visual.*` and `model.*` for the language model, the
    base's own mapping) the language model's rule leaves them alone. `save_pretrained` applies the mapping in
    reverse, so saved checkpoints keep the released layout.
    """
    branches = {f"^{name}": f"model.{name}" for name in BRANCH_MODULES}
    if not legacy_layout:
        return branches
    others = "|".join(("language_model", "visual", *BRANCH_MODULES))
    return {"^visual": "model.visual", **branches, rf"^model(?!\.({others}))": "model.language_model"}


@dataclass
class VPTModelOutputWithPast(ModelOutput):
    """Output of a VPT model: pass 2's hidden states (pass 1's over the prefix pass 2 reuses), its cache, the rope
    deltas of the prefill (M-RoPE)."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor]] = None
    attentions: Optional[tuple[torch.FloatTensor]] = None
    rope_deltas: Optional[torch.LongTensor] = None


@dataclass
class VPTCausalLMOutputWithPast(Qwen2VLCausalLMOutputWithPast):
    """Qwen2-VL output plus the final hidden state of the last position, the control state of a next action token."""

    last_hidden_state: Optional[torch.FloatTensor] = None


@dataclass
class _PassOne:
    """Pass 1's cache and hidden states over columns [0, end): the prefix pass 2 can reuse."""

    cache: Cache
    hidden_states: torch.Tensor


@dataclass
class ExtraImageFeatures:
    """The extra images of one branch in a batch, encoded and paired with their samples.

    Returned by [`VPTModelMixin.get_extra_image_features`], consumed by
    `get_extra_image_embeds`, `scatter_extra_image_features` and `get_control_states_per_image`.
    """

    branch: VisionBranch
    features: torch.Tensor  # raw encoder output, images in batch order
    tokens_per_image: torch.Tensor  # (num_images,)
    image_rows: list[int]  # sample index of each image
    pad_mask: torch.Tensor  # (batch, seq) positions of the branch's pad tokens
    dummy: bool = False  # a blank image encoded only to keep module calls uniform; it has no pad tokens
    embedded: Optional[torch.Tensor] = None  # the unconditioned projection, computed once for both passes
    deepstack: Optional[list[torch.Tensor]] = None  # DeepStack features, per layer (the clip branch on Qwen3-VL)


@dataclass
class DeepStackFeatures:
    """Vision features a DeepStack base (Qwen3-VL) adds to the hidden states of its first decoder layers.

    `layers[k]` is added after decoder layer k at the `positions` of the batch, in row-major order: the text model's
    `visual_pos_masks` and `deepstack_visual_embeds`.
    """

    positions: torch.BoolTensor  # (batch, seq)
    layers: list[torch.Tensor]  # per layer (positions.sum(), hidden)

    def merge(self, other: Optional["DeepStackFeatures"]) -> "DeepStackFeatures":
        """Both sets of features, at the union of their (disjoint) positions."""
        if other is None:
            return self
        positions = self.positions | other.positions
        mine, theirs = self.positions[positions], other.positions[positions]
        layers = []
        for own, added in zip(self.layers, other.layers, strict=True):
            merged = own.new_zeros(int(positions.sum()), own.shape[-1])
            merged[mine] = own
            merged[theirs] = added.to(own.dtype)
            layers.append(merged)
        return DeepStackFeatures(positions, layers)

    def decoder_kwargs(self, start: int, end: int) -> dict:
        """The text model's DeepStack inputs for a decoder pass over input columns [start, end) (none if no position
        lies there)."""
        positions = self.positions[:, start:end]
        if not positions.any():
            return {}
        if (start, end) == (0, self.positions.shape[1]):
            return {"visual_pos_masks": positions, "deepstack_visual_embeds": self.layers}
        order = torch.zeros(self.positions.shape, dtype=torch.long, device=positions.device)
        order[self.positions] = torch.arange(int(self.positions.sum()), device=positions.device)
        rows = order[:, start:end][positions]
        return {"visual_pos_masks": positions, "deepstack_visual_embeds": [layer[rows] for layer in self.layers]}


class _ZeroContribution:
    """Outputs computed only so that every rank calls the same modules; they join the result multiplied by 0.

    Adding `0 * sum(outputs)` leaves every value and every gradient unchanged, but puts the modules that made these
    outputs in the autograd graph: their parameters get a zero gradient, and their backward runs on every rank.
    """

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def add(self, output: torch.Tensor) -> None:
        self.terms.append(output.float().sum())

    def attach(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.terms:
            return hidden_states
        return hidden_states + 0.0 * torch.stack(self.terms).sum().to(hidden_states.dtype)


def _fsdp_enabled() -> bool:
    """Whether this process trains under FSDP (`TrainingArguments(fsdp=...)` and accelerate set this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes", "on")


class VPTPreTrainedMixin:
    """What the VPT model and the VPT ForConditionalGeneration share: the projectors' initialisation."""

    def _init_weights(self, module):
        if isinstance(module, ConditionedProjector):
            module.reset_parameters()  # xavier / zeros, as the released projectors
        else:
            super()._init_weights(module)


class VPTModelMixin(VPTPreTrainedMixin):
    """The VPT layer of a base's ``…Model``: the re-encoding branches and the two-pass forward."""

    rope_index_inputs: tuple[str, ...] = ()
    """Inputs of the base's `get_rope_index` besides ids, grids and the attention mask (forward keywords)."""

    uniform_module_calls: Optional[bool] = None
    """Uniform module calls: every forward over a new sequence (no cache yet: training, evaluation, a generation
    prefill) calls the same modules, the same number of times, in the same order, whatever the batch holds:

    * the vision tower once for `pixel_values` (a blank image if there are none);
    * every built branch's encoder once (on its images, else on one blank image: `VisionBranch.dummy_inputs`), and
      its projector once per decoder pass (unconditioned, then conditioned; in single-pass mode its condition
      layers once more on a zero control state);
    * in two-pass mode the decoder twice: pass 1 (over the first column only when there is no action token), then
      pass 2.

    What a batch does not need joins the output multiplied by 0 (`_ZeroContribution`): logits, loss and gradients
    are unchanged, and every trainable VPT parameter gets a (zero) gradient. DeepSpeed ZeRO-3 and FSDP need this,
    as every module call gathers its parameters collectively. `None` (default): on when either is enabled
    (`is_deepspeed_zero3_enabled()`, `ACCELERATE_USE_FSDP`); `True` / `False` force it. Videos are not covered:
    under ZeRO-3 or FSDP, do not mix batches with and without videos.
    """


    def __init__(self, config):
        super().__init__(config)  # the base's towers (and its post_init)
        self.vpt_branches = [BRANCHES[kind] for kind in config.vision_encoder_ls]
        self._vpt_token_tensor = None  # ((token ids, device), tensor) for `_has_vpt_tokens`
        for branch in self.vpt_branches:
            for name, module in branch.build(config).items():
                self.add_module(name, module)
        self.post_init()

    # ------------------------------------------------------------------ steps
    def _branch_token_ids(self, branch: VisionBranch, field: str) -> Optional[int]:
        return getattr(self.config, getattr(branch.tokens, field))

    @property
    def uses_uniform_module_calls(self) -> bool:
        """Whether forwards over new sequences call every module uniformly (see `uniform_module_calls`)."""
        if self.uniform_module_calls is not None:
            return self.uniform_module_calls
        return is_deepspeed_zero3_enabled() or _fsdp_enabled()

    def get_vision_features(
        self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, videos: bool = False
    ) -> EncodedImages:
        """The base's vision tower on images (`get_image_features`) or videos (`get_video_features`): one feature
        tensor per image and, for a base whose tower makes them, the DeepStack features. A DeepStack base (Qwen3-VL)
        overrides this to unpack them; by default there are none."""
        encode = self.get_video_features if videos else self.get_image_features
        return EncodedImages(pixel_values, grid_thw, tuple(encode(pixel_values, grid_thw)))

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        extra_image_inputs: dict | None = None,
    ) -> tuple[torch.Tensor, Optional[DeepStackFeatures]]:
        """The token embeddings of `input_ids` with the original images and videos scattered into their pad tokens,
        as the base's forward builds `inputs_embeds` (VPT pads keep their token embeddings), and the DeepStack
        features of those images and videos at their pad positions (None for a base without DeepStack).

        Args:
            extra_image_inputs (`dict`, *optional*):
                The branches' inputs (`detection_images`, `seg_images`, `clip_pixel_values`,
                `clip_images_grid_thw`), later given to `get_extra_image_features`. When it holds clip images, the
                images encoded here are recorded in it, so that a clip image identical to one of them reuses its
                features instead of a second vision-tower pass.
        """
        embeds = self.get_input_embeddings()(input_ids)
        deepstack = None
        if pixel_values is not None:
            encoded = self.get_vision_features(pixel_values, image_grid_thw)
            if extra_image_inputs is not None and extra_image_inputs.get("clip_pixel_values") is not None:
                extra_image_inputs[ENCODED_IMAGES] = encoded
            image_embeds = torch.cat(encoded.features, dim=0).to(embeds.device, embeds.dtype)
            image_mask, _ = self.get_placeholder_mask(input_ids, embeds, image_features=image_embeds)
            embeds = embeds.masked_scatter(image_mask, image_embeds)
            if encoded.deepstack is not None:
                deepstack = DeepStackFeatures(image_mask[..., 0], encoded.deepstack)
        if pixel_values_videos is not None:
            encoded = self.get_vision_features(pixel_values_videos, video_grid_thw, videos=True)
            video_embeds = torch.cat(encoded.features, dim=0).to(embeds.device, embeds.dtype)
            _, video_mask = self.get_placeholder_mask(input_ids, embeds, video_features=video_embeds)
            embeds = embeds.masked_scatter(video_mask, video_embeds)
            if encoded.deepstack is not None:
                deepstack = DeepStackFeatures(video_mask[..., 0], encoded.deepstack).merge(deepstack)
        return embeds, deepstack

    def get_inputs_embeds(self, input_ids: torch.LongTensor, *args, **kwargs) -> torch.Tensor:
        """The input embeddings of `embed_inputs` (same arguments), without the DeepStack features."""
        return self.embed_inputs(input_ids, *args, **kwargs)[0]

    def get_extra_deepstack(
        self, deepstack: Optional[DeepStackFeatures], extra_images: list[ExtraImageFeatures]
    ) -> Optional[DeepStackFeatures]:
        """`deepstack` (the original images' and videos') plus the DeepStack features of the extra images that enter
        the decoder with them: on a DeepStack base, the clip branch's re-encoded images at their pad positions when
        `config.clip_deepstack` is on. DINOv2 and SAM features never have any."""
        if not getattr(self.config, "clip_deepstack", False):
            return deepstack
        for images in extra_images:
            if images.deepstack is not None and not images.dummy:
                deepstack = DeepStackFeatures(images.pad_mask, images.deepstack).merge(deepstack)
        return deepstack

    def get_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        cache_position: torch.LongTensor | None = None,
        past_length: int = 0,
        **rope_inputs,
    ) -> torch.LongTensor:
        """M-RoPE positions (3, batch, seq) of `input_ids`: `get_rope_index` on a prefill (`past_length` 0, which
        also stores `rope_deltas`), the stored deltas on decode steps (the base's own rule). `rope_inputs`: the
        base's further `get_rope_index` inputs (`rope_index_inputs`, e.g. Qwen2.5-VL's `second_per_grid_ts`).

        VPT pad tokens are not image tokens for `get_rope_index`, so they take text positions — in training (the
        LLaMA-Factory collator calls the same function) and in generation alike.
        """
        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if past_length == 0 or self.rope_deltas is None:
            position_ids, rope_deltas = self.get_rope_index(
                input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, attention_mask=mask_2d,
                **rope_inputs,
            )
            self.rope_deltas = rope_deltas
            return position_ids
        batch_size, seq_length = input_ids.shape
        start = cache_position[0] if cache_position is not None else past_length
        delta = (start + self.rope_deltas).to(input_ids.device)
        delta = delta.repeat_interleave(batch_size // delta.shape[0], dim=0)
        return torch.arange(seq_length, device=input_ids.device).view(1, 1, -1).expand(3, batch_size, -1) + delta

    def get_extra_image_features(
        self, input_ids: torch.LongTensor, extra_image_inputs: dict, uniform: bool = False
    ) -> list[ExtraImageFeatures]:
        """Encode each branch's extra images and pair them with samples by their pad-token runs.

        Args:
            input_ids: The token ids, which hold one run of the branch's pad tokens per image, in sample order.
            extra_image_inputs: `detection_images`, `seg_images`, `clip_pixel_values`, `clip_images_grid_thw` (any
                may be missing or None).
            uniform: Uniform mode (see `uniform_module_calls`): a built branch without images encodes one blank
                image instead (an entry with `dummy=True` and no pads).

        Raises:
            ValueError: Images and pad tokens do not match (the message names the sample).
        """
        extra = extra_image_inputs
        collected = []
        built = {branch.kind for branch in self.vpt_branches}
        for kind, branch in BRANCHES.items():
            key = branch.tokens.images_key
            num_images = branch.num_images(extra)
            pad_id = self._branch_token_ids(branch, "image_token_id_field")
            pad_mask = input_ids == pad_id if pad_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
            pad_counts = pad_mask.sum(1).tolist()
            if kind not in built and num_images:
                raise ValueError(
                    f"{key} were given but the '{kind}' branch is not built (vision_encoder_ls={self.config.vision_encoder_ls})"
                )
            if num_images == 0:
                for row, count in enumerate(pad_counts):
                    if count:
                        missing = f"the '{kind}' branch is not built" if kind not in built else f"no {key} were given"
                        raise ValueError(f"Sample {row} has {count} {branch.tokens.image_pad} tokens but {missing}")
                if uniform and kind in built:
                    features, tokens_per_image, deepstack = branch.encode(
                        self, branch.dummy_inputs(self.config, input_ids.device)
                    )
                    collected.append(
                        ExtraImageFeatures(branch, features, tokens_per_image, [], pad_mask, True, deepstack=deepstack)
                    )
                continue
            if pad_id is None:
                raise ValueError(f"{key} were given but config.{branch.tokens.image_token_id_field} is not set")
            features, tokens_per_image, deepstack = branch.encode(self, extra)
            image_rows = _assign_images_to_rows(pad_counts, tokens_per_image.tolist(), branch)
            collected.append(
                ExtraImageFeatures(branch, features, tokens_per_image, image_rows, pad_mask, deepstack=deepstack)
            )
        return collected

    def _has_vpt_tokens(self, input_ids: torch.LongTensor) -> bool:
        """Whether `input_ids` hold a pad or action token of any branch, built or not."""
        # Read from the config's instance dict: PretrainedConfig's __getattribute__ costs microseconds per field, and
        # this runs on every decode step. The id fields are always set in the config's __init__.
        fields = object.__getattribute__(self.config, "__dict__")
        ids = tuple(token for name in _PAD_AND_ACTION_FIELDS if (token := fields.get(name)) is not None)
        if not ids:
            return False
        key = (ids, input_ids.device)
        if self._vpt_token_tensor is None or self._vpt_token_tensor[0] != key:  # built once, not on every step
            self._vpt_token_tensor = (key, torch.tensor(ids, device=input_ids.device))
        return bool(torch.isin(input_ids, self._vpt_token_tensor[1]).any())

    def get_action_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Positions of every `<|*_action|>` token of a built branch, like `input_ids`; an unbuilt branch's action
        token raises `ValueError`."""
        built = {branch.kind for branch in self.vpt_branches}
        ids = {kind: self._branch_token_ids(branch, "action_id_field") for kind, branch in BRANCHES.items()}
        built_ids = [action for kind, action in ids.items() if action is not None and kind in built]
        other_ids = {action: kind for kind, action in ids.items() if action is not None and kind not in built}
        if other_ids:
            hits = torch.isin(input_ids, torch.tensor(list(other_ids), device=input_ids.device))
            if hits.any():
                row = int(hits.any(1).nonzero()[0])
                kind = other_ids[int(input_ids[row][hits[row]][0])]
                action = BRANCHES[kind].tokens.action
                raise ValueError(f"Sample {row} has a {action} token but the '{kind}' branch is not built")
        if not built_ids:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return torch.isin(input_ids, torch.tensor(built_ids, device=input_ids.device))

    def get_control_states_per_image(
        self, images: ExtraImageFeatures, input_ids: torch.LongTensor, control_states: torch.Tensor
    ) -> torch.Tensor:
        """(num_images, projector_scale * hidden): the control states of each image's action tokens, paired within
        its sample in order. `control_states[:, t]` (batch, seq, hidden) is the control state of an action token at
        t (pass 1's final hidden state at t - 1); other positions are ignored."""
        states = control_states
        scale = self.config.projector_scale
        if images.dummy:
            return states.new_zeros(len(images.tokens_per_image), scale * states.shape[-1])
        action_id = self._branch_token_ids(images.branch, "action_id_field")
        per_image = []
        for row in sorted(set(images.image_rows)):
            num_images = images.image_rows.count(row)
            positions = (input_ids[row] == action_id).nonzero().flatten()
            if len(positions) != num_images * scale:
                raise ValueError(
                    f"Sample {row} has {len(positions)} {images.branch.tokens.action} tokens for {num_images} "
                    f"{images.branch.tokens.images_key} (projector_scale={scale}); each image needs {scale}"
                )
            row_states = states[row, positions].reshape(num_images, -1)
            per_image.append(row_states)
        # image_rows is non-decreasing (images are assigned in sample order), so concatenation keeps image order
        return torch.cat(per_image, dim=0)

    def get_extra_image_embeds(
        self, images: ExtraImageFeatures, control_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The branch projector's output for `images` (one row per pad token): the unconditioned projection without
        `control_states` (kept in `images.embedded`, which the conditioned projection then starts from), else
        f + (f.c)c under the per-image `control_states` (`get_control_states_per_image`)."""
        projector = getattr(self, images.branch.projector_attr)
        projected = projector(images.features, images.tokens_per_image, control_states, embedded=images.embedded)
        if control_states is None:
            images.embedded = projected
        return projected

    def scatter_extra_image_features(
        self, inputs_embeds: torch.Tensor, images: ExtraImageFeatures, control_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`inputs_embeds` with the pad tokens of `images` replaced by `get_extra_image_embeds(images,
        control_states)` (cf. Qwen2-VL's `masked_scatter` of image features into their placeholder mask)."""
        if images.dummy:
            raise ValueError("A dummy entry (uniform mode) has no pad tokens to scatter into")
        projected = self.get_extra_image_embeds(images, control_states).to(inputs_embeds.dtype)
        mask = images.pad_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, projected)

    def _scatter(self, embeds, images: ExtraImageFeatures, control_states=None, zero=None) -> torch.Tensor:
        """`scatter_extra_image_features`; a dummy entry's projection joins `zero` instead (uniform mode)."""
        if images.dummy:
            zero.add(self.get_extra_image_embeds(images, control_states).to(embeds.dtype))
            return embeds
        return self.scatter_extra_image_features(embeds, images, control_states)

    def _paragraph_mask(self, input_ids: torch.LongTensor, eligible_rows: torch.Tensor) -> torch.Tensor:
        """Mask modelling: positions to blank in pass 2, drawn per sample, per paragraph (chat turn)."""
        config = self.config
        paragraphs = (1,) if config.para_mask_id == 1 else (1, 3)
        draws = torch.rand(input_ids.shape[0], len(paragraphs)) < config.para_mask_ratio
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row in eligible_rows.nonzero().flatten().tolist():
            starts = (input_ids[row] == config.para_start_id).nonzero().flatten().tolist()
            ends = (input_ids[row] == config.para_end_id).nonzero().flatten().tolist()
            for draw, paragraph in zip(draws[row].tolist(), paragraphs):
                if draw and paragraph < min(len(starts), len(ends)):
                    mask[row, starts[paragraph] + 1 : ends[paragraph]] = True  # delimiters stay visible
        return mask

    def _decode(self, embeds, attention_mask, position_ids, past_key_values, cache_position, use_cache,
                deepstack: Optional[DeepStackFeatures] = None, start: int = 0, **kwargs):
        """One decoder pass over input columns [start, start + embeds.shape[1]), with their DeepStack features."""
        if deepstack is not None:
            kwargs.update(deepstack.decoder_kwargs(start, start + embeds.shape[1]))
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache_position=cache_position,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )

    def _partial_mask(self, attention_mask, query_start: int, query_end: int, key_end: int, cache_position,
                      batch_size: int):
        """The attention mask of a decoder pass over input columns [query_start, query_end) with keys [0, key_end)."""
        mask = _slice_mask(attention_mask, query_start, query_end, key_end)
        decoder = self.language_model
        if (
            query_end - query_start in (1, key_end)  # transformers' own path: no mask or `is_causal`
            or decoder.config._attn_implementation != "sdpa"
            or getattr(decoder, "has_sliding_layers", False)
            or (mask is not None and (mask.dim() != 2 or mask.shape[1] != key_end))
        ):
            return mask
        return _causal_mask(mask, cache_position[query_start:query_end], key_end, batch_size)

    def _pass_one(self, embeds, attention_mask, position_ids, past_key_values, cache_position, action_mask,
                  prev_hidden_state, zero=None, deepstack=None, **kwargs) -> tuple[torch.Tensor, Optional[_PassOne]]:
        """Pass 1: `control[:, t]` is the control state of an action token at t (the final hidden state at t-1).

        Causality makes everything after the last action token irrelevant to pass 1, so it stops there. Its keys and
        values are kept so that pass 2 can reuse the prefix that does not change. In uniform mode (`zero` given, no
        cache yet) a batch without such a column still runs pass 1, over its first column, with weight 0.
        """
        # last action column: pass 1 needs columns [0, end)
        end = int(action_mask.any(0).nonzero().max()) if action_mask.any() else 0
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        control = torch.zeros_like(embeds)
        prefix = None
        if end == 0 and zero is not None:  # uniform mode: pass 1 still runs, over the first column only
            dummy = self._decode(
                embeds[:, :1], _slice_mask(attention_mask, 0, 1, 1), position_ids[..., :1], None, cache_position[:1],
                use_cache=False, deepstack=deepstack, **kwargs,
            )
            zero.add(dummy.last_hidden_state)
        if end > 0:
            # Gradient checkpointing recomputes layers and cannot keep a cache: pass 2 then recomputes the prefix.
            keep_cache = not (self.training and self.language_model.gradient_checkpointing)
            cache = None
            if keep_cache:
                cache = _fork_cache(past_key_values) if past_length else DynamicCache(config=self.config)
            elif past_length:
                cache = _fork_cache(past_key_values)
            pass1 = self._decode(
                embeds[:, :end],
                self._partial_mask(attention_mask, 0, end, past_length + end, cache_position, embeds.shape[0]),
                position_ids[..., :end],
                cache,
                cache_position[:end],
                use_cache=cache is not None,
                deepstack=deepstack,
                **kwargs,
            )
            control[:, 1 : end + 1] = pass1.last_hidden_state
            if keep_cache:
                prefix = _PassOne(pass1.past_key_values, pass1.last_hidden_state)
        if action_mask[:, 0].any():
            if prev_hidden_state is None:
                row = int(action_mask[:, 0].nonzero()[0])
                raise ValueError(
                    f"Sample {row} starts with an action token but the control state of the token before it is "
                    "unknown; pass `prev_hidden_state` (the final hidden state of the previous position)"
                )
            control[:, 0] = prev_hidden_state.to(control.dtype)
        return control, prefix

    # ------------------------------------------------------------------ decode steps
    def _is_token_step(self, input_ids: torch.LongTensor, past_key_values: Optional[Cache], visual: tuple) -> bool:
        """Whether the forward is a decode step of one token over a cache, with no image: one decoder pass.

        Compiled, the rule is the base's (one new token over a given cache is a decode step), with no host sync, so
        that static-cache decoding compiles with ``fullgraph=True``. Eager, a step holding a VPT token takes the
        full path, which checks it (a pad without images, an action of an unbuilt branch); its result is the same.
        """
        if input_ids.shape[1] != 1 or past_key_values is None or any(value is not None for value in visual):
            return False
        if is_torchdynamo_compiling():
            return True
        return past_key_values.get_seq_length() > 0 and not self._has_vpt_tokens(input_ids)

    def _token_step(self, input_ids, attention_mask, position_ids, past_key_values, cache_position, use_cache,
                    prev_hidden_state, **kwargs) -> VPTModelOutputWithPast:
        """One decoder pass over one new token: an action token's input embedding is its control state (the final
        hidden state of the previous position, `prev_hidden_state`), selected without a branch on the data."""
        rope_inputs = {name: kwargs.pop(name) for name in self.rope_index_inputs if name in kwargs}
        embeds = self.get_input_embeddings()(input_ids)
        action_ids = [self._branch_token_ids(branch, "action_id_field") for branch in self.vpt_branches]
        action_ids = [action for action in action_ids if action is not None]
        if prev_hidden_state is not None and action_ids:
            is_action = torch.zeros_like(input_ids, dtype=torch.bool)
            for action in action_ids:
                is_action = is_action | (input_ids == action)
            embeds = torch.where(is_action[..., None], prev_hidden_state[:, None].to(embeds.dtype), embeds)
        if cache_position is None:
            past_length = past_key_values.get_seq_length()
            cache_position = torch.arange(past_length, past_length + 1, device=input_ids.device)
        if position_ids is None:
            position_ids = self.get_position_ids(
                input_ids, attention_mask, cache_position=cache_position, past_length=1, **rope_inputs
            )
        outputs = self._decode(
            embeds, attention_mask, position_ids, past_key_values, cache_position, use_cache, **kwargs
        )
        return VPTModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.rope_deltas,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.FloatTensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        rope_deltas: Optional[torch.LongTensor] = None,
        cache_position: Optional[torch.LongTensor] = None,
        detection_images: Optional[torch.FloatTensor] = None,
        seg_images: Optional[torch.FloatTensor] = None,
        clip_pixel_values: Optional[torch.FloatTensor] = None,
        clip_images_grid_thw: Optional[torch.LongTensor] = None,
        prev_hidden_state: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> VPTModelOutputWithPast:
        r"""
        detection_images (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
            Images for the DINOv2 branch, in sample order, one per `<detection_image>` placeholder.
        seg_images (`torch.FloatTensor` of shape `(num_images, 3, 1024, 1024)`, *optional*):
            Images for the SAM branch.
        clip_pixel_values (`torch.FloatTensor`, *optional*) and clip_images_grid_thw (`torch.LongTensor` of shape
        `(num_images, 3)`, *optional*):
            Images re-encoded by the model's own vision tower for the CLIP branch (Qwen2-VL image-processor format).
        prev_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            Final hidden state of the position before `input_ids[:, 0]`; needed when a decode step starts with an
            action token (generation passes it).
        """
        return_dict = kwargs.pop("return_dict", None)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        rope_inputs = {name: kwargs.pop(name) for name in self.rope_index_inputs if name in kwargs}
        extra = dict(zip(EXTRA_IMAGE_INPUTS, (detection_images, seg_images, clip_pixel_values, clip_images_grid_thw)))
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is None:  # `inputs_embeds` only: the base's own forward
            if any(value is not None for value in extra.values()):
                raise ValueError("VPT inputs need `input_ids` to locate their pad and action tokens")
            return super().forward(
                attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                rope_deltas=rope_deltas, cache_position=cache_position, return_dict=return_dict, **rope_inputs,
                **kwargs,
            )
        if use_cache is None:  # Qwen3-VL keeps it in the text config only
            use_cache = getattr(self.config, "use_cache", self.config.text_config.use_cache)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        visual = (pixel_values, pixel_values_videos, *extra.values())
        if self._is_token_step(input_ids, past_key_values, visual):
            output = self._token_step(
                input_ids, attention_mask, position_ids, past_key_values, cache_position, use_cache,
                prev_hidden_state, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                **rope_inputs, **kwargs,
            )
            return output if return_dict else output.to_tuple()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        # Uniform mode: what this batch does not need still runs, and joins the output multiplied by 0.
        zero = _ZeroContribution() if past_length == 0 and self.uses_uniform_module_calls else None
        has_extra = any(value is not None for value in extra.values())
        # The images first, as the base's forward: too few or too many image tokens is its ValueError.
        # In uniform mode the clip branch never reuses encoded images: the vision tower's calls would differ by rank.
        embeds, deepstack = self.embed_inputs(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            extra_image_inputs=extra if zero is None else None,
        )
        if position_ids is None:
            position_ids = self.get_position_ids(
                input_ids, attention_mask, image_grid_thw, video_grid_thw, cache_position, past_length, **rope_inputs
            )
        if cache_position is None:
            cache_position = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        decoder_kwargs = dict(
            attention_mask=attention_mask, position_ids=position_ids, cache_position=cache_position,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        if pixel_values is None and zero is not None:  # uniform mode: the vision tower runs on a blank image
            dummy = self.get_vision_features(*vision_tower_dummy_inputs(self.config.vision_config, input_ids.device))
            for output in (*dummy.features, *(dummy.deepstack or ())):
                zero.add(output)
        if zero is not None or has_extra or self._has_vpt_tokens(input_ids):
            extra_images = self.get_extra_image_features(input_ids, extra, uniform=zero is not None)
            action_mask = self.get_action_mask(input_ids)
        else:  # most decode steps: no VPT pad or action token, so one plain pass (one scan, one host sync)
            extra_images, action_mask = [], None
        real_images = [images for images in extra_images if not images.dummy]
        if zero is not None:  # DeepStack mergers whose output a batch does not use still get a (zero) gradient
            for images in extra_images:
                for layer in images.deepstack or ():
                    zero.add(layer)
        deepstack = self.get_extra_deepstack(deepstack, extra_images)
        unconditioned = embeds
        for images in extra_images:
            unconditioned = self._scatter(unconditioned, images, zero=zero)

        two_pass = self.config.num_inner_forward_run == 2
        has_actions = action_mask is not None and bool(action_mask.any())
        if two_pass and real_images and not has_actions:
            rows = sorted(set(real_images[0].image_rows))
            raise ValueError(
                f"Sample {rows[0]} has {real_images[0].branch.tokens.images_key} but no action token to "
                "condition them (two-pass mode needs one control token per image)"
            )
        prefix, start = None, 0  # pass 2 recomputes columns [start, L) on top of pass 1's cache
        if not two_pass or not (has_actions or zero is not None):
            if zero is not None:  # single-pass mode never conditions; the condition layers still run, times 0
                zero_state = embeds.new_zeros(1, self.config.projector_scale * embeds.shape[-1])
                for images in extra_images:
                    zero.add(getattr(self, images.branch.projector_attr).condition(zero_state))
            final_embeds = unconditioned
        else:
            control, prefix = self._pass_one(
                unconditioned, attention_mask, position_ids, past_key_values, cache_position, action_mask,
                prev_hidden_state, zero, deepstack, **kwargs,
            )
            changed = action_mask.clone()
            final_embeds = embeds
            for images in extra_images:
                final_embeds = self._scatter(
                    final_embeds, images, self.get_control_states_per_image(images, input_ids, control), zero
                )
                changed |= images.pad_mask
            if self.training and self.config.para_mask_id and self.config.para_mask_ratio > 0 and real_images:
                reencoded_rows = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                for images in real_images:
                    reencoded_rows[images.image_rows] = True
                blank = self._paragraph_mask(input_ids, reencoded_rows & action_mask.any(1))
                final_embeds = final_embeds.masked_fill(blank.unsqueeze(-1), 0.0)
                changed |= blank
            # Every action token carries its control state into pass 2 as a soft token.
            final_embeds = torch.where(action_mask.unsqueeze(-1), control.to(final_embeds.dtype), final_embeds)
            if prefix is not None and not (output_hidden_states or output_attentions):
                start = int(changed.any(0).nonzero().min())  # pass 2 equals pass 1 before the first change

        if start > 0:
            cache = prefix.cache
            cache.crop(past_length + start)
            outputs = self._decode(
                final_embeds[:, start:],
                self._partial_mask(
                    attention_mask, start, input_ids.shape[1], past_length + input_ids.shape[1], cache_position,
                    input_ids.shape[0],
                ),
                position_ids[..., start:],
                cache,
                cache_position[start:],
                use_cache=True,
                deepstack=deepstack,
                start=start,
                **kwargs,
            )
            hidden_states = torch.cat([prefix.hidden_states[:, :start], outputs.last_hidden_state], dim=1)
            past_out = cache if use_cache else None
        else:
            outputs = self._decode(
                final_embeds, past_key_values=past_key_values, use_cache=use_cache, deepstack=deepstack,
                **decoder_kwargs,
            )
            hidden_states, past_out = outputs.last_hidden_state, outputs.past_key_values
        if zero is not None:
            hidden_states = zero.attach(hidden_states)
        output = VPTModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_out,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.rope_deltas,
        )
        return output if return_dict else output.to_tuple()




class VPTForConditionalGenerationMixin(VPTPreTrainedMixin):
    """The VPT layer of a base's ``…ForConditionalGeneration``: the VPT model (`vpt_model_class`), the LM head and
    the loss, the VPT generation rules, and the released checkpoint layout."""

    vpt_model_class: type[PreTrainedModel]
    """The base's VPT model class (``VPT_<Base>Model``)."""
    _keys_to_ignore_on_load_unexpected = list(UNUSED_RELEASED_KEYS)
    _checkpoint_conversion_mapping = vpt_checkpoint_conversion_mapping(legacy_layout=True)

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # the base's layout, with the VPT model in place of its model
        self.model = self.vpt_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def vpt_branches(self) -> list[VisionBranch]:
        """The built branches, in `vision_encoder_ls` order."""
        return self.model.vpt_branches

    @property
    def uniform_module_calls(self) -> Optional[bool]:
        """The VPT model's `uniform_module_calls` (see `VPTModelMixin.uniform_module_calls`)."""
        return self.model.uniform_module_calls

    @uniform_module_calls.setter
    def uniform_module_calls(self, value: Optional[bool]) -> None:
        self.model.uniform_module_calls = value

    @property
    def uses_uniform_module_calls(self) -> bool:
        return self.model.uses_uniform_module_calls

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _fix_state_dict_key_on_load(key: str) -> tuple[str, bool]:
        # The released CLIP checkpoint names its projector `depth_projector`.
        if key.startswith(f"{RELEASED_CLIP_PROJECTOR}."):
            return "clip_projector." + key[len(RELEASED_CLIP_PROJECTOR) + 1 :], True
        return PreTrainedModel._fix_state_dict_key_on_load(key)

    @classmethod
    def from_pretrained(cls, *args, drop_branches: bool = False, **kwargs):
        r"""`PreTrainedModel.from_pretrained`, which also refuses to drop trained branches silently.

        A checkpoint whose weights hold a branch (`detection_model`/`detection_projector`, `seg_model`/
        `seg_projector`, `clip_projector`) that the config's `vision_encoder_ls` leaves out (e.g.
        `from_pretrained(dir, vision_encoder_ls=["dino"])` on a dino+sam+clip checkpoint) raises `ValueError` naming
        the branches: the model would not hold their weights, and a checkpoint saved from it would lose them.

        Args:
            drop_branches (`bool`, *optional*, defaults to `False`):
                Load such a checkpoint anyway, leaving those branches out (logged at WARNING). LLaMA-Factory:
                `vpt_drop_branches: true`.
        """
        if not _transformers_maps_keys(cls):  # transformers applies the mapping by itself only to the VLMs it lists
            kwargs.setdefault("key_mapping", cls._checkpoint_conversion_mapping)
        token = _DROP_BRANCHES.set(bool(drop_branches))
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            _DROP_BRANCHES.reset(token)

    def save_pretrained(self, save_directory, *args, state_dict: Optional[dict] = None, **kwargs):
        """`PreTrainedModel.save_pretrained` in the checkpoint layout of every base: the branch modules at the top
        level (`detection_model.*`), as the released checkpoints have them. (transformers reverses
        `_checkpoint_conversion_mapping` itself only for the VLM classes it lists: Qwen2-VL, Qwen2.5-VL.)"""
        if not _transformers_maps_keys(type(self)):
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {_checkpoint_key(key, self._checkpoint_conversion_mapping): v for key, v in state_dict.items()}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def _adjust_missing_and_unexpected_keys(self, missing_keys, unexpected_keys, loading_task_model_from_base):
        missing, unexpected = super()._adjust_missing_and_unexpected_keys(
            missing_keys, unexpected_keys, loading_task_model_from_base
        )
        dropped = sorted(set(unexpected_keys) - set(unexpected))
        if dropped:
            logging.get_logger(type(self).__module__).info(
                f"Dropped {len(dropped)} checkpoint tensors of unused released projector layers: {dropped}"
            )
        unbuilt = _unbuilt_branch_keys(unexpected, self.config.vision_encoder_ls)
        if unbuilt:
            self._drop_unbuilt_branches(unbuilt)
            dropped_keys = {key for keys in unbuilt.values() for key in keys}
            unexpected = [key for key in unexpected if key not in dropped_keys]
        return missing, unexpected

    def _drop_unbuilt_branches(self, unbuilt: dict[str, list[str]]) -> None:
        """Raise for checkpoint branches the config does not build, unless `from_pretrained(drop_branches=True)`."""
        kinds = sorted(unbuilt, key=list(BRANCHES).index)
        keys = [key.removeprefix("model.") for kind in kinds for key in sorted(unbuilt[kind])]
        modules = list(dict.fromkeys(key.split(".", 1)[0] for key in keys))
        count = sum(len(keys) for keys in unbuilt.values())
        what = f"the {', '.join(kinds)} branch{'es' if len(kinds) > 1 else ''} ({', '.join(modules)}: {count} tensors)"
        if _DROP_BRANCHES.get():
            logging.get_logger(type(self).__module__).warning(
                f"Dropped {what} of the checkpoint (drop_branches=True): the model does not build them."
            )
            return
        path = self.config.name_or_path or "(no path)"
        raise ValueError(
            f"The checkpoint {path} holds trained weights of {what} that this model does "
            f"not build (vision_encoder_ls={self.config.vision_encoder_ls}): they would be dropped, and a checkpoint "
            f"saved from it would lose them. Keep them by adding {kinds} to vision_encoder_ls, or drop them on "
            "purpose with from_pretrained(..., drop_branches=True) (LLaMA-Factory YAML: vpt_drop_branches: true)."
        )


    def _loss(self, hidden_states, labels, num_items_in_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy computed in float32 on the labelled positions only (no full fp32 logits).

        Returns the loss and the logits, whose labelled rows are the loss's own: the LM head runs once per position.
        """
        targets = labels[:, 1:].to(hidden_states.device)
        keep = targets != -100
        rows = self.lm_head(hidden_states[:, :-1][keep])
        loss = nn.functional.cross_entropy(rows.float(), targets[keep], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        labelled = nn.functional.pad(keep, (0, 1))  # positions whose logits predict a label
        logits = rows.new_empty(*hidden_states.shape[:2], rows.shape[-1])
        logits[labelled] = rows
        logits[~labelled] = self.lm_head(hidden_states[~labelled])
        return loss / count, logits


    # ------------------------------------------------------------------ generation
    # One decoder pass per decode step: when the new token is `<|x_action|>`, its control state is the final hidden
    # state of the step that produced `<|x_action_start|>`, carried in `prev_hidden_state`. No cache copies.
    def get_vpt_logits_processors(self) -> tuple[list[LogitsProcessor], list[LogitsProcessor]]:
        """The VPT generation rules as logits processors: (those to run first, those to run last); `generate` puts
        them around the caller's `logits_processor`.

        First: [`VPTSuppressTokensLogitsProcessor`] over the action tokens (only ever forced) and the VPT pads (a
        generated pad would have no image features), before the caller's processors and the sampling warpers, so
        that top-k / top-p never keep only forbidden tokens. Last: [`VPTActionLogitsProcessor`], which forces
        `<|x_action|>` right after `<|x_action_start|>`. Empty lists for a model without VPT tokens.
        """
        action_after_start, pads = self._vpt_action_and_pad_ids()
        suppressed = vpt_suppressed_tokens(action_after_start, pads)
        first = [VPTSuppressTokensLogitsProcessor(suppressed)] if suppressed else []
        last = [VPTActionLogitsProcessor(action_after_start)] if action_after_start else []
        return first, last

    def _vpt_action_and_pad_ids(self) -> tuple[dict[int, int], list[int]]:
        """({action start id: action id}, [pad ids]) of the built branches whose ids are set."""
        action_after_start, pads = {}, []
        for branch in self.vpt_branches:
            start = self.model._branch_token_ids(branch, "action_start_id_field")
            action = self.model._branch_token_ids(branch, "action_id_field")
            if start is not None and action is not None:
                action_after_start[start] = action
            pad = self.model._branch_token_ids(branch, "image_token_id_field")
            if pad is not None:
                pads.append(pad)
        return action_after_start, pads

    def generate(self, inputs=None, generation_config=None, logits_processor=None, *args, **kwargs):
        r"""[`~GenerationMixin.generate`] with the VPT generation rules.

        The rules ([`get_vpt_logits_processors`]) join the caller's `logits_processor` list, which is kept: the pad and
        action suppression before the caller's processors, the forcing of `<|x_action|>` after them. `generate`
        places custom processors after the ones it builds from the generation config (repetition penalty, minimum
        length ...) and before the sampling warpers (temperature, top-k, top-p ...); every warper keeps the single
        finite score a forced row has, so the forced token always wins.

        Every decoding strategy works, beam search included: the control state carried from one decode step to the
        next rides on the cache and is reordered with it (`_reorder_cache`), and the extra images of the prompt are
        expanded per sample with its beams or return sequences (`_expand_inputs_for_generation`).
        """
        first, last = self.get_vpt_logits_processors()
        processors = LogitsProcessorList([*first, *(logits_processor or []), *last])
        return super().generate(inputs, generation_config, processors, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, inputs_embeds=None, cache_position=None, **kwargs
    ):
        prev_hidden_state = kwargs.pop("prev_hidden_state", None)
        if prev_hidden_state is None and past_key_values is not None:
            prev_hidden_state = getattr(past_key_values, CONTROL_STATE_ATTR, None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, cache_position=cache_position,
            **kwargs,
        )
        if inputs["cache_position"][0] != 0:  # extra images live in the prefix, like pixel_values
            inputs.update(dict.fromkeys(EXTRA_IMAGE_INPUTS))
        inputs["prev_hidden_state"] = prev_hidden_state
        return inputs

    # A private GenerationMixin hook, overridden because generate has no public way to carry per-sequence model state
    # from one decode step to the next (Qwen2-VL keeps its rope deltas on the model instead, which is not per call):
    # the step after `<|x_action_start|>` needs that step's final hidden state as its action token's control state.
    # It rides on the cache, per sequence, so that beam search reorders it with the cache (`_reorder_cache`).
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None:  # contiguous: a compiled decode step sees the same strides after prefill and decode
            setattr(cache, CONTROL_STATE_ATTR, outputs.last_hidden_state.clone(memory_format=torch.contiguous_format))
        model_kwargs.pop("prev_hidden_state", None)  # a caller's value served the first step only
        return model_kwargs

    def _reorder_cache(self, past_key_values: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: the cache and the control state it carries follow the selected beams (the hook
        `GenerationMixin` calls on models that carry more than keys and values)."""
        past_key_values.reorder_cache(beam_idx)
        state = getattr(past_key_values, CONTROL_STATE_ATTR, None)
        if state is not None:
            setattr(past_key_values, CONTROL_STATE_ATTR, state.index_select(0, beam_idx.to(state.device)))
        return past_key_values

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """The base's expansion for beams and return sequences, plus the extra images: each sample's DINOv2, SAM and
        clip images repeat with its rows, as its original images do (they have no batch dimension either)."""
        extra = {key: model_kwargs.pop(key) for key in EXTRA_IMAGE_INPUTS if model_kwargs.get(key) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if extra and expand_size > 1:
            if input_ids is None:
                raise ValueError("VPT inputs need `input_ids` to locate their pad and action tokens")
            extra = self._expand_extra_images(extra, input_ids, expand_size)
        model_kwargs.update(extra)
        return expanded_ids, model_kwargs

    def _expand_extra_images(self, extra: dict, input_ids: torch.LongTensor, expand_size: int) -> dict:
        """Repeat every sample's extra images `expand_size` times, sample by sample (images per sample: the runs of
        the branch's pad token in its row)."""
        expanded = {}
        for branch in BRANCHES.values():
            pad_id = self.model._branch_token_ids(branch, "image_token_id_field")
            clip = branch.kind == "clip"
            keys = ("clip_pixel_values", "clip_images_grid_thw") if clip else (branch.tokens.images_key,)
            if pad_id is None or all(key not in extra for key in keys):
                continue
            is_pad = input_ids == pad_id
            run_starts = is_pad & ~torch.nn.functional.pad(is_pad, (1, 0))[:, :-1]
            images_per_row = run_starts.sum(1).tolist()
            if branch.kind != "clip":
                expanded[keys[0]] = _repeat_per_row(extra[keys[0]], images_per_row, expand_size)
                continue
            grid = extra["clip_images_grid_thw"]
            patches_per_row = [int(rows.prod(-1).sum()) for rows in grid.split(images_per_row)]
            expanded["clip_pixel_values"] = _repeat_per_row(extra["clip_pixel_values"], patches_per_row, expand_size)
            expanded["clip_images_grid_thw"] = _repeat_per_row(grid, images_per_row, expand_size)
        return {**extra, **expanded}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.FloatTensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        rope_deltas: Optional[torch.LongTensor] = None,
        cache_position: Optional[torch.LongTensor] = None,
        detection_images: Optional[torch.FloatTensor] = None,
        seg_images: Optional[torch.FloatTensor] = None,
        clip_pixel_values: Optional[torch.FloatTensor] = None,
        clip_images_grid_thw: Optional[torch.LongTensor] = None,
        prev_hidden_state: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> VPTCausalLMOutputWithPast:
        r"""The VPT model's forward (`VPTModelMixin.forward`, which documents the VPT inputs), then the LM head and
        the loss: next-token cross-entropy in float32 on the labelled positions only. With `inputs_embeds` and no
        `input_ids`, the base model's own forward (no VPT token can be located) under the same head and loss."""
        return_dict = kwargs.pop("return_dict", None)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            rope_deltas=rope_deltas, cache_position=cache_position, detection_images=detection_images,
            seg_images=seg_images, clip_pixel_values=clip_pixel_values, clip_images_grid_thw=clip_images_grid_thw,
            prev_hidden_state=prev_hidden_state, return_dict=True, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        if labels is not None:
            loss, logits = self._loss(hidden_states, labels, kwargs.get("num_items_in_batch"))
        else:
            logits = self.lm_head(hidden_states)
        output = VPTCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=outputs.rope_deltas,
            last_hidden_state=hidden_states[:, -1],
        )
        return output if return_dict else output.to_tuple()


def _branch_module_property(name: str) -> property:
    def get(self):
        return getattr(self.model, name)

    return property(get, doc=f"The VPT model's `{name}` (a branch module; absent when its branch is not built).")


for _name in BRANCH_MODULES:  # `model.detection_projector` ..., as `visual` and `language_model` are
    setattr(VPTForConditionalGenerationMixin, _name, _branch_module_property(_name))


def _transformers_maps_keys(cls) -> bool:
    """Whether transformers applies `cls._checkpoint_conversion_mapping` on load and save by itself (the class names
    it lists in `modeling_utils.VLMS`)."""
    names = [klass.__name__.lower() for klass in cls.__mro__[:-1]]
    return any(allowed in name for name in names for allowed in modeling_utils.VLMS)


def _checkpoint_key(key: str, mapping: dict[str, str]) -> str:
    """The checkpoint name of module key `key`: the first rule of `mapping` (checkpoint -> module) reversed."""
    for checkpoint_pattern, module_prefix in mapping.items():
        if key.startswith(module_prefix + "."):
            return checkpoint_pattern.lstrip("^") + key[len(module_prefix) :]
    return key


def _repeat_per_row(tensor: torch.Tensor, lengths: list[int], times: int) -> torch.Tensor:
    """`tensor`'s rows split into consecutive chunks of `lengths` (one per sample), each repeated `times` times."""
    return torch.cat([chunk.repeat(times, *[1] * (chunk.dim() - 1)) for chunk in tensor.split(lengths)])


def _slice_mask(mask: Optional[torch.Tensor], query_start: int, query_end: int, key_end: int):
    """The part of a 2-D (batch, keys) or 4-D (batch, 1, queries, keys) attention mask a partial pass needs."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, :key_end]
    return mask[..., query_start:query_end, :key_end]


def _causal_mask(mask: Optional[torch.Tensor], queries: torch.Tensor, key_end: int, batch_size: int):
    """SDPA's boolean 4-D mask for queries at cache positions `queries` over keys [0, key_end), built by broadcasting.

    It is the mask transformers builds (key <= query, padding keys masked) when queries and keys differ in length and
    SDPA's `is_causal` cannot stand in, as in pass 2 after the reused prefix; transformers builds it with `vmap`, whose
    fixed cost (milliseconds on CPU) is paid on every call. `mask` is the 2-D mask sliced to the keys, or None.
    """
    causal = torch.arange(key_end, device=queries.device) <= queries[:, None]
    causal = causal.expand(batch_size, 1, -1, -1) if mask is None else causal & mask[:, None, None, :].bool()
    return causal  # a 4-D mask: every Qwen-VL text model uses it as it is


def _fork_cache(cache: Cache) -> DynamicCache:
    """A cache sharing the prefix tensors of `cache`: pass 1 extends the fork, the original stays untouched."""
    return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])


def _assign_images_to_rows(pad_counts: list[int], tokens_per_image: list[int], branch: VisionBranch) -> list[int]:
    """Give images to samples in order until each sample's pad tokens are covered exactly."""
    key, pad = branch.tokens.images_key, branch.tokens.image_pad
    rows, image = [], 0
    for row, count in enumerate(pad_counts):
        covered = 0
        while covered < count:
            if image == len(tokens_per_image):
                raise ValueError(f"Sample {row} has {count} {pad} tokens but the {key} ran out after image {image}")
            covered += tokens_per_image[image]
            rows.append(row)
            image += 1
        if covered != count:
            raise ValueError(
                f"Sample {row} has {count} {pad} tokens but its {key} give {covered} features "
                f"({tokens_per_image[image - rows.count(row):image]} per image)"
            )
    if image != len(tokens_per_image):
        raise ValueError(f"{len(tokens_per_image) - image} of the {key} have no {pad} tokens in any sample")
    return rows




__all__ = [
    "BRANCH_MODULES",
    "DeepStackFeatures",
    "EXTRA_IMAGE_INPUTS",
    "ExtraImageFeatures",
    "VPTCausalLMOutputWithPast",
    "VPTForConditionalGenerationMixin",
    "VPTModelMixin",
    "VPTModelOutputWithPast",
    "vpt_checkpoint_conversion_mapping",
]
