"""A synthetic VPT dataset that a tiny model can learn on a CPU in minutes (`generate`).

Two tasks (``--task``):

* ``detail`` (the demo's): a fine-detail question that needs a closer look. The scene is a white 8x8 board; a
  square of ``target_cells`` x ``target_cells`` cells, anywhere, is the target (the only coloured object, easy to
  *find* at any resolution), striped with a fine pattern (``rows``: horizontal lines, ``columns``: vertical lines,
  or ``tiles``: a checkerboard, repeating every ``pattern_period`` pixels); a few other cells hold flat gray squares
  (distractors). "What pattern is on the red square?" At the resolution round 1 sees (the scene downscaled by the
  pattern period) the three patterns look the same, exactly under the released NEAREST rule and within rounding
  under a bicubic resize (`_draw_patterned`), so the global view cannot tell them apart; the crop that a region
  selection cuts from the full-resolution image shows the lines natively.
* ``shapes``: a white image holds one coloured shape (the target) and a few gray shapes (distractors) of other
  kinds. A question names the target by one attribute and asks for the other ("What color is the triangle?", "What
  shape is the red object?"); the answer is one word from a closed set. The target is readable in the global view
  too, so this task does not need a closer look.

Written into ``out_dir`` (paths inside the JSON files are relative to it, as LLaMA-Factory's ``media_dir``
expects):

* ``images/``: the PNG scenes; each image serves every record kind built from its scene;
* ``synthetic_alignment_{detection,seg}_train.json``: DINO / SAM alignment (describe the scene from the extra
  features only);
* ``synthetic_vpt_{dino,sam,clip}_train.json``: region, re-encoding (that branch) and plain records, mixed;
* ``synthetic_plain_train.json``: every training scene's question as a plain record (a baseline without perception
  tokens trains on the same images and questions);
* ``synthetic_{region,action,plain}_test.json``: the same test questions as region, re-encoding (DINO triple) and
  plain conversations;
* ``synthetic_meta.json``: per test image, the target's pixel box, grid-cell box and answer, for region scoring;
* ``dataset_info.json``: LLaMA-Factory registration of every dataset file.

Same options and seed give byte-identical files. The command line is ``scripts/make_synthetic_data.py``.
"""

from __future__ import annotations

import os
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..files import write_json
from ..regions import RegionSpan, box_to_cells, box_to_region_text, region_to_box
from ..vocabulary import BRANCH_TOKENS, GRID_SIZE, IMAGE_PLACEHOLDER, REENCODE_TRIGGER, REGION_TRIGGER

COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("rows", "columns", "tiles")
"""The detail task's answers: horizontal lines, vertical lines, or a checkerboard, in the target's colour and a dark
shade of it. Short words whose tokens do not repeat, so that the tiny model's answers are its decision, not its
spelling (with the tiny character-level vocabulary, "checkered" and "vertical" share a "c" followed by different
letters)."""
DETAIL_COLORS = ("red", "green", "blue", "purple")
"""Target colours of the detail task (yellow is left out: its light stripes are hard to tell from the white board)."""
ANSWERS = (*COLORS, *SHAPES, *PATTERNS)
GRAY = (150, 150, 150)
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
ALIGNMENT_PROMPTS = ("Describe the image.", "What shapes are in the image?", "List the objects in the image.")
CROP_MARGIN = 1  # cells added on each side of the target's cell box, as the two-round evaluation does
OBJECT_GAP = 2  # minimum free pixels between two objects
KINDS = ("region", "reencode", "plain")
QUESTIONS = ("color", "shape")  # ask for the target's colour (named by its shape), or its shape (named by its colour)
TASKS = ("detail", "shapes")
DARK_SHADE = 0.3  # the detail target's second colour: its colour times this
PATTERN_TAPER = 4  # periods over which the detail pattern's contrast fades out towards the target's border
ROLES = ("user", "assistant")


