"""Tokenization: the extra image lists go through the plugin and into the dataset; `*_action` labels are masked.

LLaMA-Factory has no registry for dataset processors: `loader._get_dataset_processor` resolves the class names
below from its module globals when it runs, so they are replaced there (guarded private patch). The subclasses do
what the stock classes do unless the template's plugin is a VPT plugin.
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from llamafactory.data import loader
from llamafactory.data.processor import (
    PackedSupervisedDatasetProcessor,
    SupervisedDatasetProcessor,
    UnsupervisedDatasetProcessor,
)
from llamafactory.extras.constants import IGNORE_INDEX

from transformers_vpt.vocabulary import BRANCH_TOKENS, token_id

from .data import EXTRA_IMAGE_KEYS, RECORD_COLUMN, pack_paths, unpack_paths
from .guard import Private
from .plugin import VPTPluginMixin
from .records import BATCH_KEY


class ExtraImagesProcessorMixin:
    r"""Encodes each example with its extra images bound to the plugin and keeps them, and the record id
    (`vpt_record`), as dataset columns."""

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        plugin = self.template.mm_plugin
        if not isinstance(plugin, VPTPluginMixin):
            return super().preprocess_dataset(examples)

        model_inputs = defaultdict(list)
        for i in range(len(examples["_prompt"])):
            example = {key: values[i : i + 1] for key, values in examples.items()}
            extra = {key: unpack_paths(example.get(f"_{key}", [None])[0]) for key in EXTRA_IMAGE_KEYS}
            with plugin.extra_images(**extra):
                encoded = super().preprocess_dataset(example)

            if encoded.get("input_ids"):  # else the upstream processor dropped the example
                for key, values in encoded.items():
                    model_inputs[key] += values

                for key, images in extra.items():
                    model_inputs[key].append(pack_paths(images))

                if RECORD_COLUMN in example:  # the record id, for errors raised by a batch (see `records`)
                    model_inputs[BATCH_KEY].append(example[RECORD_COLUMN][0])

        return model_inputs


@dataclass
class VPTSupervisedDatasetProcessor(ExtraImagesProcessorMixin, SupervisedDatasetProcessor):
    def _encode_data_example(self, *args, **kwargs) -> tuple[list[int], list[int]]:
        r"""Upstream encoding; then every `<|*_action|>` label is ignored (its input is a control state)."""
        input_ids, labels = super()._encode_data_example(*args, **kwargs)
        if not isinstance(self.template.mm_plugin, VPTPluginMixin):
            return input_ids, labels
        action_ids = {token_id(self.tokenizer, branch.action) for branch in BRANCH_TOKENS.values()} - {None}
        return input_ids, [IGNORE_INDEX if label in action_ids else label for label in labels]


class VPTUnsupervisedDatasetProcessor(ExtraImagesProcessorMixin, UnsupervisedDatasetProcessor):
    pass


@dataclass
class VPTPackedSupervisedDatasetProcessor(PackedSupervisedDatasetProcessor):
    def __post_init__(self):
        if isinstance(self.template.mm_plugin, VPTPluginMixin):
            raise ValueError(
                f"`packing`/`neat_packing` is not supported with the {self.data_args.template} template (mask "
                "modelling and the pairing of extra images with their action tokens assume one sample per row): "
                "remove `packing` and `neat_packing` from the recipe"
            )


_FIELDS = ("template", "tokenizer", "processor", "data_args")
_ENCODE = ("self", "prompt", "response", "system", "tools", "images", "videos", "audios")
PRIVATE = (
    Private(loader, "SupervisedDatasetProcessor", _FIELDS, expected=SupervisedDatasetProcessor, patch="tokenization"),
    Private(loader, "UnsupervisedDatasetProcessor", _FIELDS, expected=UnsupervisedDatasetProcessor,
            patch="tokenization"),
    Private(loader, "PackedSupervisedDatasetProcessor", _FIELDS, expected=PackedSupervisedDatasetProcessor,
            patch="packing check"),
    Private(SupervisedDatasetProcessor, "_encode_data_example", _ENCODE, patch="action label masking"),
    Private(SupervisedDatasetProcessor, "preprocess_dataset", ("self", "examples"), patch="extra images"),
)


def patch() -> None:
    loader.SupervisedDatasetProcessor = VPTSupervisedDatasetProcessor
    loader.UnsupervisedDatasetProcessor = VPTUnsupervisedDatasetProcessor
    loader.PackedSupervisedDatasetProcessor = VPTPackedSupervisedDatasetProcessor
