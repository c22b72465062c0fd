"""Batching: the extra image lists become `detection_images`, `seg_images`, `clip_pixel_values`/`clip_images_grid_thw`;
the record ids become `vpt_record`, a (batch, 2) tensor the trainer pops before the forward (see `records`).

Everything else (fake image, M-RoPE positions from `get_rope_index`, 4-D masks, dtype casting) is the upstream
collator's; the VPT pads are text positions for `get_rope_index`, which is the model's own rule. Batches without
those keys (every run that is not VPT) are collated by the upstream code alone. The SFT workflow imported the
collator class by name (no registry), so it is replaced there (guarded private patch).
"""

from dataclasses import dataclass
from typing import Any

import torch
from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
from llamafactory.train.sft import workflow

from .data import EXTRA_IMAGE_KEYS, unpack_paths
from .guard import Private
from .records import BATCH_KEY


@dataclass
class VPTDataCollator(SFTDataCollatorWith4DAttentionMask):
    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra_images = {
            key: [image for feature in features for image in unpack_paths(feature.pop(key, None))]
            for key in EXTRA_IMAGE_KEYS
        }  # popped before the tokenizer pads the features
        record_ids = [feature.pop(BATCH_KEY, None) for feature in features]
        batch = super().__call__(features)
        if record_ids and None not in record_ids:  # popped again by the trainer, which names them in errors
            batch[BATCH_KEY] = torch.tensor(record_ids, dtype=torch.long)
        if any(extra_images.values()):
            extra_inputs = self.template.mm_plugin.get_extra_mm_inputs(self.processor, **extra_images)
            for key, value in extra_inputs.items():
                batch[key] = value.to(self.compute_dtype) if torch.is_floating_point(value) else value

        return batch


PRIVATE = (
    Private(workflow, "SFTDataCollatorWith4DAttentionMask", expected=SFTDataCollatorWith4DAttentionMask,
            patch="batching"),
    Private(SFTDataCollatorWith4DAttentionMask, "__call__", ("self", "features"), patch="batching"),
)


def patch() -> None:
    workflow.SFTDataCollatorWith4DAttentionMask = VPTDataCollator
