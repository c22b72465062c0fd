"""Dataset columns: `detection_images`, `seg_images` and `clip_images` in `dataset_info.json`, resolved like `images`.

* **Formattings** `vpt_sharegpt`, `vpt_alpaca` and `vpt_openai` (`register_dataset_converter`): the stock converters
  plus the extra image columns (`_detection_images`, ...), crop paths (`path_x0,y0,x1,y1`: the real path is
  resolved against `media_dir` and the suffix is kept) and the record id column of checked datasets (`records`). A
  `vpt_qwen2_vl` run reads a dataset declared with the stock formatting (as in the released `dataset_info.json`)
  through its VPT formatting (`vpt_formatting`); other runs keep the stock converters untouched.
* **Columns** (no registry: a guarded private patch): `parser.DatasetAttr` becomes a subclass that also reads
  `columns.detection_images/seg_images/clip_images`; for any other dataset its extra fields stay None. The released
  `dataset_info.json` maps the CLIP images under the column key `depth_images`; it is read as `clip_images`.
"""

import json
from dataclasses import dataclass
from typing import Any

from llamafactory.data import converter, parser
from llamafactory.data.converter import (
    AlpacaDatasetConverter,
    DatasetConverter,
    OpenAIDatasetConverter,
    SharegptDatasetConverter,
)
from llamafactory.data.parser import DatasetAttr

from transformers_vpt.regions import join_crop_path, split_crop_path
from transformers_vpt.vocabulary import BRANCH_TOKENS

from .guard import Private

EXTRA_IMAGE_KEYS = tuple(branch.images_key for branch in BRANCH_TOKENS.values())
"""`detection_images`, `seg_images`, `clip_images`: dataset columns, example keys and plugin arguments."""

RELEASED_CLIP_COLUMN_KEY = "depth_images"


def pack_paths(medias: list[Any] | None) -> str | list[Any]:
    r"""An extra-image list as a dataset cell: a JSON string when it holds paths (always, for these files).

    `datasets` types a column from the first batch it writes (1,000 rows). Extra images are usually absent from many
    records (a DINO record has no SAM images), so a first batch without any would type a list column as null and
    the first later row with images would fail to cast. A string column has one type whatever it holds.
    """
    medias = medias or []
    return json.dumps(medias) if all(isinstance(media, str) for media in medias) else medias


def unpack_paths(cell: str | list[Any] | None) -> list[Any]:
    r"""The inverse of `pack_paths` (``None`` reads as no images)."""
    return json.loads(cell) if isinstance(cell, str) else cell or []


PRIVATE = (
    Private(parser, "DatasetAttr", expected=DatasetAttr, patch="dataset_info.json columns"),
    Private(DatasetAttr, "join", ("self", "attr"), patch="dataset_info.json columns"),
    Private(DatasetAttr, "set_attr", ("self", "key", "obj", "default"), patch="dataset_info.json columns"),
    Private(DatasetConverter, "_find_medias", ("self", "medias"), patch="crop paths"),
)


@dataclass(repr=False)  # keep the upstream repr: the dataset name
class VPTDatasetAttr(DatasetAttr):
    detection_images: str | None = None
    seg_images: str | None = None
    clip_images: str | None = None

    def join(self, attr: dict[str, Any]) -> None:
        super().join(attr)
        columns = attr.get("columns", {})
        for key in EXTRA_IMAGE_KEYS:
            self.set_attr(key, columns)

        if self.clip_images is None:
            self.clip_images = columns.get(RELEASED_CLIP_COLUMN_KEY)


RECORD_COLUMN = "_vpt_record"
"""``[source key, record index]`` of each record of a checked `vpt_qwen2_vl` dataset (see `records`)."""


class ExtraImagesConverterMixin:
    r"""Emits `_detection_images`, `_seg_images` and `_clip_images` (None when absent) next to `_images`, and
    keeps the record id column of checked datasets."""

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        output = super().__call__(example)
        for key in EXTRA_IMAGE_KEYS:
            column = getattr(self.dataset_attr, key, None)
            output[f"_{key}"] = pack_paths(self._find_medias(example[column]) if column else None)

        if RECORD_COLUMN in example:
            output[RECORD_COLUMN] = example[RECORD_COLUMN]

        return output

    def _find_medias(self, medias):
        if isinstance(medias, str):
            medias = [medias]

        if not medias or not all(isinstance(media, str) for media in medias):
            return super()._find_medias(medias)

        paths, boxes = zip(*(split_crop_path(media) for media in medias), strict=True)
        found = super()._find_medias(list(paths))
        return [path if box is None else join_crop_path(path, box) for path, box in zip(found, boxes, strict=True)]


@dataclass
class VPTAlpacaDatasetConverter(ExtraImagesConverterMixin, AlpacaDatasetConverter):
    pass


@dataclass
class VPTSharegptDatasetConverter(ExtraImagesConverterMixin, SharegptDatasetConverter):
    pass


@dataclass
class VPTOpenAIDatasetConverter(ExtraImagesConverterMixin, OpenAIDatasetConverter):
    pass


VPT_CONVERTERS = {
    "vpt_alpaca": VPTAlpacaDatasetConverter,
    "vpt_sharegpt": VPTSharegptDatasetConverter,
    "vpt_openai": VPTOpenAIDatasetConverter,
}
"""The VPT formattings (`dataset_info.json` ``"formatting"``) and their converters."""


def vpt_formatting(formatting: str) -> str:
    r"""The VPT formatting a `vpt_qwen2_vl` run reads a dataset of ``formatting`` with (``sharegpt`` ->
    ``vpt_sharegpt``; a VPT or unknown formatting as it is)."""
    return f"vpt_{formatting}" if f"vpt_{formatting}" in VPT_CONVERTERS else formatting


def stock_formatting(formatting: str) -> str:
    r"""The stock formatting a VPT formatting extends (``vpt_sharegpt`` -> ``sharegpt``)."""
    return formatting.removeprefix("vpt_") if formatting in VPT_CONVERTERS else formatting


def patch() -> None:
    parser.DatasetAttr = VPTDatasetAttr  # guarded private patch (no registry for columns)
    for name, dataset_converter in VPT_CONVERTERS.items():
        if name not in converter.DATASET_CONVERTERS:
            converter.register_dataset_converter(name, dataset_converter)
