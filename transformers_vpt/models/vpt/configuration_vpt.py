"""The Visual Perception Token fields of a configuration, the same for every Qwen-VL base.

A base's VPT config is ``class VPT_<Base>Config(VPTConfigMixin, <Base>Config)`` with its own ``model_type`` and
``sub_configs = {**<Base>Config.sub_configs, **VPT_SUB_CONFIGS}``; the mixin's ``__init__`` takes the VPT fields as
named parameters and passes everything else to the base's ``__init__``.
"""

from __future__ import annotations

from typing import Iterable

from transformers import Dinov2Config, SamVisionConfig

from ...vocabulary import BRANCH_TOKENS, normalize_encoder_list

# Public config values of the encoders the released VPT models were built with. A released config.json carries no
# encoder sub-config, so these are the defaults (see configs/models/ for the same values as files).
DINOV2_LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    num_channels=3,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    qkv_bias=True,
    use_swiglu_ffn=False,
    drop_path_rate=0.0,
    hidden_act="gelu",
)
SAM_VIT_LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4.0,
    output_channels=256,
    image_size=1024,
    patch_size=16,
    window_size=14,
    global_attn_indexes=[5, 11, 17, 23],
    num_pos_feats=128,
    qkv_bias=True,
    use_abs_pos=True,
    use_rel_pos=True,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)

# Config fields holding a token id, filled from the tokenizer by `vocabulary.fill_config_token_ids`.
TOKEN_ID_FIELDS = tuple(
    field
    for branch in BRANCH_TOKENS.values()
    for field in (branch.image_token_id_field, branch.action_id_field, branch.action_start_id_field)
) + ("para_start_id", "para_end_id")


class VPTDetectionConfig(Dinov2Config):
    """The DINOv2 encoder of the `dino` branch: a [`Dinov2Config`] stored under ``detection_config``, so that
    ``VPTDetectionConfig.from_pretrained(vpt_dir)`` reads it from a VPT model's config.json."""

    base_config_key = "detection_config"


class VPTSegConfig(SamVisionConfig):
    """The SAM vision encoder of the `sam` branch: a [`SamVisionConfig`] stored under ``seg_config``. (Stock
    `SamVisionConfig` reads ``vision_config``, which in a VPT config is the Qwen-VL vision tower's.)"""

    base_config_key = "seg_config"


def _sub_config(name: str, value, config_class, defaults: dict):
    if value is None:
        return config_class(**defaults)
    if isinstance(value, dict):
        return config_class(**value)
    if isinstance(value, config_class):
        return value
    if isinstance(value, config_class.__mro__[1]):  # the stock class: the same fields
        return config_class(**value.to_dict())
    raise ValueError(f"{name} must be a dict or {config_class.__name__}, got {type(value).__name__}")


VPT_SUB_CONFIGS = {"detection_config": VPTDetectionConfig, "seg_config": VPTSegConfig}
"""The sub-configs VPT adds to a base's: the DINOv2 encoder and the SAM vision encoder."""