def _option(default, help_text: str):
    """A field of `Options` with the help text of its command-line flag."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Options:
    """The options of `generate`; scripts/make_synthetic_data.py makes a flag of each, with its help text."""

    seed: int = _option(0, "random seed; the same seed and options give byte-identical JSON files")
    task: str = _option(
        "shapes", "detail: read a fine pattern on the one coloured square (needs the full-resolution crop); "
        "shapes: name the colour or shape of the one coloured shape (readable in the global view)"
    )
    train_size: int = _option(1000, "scenes (and records per vpt mixture file) in the training split")
    test_size: int = _option(200, "scenes (and records per test file) in the test split")
    alignment_size: int = _option(
        500, "records per alignment file; they reuse the training scenes, adding more if needed"
    )
    image_size: int = _option(448, "side of the square images in pixels")
    grid: int = _option(
        GRID_SIZE, f"region-token grid size (the vocabulary and the two-round evaluation use {GRID_SIZE})"
    )
    distractors: int = _option(4, "gray distractor shapes per image")
    object_size: float = _option(0.5, "object side in grid cells (jittered by +-20%)")
    region_ratio: float = _option(0.4, "share of region-selection records in the vpt mixtures")
    reencode_ratio: float = _option(0.4, "share of re-encoding records in the vpt mixtures")
    plain_ratio: float = _option(0.2, "share of plain question-answer records in the vpt mixtures")
    questions: str = _option(
        "color,shape", "shapes task: question kinds, comma-separated: color (named by shape), shape (named by colour)"
    )
    pattern_period: int = _option(
        2, "detail task: repeat of the target's pattern in pixels, even (a downscale by this factor averages it away)"
    )
    target_cells: int = _option(1, "detail task: side of the target square in grid cells")

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
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "detail":
            self._check_detail()
        kinds = self.questions.split(",")
        if not kinds or not set(kinds) <= set(QUESTIONS):
            raise ValueError(f"questions must be a comma-separated subset of {','.join(QUESTIONS)}, got {self.questions!r}")
        ratios = (self.region_ratio, self.reencode_ratio, self.plain_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError("record-kind ratios must be >= 0 with a positive sum")

    def _check_detail(self) -> None:
        cell = self.image_size // self.grid
        if self.pattern_period < 2 or self.pattern_period % 2:
            raise ValueError(f"detail task: pattern_period must be even and >= 2, got {self.pattern_period}")
        if not 1 <= self.target_cells <= self.grid // 2:
            raise ValueError(f"detail task: target_cells must be in 1..{self.grid // 2}, got {self.target_cells}")
        if self.image_size % self.grid or cell % self.pattern_period:
            raise ValueError(
                f"detail task: image_size must be a multiple of grid ({self.grid}) whose cells hold whole pattern "
                f"periods (cell side divisible by pattern_period {self.pattern_period}); "
                f"got image_size {self.image_size}"
            )


@dataclass(frozen=True)
class Item:
    shape: str
    color: str  # a COLORS key or "gray"
    box: tuple[int, int, int, int]  # pixels, right and bottom exclusive
    pattern: str = ""  # a PATTERNS entry, or "" for a flat fill
    period: int = 2  # the pattern repeats every `period` pixels (lines of period / 2)


@dataclass(frozen=True)
class Scene:
    path: str
    size: int
    target: Item
    distractors: tuple[Item, ...]
    question: str
    answer: str


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
    if options.task == "detail":
        return _detail_scene(rng, options, split, index)
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


def _detail_scene(rng: random.Random, options: Options, split: str, index: int) -> Scene:
    """A detail-task scene: the target fills ``target_cells`` x ``target_cells`` grid cells anywhere on the board, the
    distractors one free cell each, all drawn at random."""
    grid, size, side = options.grid, options.target_cells, options.image_size // options.grid
    tx, ty = rng.randrange(grid - size + 1), rng.randrange(grid - size + 1)
    taken = {(tx + i, ty + j) for i in range(size) for j in range(size)}
    free = [c for c in range(grid * grid) if (c % grid, c // grid) not in taken]
    cells = [divmod(c, grid)[::-1] for c in rng.sample(free, options.distractors)]
    color, pattern = rng.choice(DETAIL_COLORS), rng.choice(PATTERNS)
    target_box = (tx * side, ty * side, (tx + size) * side, (ty + size) * side)
    target = Item("square", color, target_box, pattern, options.pattern_period)
    distractors = tuple(Item("square", "gray", (x * side, y * side, (x + 1) * side, (y + 1) * side)) for x, y in cells)
    path = f"images/{split}_{index:06d}.png"
    question = f"What pattern is on the {color} square?"
    return Scene(path, options.image_size, target, distractors, question, pattern)


def _pattern_sign(item: Item) -> np.ndarray:
    """The lines of ``item.pattern`` over its box, (height, width): +1 where the item's colour goes, -1 for its dark
    shade; lines are ``period / 2`` pixels wide."""
    x0, y0, x1, y1 = item.box
    y, x = np.mgrid[0 : y1 - y0, 0 : x1 - x0] // (item.period // 2) % 2
    # The three agree on every line pair's second row and column (all dark there), the pixels a NEAREST downscale by
    # the period keeps (`transformers_vpt.images.fit_image`, the released image rule): that view shows no pattern.
    lines = {"rows": y == 0, "columns": x == 0, "tiles": x != y}[item.pattern]
    return np.where(lines, 1.0, -1.0)


def _draw_patterned(image: Image.Image, item: Item) -> None:
    """Fill the item's box with its pattern: its colour and a dark shade of it, around their mean. The pattern's
    contrast fades to the mean over the outer ``PATTERN_TAPER`` periods of the box, so that a bicubic downscale by
    the period leaves no trace of the pattern at the box's edges either (the unpaired lines at a hard edge would)."""
    color = np.array(COLORS[item.color], dtype=float)
    mean = (color + np.round(color * DARK_SHADE)) / 2
    sign = _pattern_sign(item)
    height, width = sign.shape
    y, x = np.mgrid[0:height, 0:width] + 0.5
    edge = np.minimum.reduce([x, y, width - x, height - y])  # distance to the box's border, in pixels
    contrast = np.clip(edge / (PATTERN_TAPER * item.period), 0.0, 1.0) * sign
    pixels = mean + contrast[..., None] * (color - mean)
    image.paste(Image.fromarray(np.round(pixels).astype(np.uint8)), item.box[:2])


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
        if item.pattern:
            _draw_patterned(image, item)
        else:
            _draw_item(draw, item)
    image.save(out_dir / scene.path, compress_level=1)


