"""The released VPT test splits: finding the files, checking records and turning them into evaluation items.

A split is a JSON list of ShareGPT records in the released format. Round 1 needs only the first user turn (which
holds ``<image>`` and the trigger phrase), the first image, and the last assistant turn as the reference answer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers_vpt.errors import VPTUserError
from transformers_vpt.images import ImageLoadError, image_size
from transformers_vpt.pipeline import build_user_text
from transformers_vpt.regions import split_crop_path
from transformers_vpt.vocabulary import (
    BRANCH_TOKENS,
    IMAGE_PLACEHOLDER,
    REENCODE_TRIGGER,
    REGION_TRIGGER,
    TRIGGER_MODES,
    VIDEO_PLACEHOLDER,
)

from .metrics import ground_truth
from .storage import name_problem

RELEASED_TEST_SETS = (
    "DocVQA_region_test_8cut",
    "TextVQA_region_test_8cut",
    "TextCap_region_test_8cut",
    "DUDE_region_test",
    "GQA_region_test",
    "OI_region_test",
    "VSR_region_test",
    "CUB_Birds_action_test",
    "LLaVA_COCO_free_action_test",
    "LLaVA_COCO_single_action_test",
    "Flickr30k_action_test",
    "POPE_action_test",
)
"""The twelve test splits of the upstream evaluation, in its order."""

TEST_SPLIT_GLOB = "*_test*.json"
"""Files picked up when no dataset is named (``X_test.json``, ``X_test_8cut.json``; not train, meta or info files)."""

MODES = ("keep", *TRIGGER_MODES)
"""``keep`` sends the first user turn verbatim; the others rebuild it with that trigger phrase (``free``: none)."""

_TRIGGERS = re.compile(r"\s*(?:" + "|".join(map(re.escape, (REGION_TRIGGER, REENCODE_TRIGGER))) + ")")
_OTHER_PLACEHOLDERS = (VIDEO_PLACEHOLDER, *(branch.placeholder for branch in BRANCH_TOKENS.values()))


class DatasetError(VPTUserError):
    """A dataset that cannot be evaluated at all (missing file, not a JSON list, a name that is not a file name)."""


class BrokenRecord(ValueError):
    """A record that cannot be evaluated; it is reported by index and skipped."""


@dataclass(frozen=True)
class Item:
    """One evaluable record.

    Attributes:
        index: Position of the record in the split file (the resume key).
        question: ``messages[0].content`` verbatim: what the judge sees as the question, as upstream.
        image: ``images[0]`` as written in the record (the key of a region meta file).
        image_path: ``image`` resolved against the media directory (a ``_x0,y0,x1,y1`` crop suffix is kept).
        reference: The ground truth, ``metrics.ground_truth(messages)``.
        round1: The record's first assistant turn when a user turn follows it (a two-round record: its ground-truth
            perception tokens, what ``--oracle`` replays), else None.
    """

    index: int
    question: str
    image: str
    image_path: str
    reference: str
    round1: str | None = None


def find_datasets(data_dir: str | os.PathLike, names: list[str] | None = None) -> dict[str, Path]:
    """Split name -> file: the named splits (``NAME`` or ``NAME.json``), or every ``TEST_SPLIT_GLOB`` file (the
    released splits in upstream order, then the others by name)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data directory {data_dir} does not exist")
    if names is None:
        order = {name: rank for rank, name in enumerate(RELEASED_TEST_SETS)}
        paths = sorted(data_dir.glob(TEST_SPLIT_GLOB), key=lambda p: (order.get(p.stem, len(order)), p.stem))
        found = {path.stem: path for path in paths if name_problem(path.stem) is None}  # no hidden files
        if not found:
            raise DatasetError(f"no {TEST_SPLIT_GLOB} files in {data_dir}")
        return found
    for name in names:
        if (problem := name_problem(name.removesuffix(".json"))) is not None:
            raise DatasetError(
                f"--datasets {name!r} is not a dataset name ({problem}): give split file names in --data-dir "
                "without folders, e.g. POPE_action_test"
            )
    files = {name.removesuffix(".json"): data_dir / (name.removesuffix(".json") + ".json") for name in names}
    missing = sorted(name for name, path in files.items() if not path.is_file())
    if missing:
        raise DatasetError(f"no such dataset file in {data_dir}: {', '.join(m + '.json' for m in missing)}")
    return files