class VPTConfigMixin:
    r"""
    The Visual Perception Token fields of a VPT configuration (mixed into a Qwen-VL base configuration).

    Args:
        detection_config (`dict` or [`Dinov2Config`], *optional*):
            The DINOv2 encoder of the `dino` branch. Defaults to DINOv2-large.
        seg_config (`dict` or [`SamVisionConfig`], *optional*):
            The SAM vision encoder of the `sam` branch. Defaults to SAM ViT-L.
        vision_encoder_ls (`list[str]` or `str`, *optional*):
            Re-encoding branches to build, a subset of `dino`, `sam`, `clip` (a list or a comma-separated string).
            When absent (released configs do not always carry it), it is inferred from the token ids that are set.
        num_inner_forward_run (`int`, *optional*, defaults to 1):
            1: single pass with unconditioned projections (alignment stage); 2: the two-pass VPT forward.
        projector_scale (`int`, *optional*, defaults to 1):
            Number of control-token hidden states concatenated into one projector condition.
        para_mask_id (`int`, *optional*, defaults to 0):
            Mask modelling: 0 off, 1 mask chat turn #1 (the first user turn), 2 mask turns #1 and #3.
        para_mask_ratio (`float`, *optional*, defaults to 0.0):
            Probability, drawn per sample, that a re-encoding sample gets the paragraph mask during training.
        seg_projector_stride (`int`, *optional*, defaults to 4):
            Kernel and stride of the SAM projector's convolution (64x64 SAM map -> 16x16 = 256 tokens).
        detection_image_token_id, detection_action_id, detection_action_start_id,
        seg_image_token_id, seg_action_id, seg_action_start_id,
        clip_image_token_id, clip_action_id, clip_action_start_id (`int`, *optional*):
            Ids of the branch's image pad, action and action-start tokens (see `transformers_vpt.add_vpt_tokens`).
        para_start_id, para_end_id (`int`, *optional*):
            Ids of `<|im_start|>` / `<|im_end|>`, the paragraph delimiters of mask modelling.
    """

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        detection_config=None,
        seg_config=None,
        vision_encoder_ls: str | Iterable[str] | None = None,
        num_inner_forward_run: int = 1,
        projector_scale: int = 1,
        para_mask_id: int = 0,
        para_mask_ratio: float = 0.0,
        seg_projector_stride: int = 4,
        detection_image_token_id: int | None = None,
        detection_action_id: int | None = None,
        detection_action_start_id: int | None = None,
        seg_image_token_id: int | None = None,
        seg_action_id: int | None = None,
        seg_action_start_id: int | None = None,
        clip_image_token_id: int | None = None,
        clip_action_id: int | None = None,
        clip_action_start_id: int | None = None,
        para_start_id: int | None = None,
        para_end_id: int | None = None,
        **kwargs,
    ):
        # The VPT fields are named parameters so that a legacy flat config never forwards them into `text_config`.
        kwargs.pop("alignment", None)  # dead flag of the released configs
        super().__init__(text_config=text_config, vision_config=vision_config, **kwargs)  # the base's config
        self.detection_config = _sub_config("detection_config", detection_config, VPTDetectionConfig, DINOV2_LARGE)
        self.seg_config = _sub_config("seg_config", seg_config, VPTSegConfig, SAM_VIT_LARGE)

        self.detection_image_token_id = detection_image_token_id
        self.detection_action_id = detection_action_id
        self.detection_action_start_id = detection_action_start_id
        self.seg_image_token_id = seg_image_token_id
        self.seg_action_id = seg_action_id
        self.seg_action_start_id = seg_action_start_id
        self.clip_image_token_id = clip_image_token_id
        self.clip_action_id = clip_action_id
        self.clip_action_start_id = clip_action_start_id
        self.para_start_id = para_start_id
        self.para_end_id = para_end_id

        if vision_encoder_ls is None:
            vision_encoder_ls = self._infer_encoders_from_token_ids()
        self.vision_encoder_ls = normalize_encoder_list(vision_encoder_ls)
        self.num_inner_forward_run = num_inner_forward_run
        self.projector_scale = projector_scale
        self.para_mask_id = para_mask_id
        self.para_mask_ratio = para_mask_ratio
        self.seg_projector_stride = seg_projector_stride
        self.validate_vpt()

    def _infer_encoders_from_token_ids(self) -> list[str]:
        return [
            kind
            for kind, branch in BRANCH_TOKENS.items()
            if getattr(self, branch.image_token_id_field) is not None or getattr(self, branch.action_id_field) is not None
        ]

    def validate_vpt(self) -> None:
        """Raise `ValueError` for any VPT field out of its domain."""

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.num_inner_forward_run not in (1, 2) or not is_int(self.num_inner_forward_run):
            raise ValueError(f"num_inner_forward_run must be 1 or 2, got {self.num_inner_forward_run!r}")
        if not is_int(self.projector_scale) or self.projector_scale < 1:
            raise ValueError(f"projector_scale must be an integer >= 1, got {self.projector_scale!r}")
        if not is_int(self.para_mask_id) or self.para_mask_id not in (0, 1, 2):
            raise ValueError(f"para_mask_id must be 0, 1 or 2, got {self.para_mask_id!r}")
        ratio = self.para_mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"para_mask_ratio must be a number in [0, 1], got {ratio!r}")
        if not is_int(self.seg_projector_stride) or self.seg_projector_stride < 1:
            raise ValueError(f"seg_projector_stride must be an integer >= 1, got {self.seg_projector_stride!r}")
        for field in TOKEN_ID_FIELDS:
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{field} must be a non-negative token id or None, got {value!r}")
        if self.para_mask_id and (self.para_start_id is None or self.para_end_id is None):
            raise ValueError("para_mask_id > 0 needs para_start_id and para_end_id (the <|im_start|>/<|im_end|> ids)")


__all__ = [
    "DINOV2_LARGE",
    "SAM_VIT_LARGE",
    "TOKEN_ID_FIELDS",
    "VPT_SUB_CONFIGS",
    "VPTConfigMixin",
    "VPTDetectionConfig",
    "VPTSegConfig",
]
