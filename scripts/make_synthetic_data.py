#!/usr/bin/env python
"""Generate a synthetic VPT dataset that a tiny model can learn on a CPU in minutes.

The task: a large white image holds one coloured shape (the target) and a few gray shapes (distractors) of other
kinds. A question names the target by one attribute and asks for the other ("What color is the triangle?", "What
shape is the red object?"); the answer is one word from a closed set. The target covers a small part of the image,
so a region crop around it shows it at a much higher resolution than the downscaled full image does.

Written into ``--out-dir`` (paths inside the JSON files are relative to it, as LLaMA-Factory's ``media_dir``
expects):

* ``images/``: the PNG scenes; each image serves every record kind built from its scene;
* ``synthetic_alignment_{detection,seg}_train.json``: DINO / SAM alignment (describe the scene from the extra
  features only);
* ``synthetic_vpt_{dino,sam,clip}_train.json``: region, re-encoding (that branch) and plain records, mixed;
* ``synthetic_{region,action,plain}_test.json``: the same test questions as region, re-encoding (DINO triple) and
  plain conversations;
* ``synthetic_meta.json``: per test image, the target's pixel box, grid-cell box and answer, for region scoring;
* ``dataset_info.json``: LLaMA-Factory registration of every dataset file.

Same options and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import asdict, dataclass, fields
from itertools import accumulate
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from transformers_vpt.vocabulary import (
    BRANCH_TOKENS,
    GRID_SIZE,
    IMAGE_PLACEHOLDER,
    REENCODE_TRIGGER,
    REGION_END,
    REGION_START,
    REGION_TRIGGER,
    x_token,
    y_token,
)

COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
ANSWERS = (*COLORS, *SHAPES)
GRAY = (150, 150, 150)
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
ALIGNMENT_PROMPTS = ("Describe the image.", "What shapes are in the image?", "List the objects in the image.")
CROP_MARGIN = 1  # cells added on each side of the target's cell box, as the two-round evaluation does
OBJECT_GAP = 2  # minimum free pixels between two objects
KINDS = ("region", "reencode", "plain")
QUESTIONS = ("color", "shape")  # ask for the target's colour (named by its shape), or its shape (named by its colour)
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Options:
    seed: int = 0
    train_size: int = 1000
    test_size: int = 200
    alignment_size: int = 500
    image_size: int = 448
    grid: int = GRID_SIZE
    distractors: int = 4
    object_size: float = 0.5
    region_ratio: float = 0.4
    reencode_ratio: float = 0.4
    plain_ratio: float = 0.2
    questions: str = "color,shape"

    def __post_init__(self):
        if min(self.train_size, self.test_size, self.alignment_size) < 0:
            raise ValueError("dataset sizes must be >= 0")
        if not 1 <= self.grid <= GRID_SIZE:
            raise ValueError(f"grid must be in 1..{GRID_SIZE}: the vocabulary has {GRID_SIZE} x and y tokens")
        if not 0 <= self.distractors < len(NUMBER_WORDS):
            raise ValueError(f"distractors must be in 0..{len(NUMBER_WORDS) - 1}")
        if not 0 < self.object_size <= self.grid / 2 or self.object_size * self.image_size / self.grid < 6:
            raise ValueError(
                f"object_size must be in (0, {self.grid / 2:g}] cells (grid / 2) and give objects of at least 6 pixels"
            )
        kinds = self.questions.split(",")
        if not kinds or not set(kinds) <= set(QUESTIONS):
            raise ValueError(f"questions must be a comma-separated subset of {','.join(QUESTIONS)}, got {self.questions!r}")
        ratios = (self.region_ratio, self.reencode_ratio, self.plain_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError("record-kind ratios must be >= 0 with a positive sum")


@dataclass(frozen=True)
class Item:
    shape: str
    color: str  # a COLORS key or "gray"
    box: tuple[int, int, int, int]  # pixels, right and bottom exclusive


@dataclass(frozen=True)
class Scene:
    path: str
    size: int
    target: Item
    distractors: tuple[Item, ...]
    question: str
    answer: str


def cell_edges(size: int, grid: int) -> list[int]:
    """Pixel edges of the grid cells under the evaluation's rule: cell c spans [int(c*size/grid), int((c+1)*size/grid))."""
    return [int(c * size / grid) for c in range(grid + 1)]


def cell_box(box: tuple[int, int, int, int], size: int, grid: int) -> tuple[int, int, int, int]:
    """The (x_min, y_min, x_max, y_max) cells covered by a pixel box."""
    edges = cell_edges(size, grid)
    x0, y0, x1, y1 = box
    return tuple(bisect_right(edges, p) - 1 for p in (x0, y0, x1 - 1, y1 - 1))


def crop_box(cells: tuple[int, int, int, int], size: int, grid: int) -> tuple[int, int, int, int]:
    """The pixel crop the evaluation takes for a cell box: one cell of margin on each side, clamped to the image."""
    x0, y0, x1, y1 = cells
    low = (max(c - CROP_MARGIN, 0) for c in (x0, y0))
    high = (min(c + CROP_MARGIN, grid - 1) + 1 for c in (x1, y1))
    return tuple(int(c * size / grid) for c in (*low, *high))


