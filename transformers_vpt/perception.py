"""Vision re-encoding branches: one abstraction, three small implementations (DINOv2, SAM, CLIP).

A branch turns the extra images of one kind into LLM-sized features and projects them, optionally conditioned on
the control states of its action tokens:

    f = embed_features(encode(images))          # (num_tokens, H), images concatenated
    c = linear_condition(layernorm_condition(concat(p_1..p_s)))   # one condition per image
    out = f + (f . c) c                         # per token; out = f without a condition

Module and parameter names (`detection_model`, `detection_projector.layernorm_feature`, ...) are those of the
released checkpoints, so their state dicts load unchanged.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import Dinov2Model
from transformers.models.sam.modeling_sam import SamVisionEncoder

from .vocabulary import BRANCH_TOKENS, BranchTokens


class ConditionedProjector(nn.Module, abc.ABC):
    """Maps encoder features to LLM embeddings; the condition path is shared by every branch.

    The released initialisation (`reset_parameters`) is applied by the model's `_init_weights`, not in `__init__`:
    under DeepSpeed ZeRO-3 construction (`zero.Init`) each layer is partitioned as soon as it is built, and the
    projector could not re-initialise it there.
    """

    def __init__(self, hidden_size: int, projector_scale: int):
        super().__init__()
        self.layernorm_condition = nn.LayerNorm(hidden_size * projector_scale)
        self.linear_condition = nn.Linear(hidden_size * projector_scale, hidden_size)

    @abc.abstractmethod
    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output -> (num_tokens, hidden_size), images concatenated in order."""

    def forward(
        self,
        features: torch.Tensor,
        tokens_per_image: Optional[torch.Tensor] = None,
        control_states: Optional[torch.Tensor] = None,
        embedded: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Project `features`; with `control_states` of shape (num_images, s * H), apply f + (f.c)c per image.

        `embedded`: `embed_features(features)` when already computed (pass 2 reuses pass 1's).
        """
        embeds = self.embed_features(features) if embedded is None else embedded
        if control_states is None:
            return embeds
        condition = self.condition(control_states.to(embeds.dtype))
        condition = condition.repeat_interleave(tokens_per_image.to(condition.device), dim=0)
        # A raw dot product, no softmax or scaling: the released checkpoints were trained with exactly this.
        return embeds + (embeds * condition).sum(-1, keepdim=True) * condition

    def condition(self, control_states: torch.Tensor) -> torch.Tensor:
        """(num_images, s * H) control states -> (num_images, H) conditions."""
        return self.linear_condition(self.layernorm_condition(control_states))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


class DinoProjector(ConditionedProjector):
    """DINOv2 patch tokens (CLS dropped) -> LayerNorm -> Linear."""

    def __init__(self, in_dim: int, hidden_size: int, projector_scale: int):
        super().__init__(hidden_size, projector_scale)
        self.layernorm_feature = nn.LayerNorm(in_dim)
        self.linear_feature = nn.Linear(in_dim, hidden_size)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:  # (N, T, in_dim)
        return self.linear_feature(self.layernorm_feature(features)).flatten(0, 1)


class SamProjector(ConditionedProjector):
    """SAM neck map (N, C, h, w) -> channel LayerNorm -> strided Conv2d -> tokens in row-major grid order."""

    def __init__(self, in_channels: int, hidden_size: int, projector_scale: int, stride: int):
        super().__init__(hidden_size, projector_scale)
        self.layernorm_feature = nn.LayerNorm(in_channels)
        self.conv_feature = nn.Conv2d(in_channels, hidden_size, kernel_size=stride, stride=stride)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.layernorm_feature(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_feature(normed).flatten(2).transpose(1, 2).flatten(0, 1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.conv_feature.reset_parameters()  # PyTorch's default init, as released


class ClipProjector(ConditionedProjector):
    """Re-encoded Qwen2-VL visual tokens are already LLM-sized: the feature path is the identity."""

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return features


class VisionBranch(abc.ABC):
    """What the model needs to know about one re-encoding branch: how to build its modules and encode images."""

    kind: str
    encoder_attr: Optional[str] = None  # None: the branch re-uses the model's own vision tower

    @property
    def tokens(self) -> BranchTokens:
        return BRANCH_TOKENS[self.kind]

    @property
    def projector_attr(self) -> str:
        return f"{self.tokens.prefix}_projector"

    @abc.abstractmethod
    def build(self, config) -> dict[str, nn.Module]:
        """Modules to attach to the model, by attribute name."""

    @abc.abstractmethod
    def encode(
        self, model, inputs: dict
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[torch.Tensor]]]:
        """Run the encoder on this branch's inputs (``model``: the VPT model, `VPTModelMixin`, which owns the encoders
        and `get_vision_features`): (raw features, tokens per image, DeepStack features), or
        (None, None, None) if absent. DeepStack features (one tensor per decoder layer, rows as the features') come
        only from a vision tower that makes them (the clip branch on Qwen3-VL); else None."""

    @abc.abstractmethod
    def dummy_inputs(self, config, device) -> dict[str, torch.Tensor]:
        """The smallest input `encode` takes: one blank image, encoded when a batch has none (uniform mode)."""

    def num_images(self, inputs: dict) -> int:
        images = inputs.get(self.tokens.images_key)
        return 0 if images is None else images.shape[0]


class DinoBranch(VisionBranch):
    kind = "dino"
    encoder_attr = "detection_model"

    def build(self, config):
        return {
            self.encoder_attr: Dinov2Model(config.detection_config),
            self.projector_attr: DinoProjector(
                config.detection_config.hidden_size, config.text_config.hidden_size, config.projector_scale
            ),
        }

    def encode(self, model, inputs):
        images = inputs.get("detection_images")
        if images is None:
            return None, None, None
        encoder = getattr(model, self.encoder_attr)
        features = encoder(pixel_values=images.to(encoder.dtype)).last_hidden_state[:, 1:]  # drop CLS
        return features, torch.full((features.shape[0],), features.shape[1], dtype=torch.long), None

    def dummy_inputs(self, config, device):
        vision = config.detection_config  # one patch: DINOv2 interpolates its position embeddings
        size = vision.patch_size
        return {"detection_images": torch.zeros(1, vision.num_channels, size, size, device=device)}


class SamBranch(VisionBranch):
    kind = "sam"
    encoder_attr = "seg_model"

    def build(self, config):
        return {
            self.encoder_attr: SamVisionEncoder(config.seg_config),
            self.projector_attr: SamProjector(
                config.seg_config.output_channels,
                config.text_config.hidden_size,
                config.projector_scale,
                config.seg_projector_stride,
            ),
        }

    def encode(self, model, inputs):
        images = inputs.get("seg_images")
        if images is None:
            return None, None, None
        encoder = getattr(model, self.encoder_attr)
        features = encoder(images.to(encoder.dtype)).last_hidden_state  # (N, C, h, w)
        stride = model.config.seg_projector_stride
        per_image = (features.shape[2] // stride) * (features.shape[3] // stride)
        return features, torch.full((features.shape[0],), per_image, dtype=torch.long), None

    def dummy_inputs(self, config, device):
        vision = config.seg_config  # SAM only takes its full input size
        size = vision.image_size
        return {"seg_images": torch.zeros(1, vision.num_channels, size, size, device=device)}


# `encode` input key: the forward's original images as already encoded by the vision tower (`EncodedImages`). The
# clip branch reuses the features of identical images.
ENCODED_IMAGES = "encoded_images"


@dataclass
class EncodedImages:
    """Images as the base's vision tower encoded them (`VPTModelMixin.get_vision_features`).

    `features` holds one tensor per image; `deepstack` (a DeepStack base such as Qwen3-VL, else None) one tensor
    per decoder layer the DeepStack features enter, whose rows follow the images' tokens in order.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    features: tuple[torch.Tensor, ...]
    deepstack: Optional[list[torch.Tensor]] = None

    def deepstack_of(self, index: int) -> Optional[list[torch.Tensor]]:
        """The DeepStack rows of image `index`, per layer (None without DeepStack)."""
        if self.deepstack is None:
            return None
        start = sum(len(features) for features in self.features[:index])
        end = start + len(self.features[index])
        return [layer[start:end] for layer in self.deepstack]


class ClipBranch(VisionBranch):
    kind = "clip"

    def build(self, config):
        return {self.projector_attr: ClipProjector(config.text_config.hidden_size, config.projector_scale)}

    def encode(self, model, inputs):
        pixel_values = inputs.get("clip_pixel_values")
        if pixel_values is None:
            return None, None, None
        grid_thw = inputs["clip_images_grid_thw"]
        tokens_per_image = (grid_thw.prod(-1) // model.visual.spatial_merge_size**2).cpu()
        images = pixel_values.split(grid_thw.prod(-1).tolist())
        # Round 2 re-encodes the image shown in round 1, which the same forward has just encoded: reuse it.
        known = inputs.get(ENCODED_IMAGES)
        matches = _already_encoded(images, grid_thw, known)
        todo = [index for index, match in enumerate(matches) if match is None]
        if len(todo) == len(images):
            encoded = model.get_vision_features(pixel_values, grid_thw)
            return torch.cat(encoded.features), tokens_per_image, encoded.deepstack
        new = model.get_vision_features(torch.cat([images[i] for i in todo]), grid_thw[todo]) if todo else None
        sources = [
            (known, match) if match is not None else (new, todo.index(index)) for index, match in enumerate(matches)
        ]
        features = torch.cat([source.features[at] for source, at in sources])
        per_image = [source.deepstack_of(at) for source, at in sources]
        deepstack = None if per_image[0] is None else [torch.cat(rows) for rows in zip(*per_image)]
        return features, tokens_per_image, deepstack

    def dummy_inputs(self, config, device):
        pixel_values, grid_thw = vision_tower_dummy_inputs(config.vision_config, device)
        return {"clip_pixel_values": pixel_values, "clip_images_grid_thw": grid_thw}

    def num_images(self, inputs):
        grid = inputs.get("clip_images_grid_thw")
        if grid is None and inputs.get("clip_pixel_values") is not None:
            raise ValueError("clip_pixel_values were given without clip_images_grid_thw")
        return 0 if grid is None else grid.shape[0]


def vision_tower_dummy_inputs(vision_config, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thw) of one blank image of the smallest grid a Qwen-VL vision tower takes: one token."""
    merge = vision_config.spatial_merge_size
    patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    grid_thw = torch.tensor([[1, merge, merge]], device=device)
    return torch.zeros(merge * merge, patch_dim, device=device), grid_thw


def _already_encoded(images, grid_thw: torch.Tensor, encoded: Optional[EncodedImages]) -> list[Optional[int]]:
    """Per image, the index of an identical (same grid, same pixels) already-encoded image, or None."""
    found = [None] * len(images)
    if encoded is None:
        return found
    known_pixels, known_grid = encoded.pixel_values, encoded.grid_thw
    if known_pixels.dtype != images[0].dtype or known_pixels.shape[-1] != images[0].shape[-1]:
        return found
    known = known_pixels.split(known_grid.prod(-1).tolist())
    # Candidates by grid and first patch (one comparison for all pairs), then a full comparison per candidate.
    first = (torch.stack([image[0] for image in images])[:, None] == torch.stack([k[0] for k in known])[None]).all(-1)
    same_grid = (grid_thw[:, None].to(known_grid.device) == known_grid[None]).all(-1).to(first.device)
    for index, candidates in enumerate((first & same_grid).tolist()):
        for other, candidate in enumerate(candidates):
            if candidate and torch.equal(images[index], known[other]):
                found[index] = other
                break
    return found


BRANCHES: dict[str, VisionBranch] = {branch.kind: branch for branch in (DinoBranch(), SamBranch(), ClipBranch())}

__all__ = [
    "BRANCHES",
    "VisionBranch",
    "ConditionedProjector",
    "ENCODED_IMAGES",
    "EncodedImages",
    "DinoProjector",
    "SamProjector",
    "ClipProjector",
    "vision_tower_dummy_inputs",
]