def load_records(path: Path) -> list[Any]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if not isinstance(records, list):
        raise DatasetError(f"{path} is not a JSON list of records")
    return records


def prompt_for_mode(question: str, mode: str) -> str:
    """The round-1 user turn for ``mode``: ``question`` itself for ``keep``, else the released layout
    ``"<image>\\n{question}{trigger}"`` with the record's trigger phrases removed and ``mode``'s added.

    The record's text keeps its meaning (placeholders and control tokens are not made literal), as in ``keep``."""
    if mode == "keep":
        return question
    bare = _TRIGGERS.sub("", question).replace(IMAGE_PLACEHOLDER, "", 1).strip()
    return build_user_text(bare, mode, literal=False)


def make_item(index: int, record: Any, media_dir: str | os.PathLike) -> Item:
    """The item of a record; `BrokenRecord` says why a record cannot be evaluated.

    The image is checked from its header only: it exists, `transformers_vpt.images.image_size` can read it (a
    decompression bomb cannot), and a crop suffix lies inside it in viewer pixels, the pixels `load_image` crops in.
    """
    if not isinstance(record, dict):
        raise BrokenRecord("the record is not a JSON object")
    messages = record.get("messages")
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise BrokenRecord("messages is not a non-empty list of {role, content} strings")
    if messages[0]["role"] != "user":
        raise BrokenRecord(f"the first turn is a {messages[0]['role']!r} turn, not a user turn")
    question = messages[0]["content"]
    if (count := question.count(IMAGE_PLACEHOLDER)) != 1:
        raise BrokenRecord(f"the first user turn has {count} {IMAGE_PLACEHOLDER} placeholders, expected 1")
    if others := [p for p in _OTHER_PLACEHOLDERS if p in question]:
        raise BrokenRecord(f"the first user turn holds {', '.join(others)}; round 1 takes the first image only")
    try:
        reference = ground_truth(messages)
    except ValueError as error:
        raise BrokenRecord(str(error)) from error
    images = record.get("images")
    if not (isinstance(images, list) and images and isinstance(images[0], str) and images[0]):
        raise BrokenRecord("images[0] is not a path")
    image_path = os.path.join(media_dir, images[0])  # absolute record paths stay as they are
    try:
        real_path, box = split_crop_path(image_path)
    except ValueError as error:
        raise BrokenRecord(str(error)) from error
    if not os.path.isfile(real_path):
        raise BrokenRecord(f"missing image file {real_path}")
    try:
        width, height = image_size(real_path)  # viewer pixels (EXIF orientation applied), from the header
    except ImageLoadError as error:  # unreadable, or too large to decode safely (a decompression bomb)
        raise BrokenRecord(str(error)) from error
    if box is not None and (box[2] > width or box[3] > height):
        raise BrokenRecord(f"crop box {box} lies outside the {width}x{height} image {real_path}")
    two_rounds = len(messages) >= 4 and messages[1]["role"] == "assistant" and messages[2]["role"] == "user"
    return Item(index, question, images[0], image_path, reference, messages[1]["content"] if two_rounds else None)


def prepare_items(
    records: list[Any], media_dir: str | os.PathLike, limit: int | None = None
) -> tuple[list[Item], list[dict[str, Any]]]:
    """Items of the first ``limit`` records (all when None), and ``{"index", "problem"}`` for the broken ones."""
    items, problems = [], []
    for index, record in enumerate(records[:limit]):
        try:
            items.append(make_item(index, record, media_dir))
        except BrokenRecord as error:
            problems.append({"index": index, "problem": str(error)})
    return items, problems