def region_span(cells: tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = cells
    return REGION_START + x_token(x0) + y_token(y0) + x_token(x1) + y_token(y1) + REGION_END


def _place(rng: random.Random, taken: list[tuple[int, int, int, int]], options: Options):
    """A random box that keeps OBJECT_GAP pixels from every box in `taken`, or None when 1000 draws found none."""
    cell = options.image_size / options.grid
    side = max(6, round(options.object_size * cell * rng.uniform(0.8, 1.2)))
    for _ in range(1000):
        x0, y0 = rng.randrange(options.image_size - side + 1), rng.randrange(options.image_size - side + 1)
        box = (x0, y0, x0 + side, y0 + side)
        if all(
            box[0] >= t[2] + OBJECT_GAP
            or t[0] >= box[2] + OBJECT_GAP
            or box[1] >= t[3] + OBJECT_GAP
            or t[1] >= box[3] + OBJECT_GAP
            for t in taken
        ):
            return box
    return None


def _layout(rng: random.Random, count: int, options: Options) -> list[tuple[int, int, int, int]]:
    """`count` boxes without overlap; starts over when early boxes left no room for later ones."""
    for _ in range(100):
        boxes: list[tuple[int, int, int, int]] = []
        while len(boxes) < count and (box := _place(rng, boxes, options)) is not None:
            boxes.append(box)
        if len(boxes) == count:
            return boxes
    raise ValueError(
        f"cannot place {count} objects of {options.object_size} cells without overlap in a {options.image_size} px "
        "image; lower --distractors or --object-size"
    )


def make_scene(options: Options, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``; it depends only on the seed, the drawing options, the split and the index."""
    rng = random.Random(f"{options.seed}/{split}/{index}")
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    other_shapes = [s for s in SHAPES if s != shape]  # the target is the only object of its shape
    specs = [(shape, color)] + [(rng.choice(other_shapes), "gray") for _ in range(options.distractors)]
    boxes = _layout(rng, len(specs), options)
    target, *distractors = (Item(s, c, b) for (s, c), b in zip(specs, boxes))
    asked = options.questions.split(",")
    if rng.choice(asked) == "color":  # one draw either way, so other scenes do not change with --questions
        question, answer = f"What color is the {shape}?", color
    else:
        question, answer = f"What shape is the {color} object?", shape
    path = f"images/{split}_{index:06d}.png"
    return Scene(path, options.image_size, target, tuple(distractors), question, answer)


def _draw_item(draw: ImageDraw.ImageDraw, item: Item) -> None:
    x0, y0, x1, y1 = item.box
    right, bottom = x1 - 1, y1 - 1
    cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
    fill = COLORS.get(item.color, GRAY)
    if item.shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif item.shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif item.shape == "triangle":
        draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=fill)
    else:
        draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=fill)


def render(scene: Scene, out_dir: Path) -> None:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in (scene.target, *scene.distractors):
        _draw_item(draw, item)
    image.save(out_dir / scene.path, compress_level=1)


def describe(scene: Scene) -> str:
    """The alignment answer, e.g. "A red triangle and three gray shapes: two circles and a square."."""
    head = f"A {scene.target.color} {scene.target.shape}"
    if not scene.distractors:
        return head + "."
    counts = Counter(d.shape for d in scene.distractors)
    groups = [f"{NUMBER_WORDS[n]} {s}s" if n > 1 else f"a {s}" for s in SHAPES if (n := counts[s])]
    listed = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    n = len(scene.distractors)
    return f"{head} and {NUMBER_WORDS[n]} gray shape{'s' if n > 1 else ''}: {listed}."


def _record(turns: list[str], images: list[str], **extra_images: list[str]) -> dict:
    record = {
        "messages": [{"role": ROLES[i % 2], "content": text} for i, text in enumerate(turns)],
        "images": images,
        "detection_images": [],
        "seg_images": [],
        "clip_images": [],
    }
    record.update(extra_images)
    return record


def region_record(scene: Scene, grid: int) -> dict:
    cells = cell_box(scene.target.box, scene.size, grid)
    crop = ",".join(map(str, crop_box(cells, scene.size, grid)))
    turns = [f"{IMAGE_PLACEHOLDER}\n{scene.question} \n{REGION_TRIGGER}", region_span(cells), IMAGE_PLACEHOLDER, scene.answer]
    return _record(turns, [scene.path, f"{scene.path}_{crop}"])


def reencode_record(scene: Scene, kind: str) -> dict:
    branch = BRANCH_TOKENS[kind]
    turns = [f"<image>\n{scene.question}\n{REENCODE_TRIGGER}", branch.action_triple, branch.placeholder, scene.answer]
    return _record(turns, [scene.path], **{branch.images_key: [scene.path]})


def plain_record(scene: Scene) -> dict:
    return _record([f"<image>\n{scene.question}", scene.answer], [scene.path])


def train_record(scene: Scene, kind: str, branch: str, grid: int) -> dict:
    """A training record of ``kind`` (see ``KINDS``); ``branch`` picks the re-encoding triple."""
    if kind == "region":
        return region_record(scene, grid)
    if kind == "reencode":
        return reencode_record(scene, branch)
    return plain_record(scene)


def alignment_record(scene: Scene, index: int, kind: str) -> dict:
    branch = BRANCH_TOKENS[kind]
    prompt = ALIGNMENT_PROMPTS[index % len(ALIGNMENT_PROMPTS)]
    return _record([f"{branch.placeholder}\n{prompt}", describe(scene)], [], **{branch.images_key: [scene.path]})


def kind_schedule(n: int, options: Options) -> list[str]:
    """``n`` record kinds in the configured proportions (each count within one of exact), shuffled."""
    ratios = (options.region_ratio, options.reencode_ratio, options.plain_ratio)
    bounds = list(accumulate(r / sum(ratios) for r in ratios))
    kinds = [KINDS[min(bisect_right(bounds, (i + 0.5) / n), len(KINDS) - 1)] for i in range(n)]
    random.Random(f"{options.seed}/kinds").shuffle(kinds)
    return kinds


def target_meta(scene: Scene, grid: int) -> dict:
    return {
        "question": scene.question,
        "answer": scene.answer,
        "shape": scene.target.shape,
        "color": scene.target.color,
        "box": list(scene.target.box),
        "cells": list(cell_box(scene.target.box, scene.size, grid)),
    }


def dataset_info_entry(file_name: str) -> dict:
    columns = ("messages", "images", "detection_images", "seg_images", "clip_images")
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {c: c for c in columns},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


def write_json(path: Path, data) -> None:
    """Write ``data`` atomically: readers see the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, **options) -> dict:
    """Render the scenes and write every dataset file into ``out_dir``; ``options`` are the fields of ``Options``.

    Returns ``{"out_dir", "images", "datasets": {name: record count}}``.
    """
    opts = Options(**options)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train = [make_scene(opts, "train", i) for i in range(max(opts.train_size, opts.alignment_size))]
    test = [make_scene(opts, "test", i) for i in range(opts.test_size)]
    for scene in tqdm(train + test, desc="rendering", unit="img", disable=None):
        render(scene, out)

    datasets: dict[str, list[dict]] = {}
    for kind in ("dino", "sam"):
        datasets[f"synthetic_alignment_{BRANCH_TOKENS[kind].prefix}_train"] = [
            alignment_record(s, i, kind) for i, s in enumerate(train[: opts.alignment_size])
        ]
    kinds = kind_schedule(opts.train_size, opts)
    for branch in BRANCH_TOKENS:
        datasets[f"synthetic_vpt_{branch}_train"] = [
            train_record(s, k, branch, opts.grid) for k, s in zip(kinds, train)
        ]
    datasets["synthetic_region_test"] = [region_record(s, opts.grid) for s in test]
    datasets["synthetic_action_test"] = [reencode_record(s, "dino") for s in test]
    datasets["synthetic_plain_test"] = [plain_record(s) for s in test]

    for name, records in datasets.items():
        write_json(out / f"{name}.json", records)
    meta = {
        "options": asdict(opts),
        "answers": {"color": list(COLORS), "shape": list(SHAPES)},
        "targets": {s.path: target_meta(s, opts.grid) for s in test},
    }
    write_json(out / "synthetic_meta.json", meta)
    write_json(out / "dataset_info.json", {name: dataset_info_entry(f"{name}.json") for name in datasets})
    return {"out_dir": str(out), "images": len(train) + len(test), "datasets": {k: len(v) for k, v in datasets.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Options()
    help_text = {
        "seed": "random seed; the same seed and options give byte-identical JSON files",
        "train_size": "scenes (and records per vpt mixture file) in the training split",
        "test_size": "scenes (and records per test file) in the test split",
        "alignment_size": "records per alignment file; they reuse the training scenes, adding more if needed",
        "image_size": "side of the square images in pixels",
        "grid": f"region-token grid size (the vocabulary and the two-round evaluation use {GRID_SIZE})",
        "distractors": "gray distractor shapes per image",
        "object_size": "object side in grid cells (jittered by +-20%%)",
        "region_ratio": "share of region-selection records in the vpt mixtures",
        "reencode_ratio": "share of re-encoding records in the vpt mixtures",
        "plain_ratio": "share of plain question-answer records in the vpt mixtures",
        "questions": "question kinds, comma-separated: color (named by shape), shape (named by colour)",
    }
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python scripts/make_synthetic_data.py --out-dir data/synthetic --train-size 2000",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out-dir", required=True, help="output directory (created if missing)")
    for field in fields(Options):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            help=help_text[field.name],
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    summary = generate(args.pop("out_dir"), **args)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