def describe(scene: Scene) -> str:
    """The alignment answer, e.g. "A red triangle and three gray shapes: two circles and a square."."""
    head = f"A {scene.target.color} {scene.target.shape}"
    if scene.target.pattern:
        head += f" in {scene.target.pattern}"
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


def target_cells(scene: Scene, grid: int) -> tuple[int, int, int, int]:
    """The (x_min, y_min, x_max, y_max) cells the target covers."""
    return box_to_cells(scene.target.box, (scene.size, scene.size), grid)


def region_record(scene: Scene, grid: int) -> dict:
    """The region record of ``scene``: the target's cells, then the crop the evaluation takes for them (one cell of
    margin on each side, clamped to the image)."""
    cells = target_cells(scene, grid)
    crop = region_to_box(RegionSpan.from_bounds(cells), (scene.size, scene.size), grid, margin=CROP_MARGIN)
    turns = [
        f"{IMAGE_PLACEHOLDER}\n{scene.question} \n{REGION_TRIGGER}",
        box_to_region_text(cells, grid),
        IMAGE_PLACEHOLDER,
        scene.answer,
    ]
    return _record(turns, [scene.path, f"{scene.path}_{','.join(map(str, crop))}"])


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
        "pattern": scene.target.pattern,
        "box": list(scene.target.box),
        "cells": list(target_cells(scene, grid)),
    }


def dataset_info_entry(file_name: str) -> dict:
    columns = ("messages", "images", "detection_images", "seg_images", "clip_images")
    return {
        "file_name": file_name,
        "formatting": "vpt_sharegpt",
        "columns": {c: c for c in columns},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


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
    datasets["synthetic_plain_train"] = [plain_record(s) for s in train[: opts.train_size]]  # the baseline's
    datasets["synthetic_region_test"] = [region_record(s, opts.grid) for s in test]
    datasets["synthetic_action_test"] = [reencode_record(s, "dino") for s in test]
    datasets["synthetic_plain_test"] = [plain_record(s) for s in test]

    for name, records in datasets.items():
        write_json(out / f"{name}.json", records)
    meta = {
        "options": asdict(opts),
        "answers": (
            {"pattern": list(PATTERNS)} if opts.task == "detail" else {"color": list(COLORS), "shape": list(SHAPES)}
        ),
        "targets": {s.path: target_meta(s, opts.grid) for s in test},
    }
    write_json(out / "synthetic_meta.json", meta)
    write_json(out / "dataset_info.json", {name: dataset_info_entry(f"{name}.json") for name in datasets})
    return {"out_dir": str(out), "images": len(train) + len(test), "datasets": {k: len(v) for k, v in datasets.items()}}
