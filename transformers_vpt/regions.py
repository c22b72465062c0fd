r"""Region tokens, grid cells, pixel boxes and the dataset's crop-path convention.

A region answer such as ``<|region_token_start|><|x_0|><|y_1|><|x_3|><|y_5|><|region_token_end|>`` names cells of a
``grid_size`` x ``grid_size`` grid laid over the image. Round 2 of the evaluation (and the data pipeline) turns it into
a pixel crop of the original image. Datasets carry crops as ``"<path>_x0,y0,x1,y1"`` strings.

Two readings of region text exist (``out_of_range``):

* ``"clamp"`` (the project's default): an index past the grid (the released GQA data has ``<|x_8|>``) is clamped to
  the last cell with a warning; a span without an x or without a y index is malformed and skipped.
* ``"reject"`` (the released evaluation, ``--protocol released``): a span counts only when it is exactly
  ``<|region_token_start|>`` + one or more ``<|x_i|>``/``<|y_i|>`` tokens with ``0 <= i < grid_size`` +
  ``<|region_token_end|>`` (the released regex ``<\|region_token_start\|>(<\|[xy]_[0-7]\|>)+<\|region_token_end\|>``),
  so a span with ``<|x_8|>`` is no region at all. A span of x tokens only still counts (the regex allows it); its
  crop then fails (`SpanCells.bounds` raises), and the released evaluation dropped such a record from scoring.

`find_spans` gives the spans as written (`SpanCells`, either index set may be empty); `parse_regions` the complete
ones as `RegionSpan`.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from .vocabulary import GRID_SIZE, REGION_END, REGION_START, x_token, y_token

__all__ = [
    "Box",
    "OUT_OF_RANGE",
    "RegionSpan",
    "SpanCells",
    "find_spans",
    "parse_regions",
    "region_problems",
    "region_to_box",
    "cell_edges",
    "box_to_cells",
    "crop_regions",
    "box_to_region_text",
    "split_crop_path",
    "join_crop_path",
    "open_image",
]

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)``: pixels for crops (x1/y1 exclusive), or grid cells for region text (inclusive)."""

_START, _END = re.escape(REGION_START), re.escape(REGION_END)
# A span never contains another start delimiter, so an unterminated start cannot swallow the next valid span.
_SPAN_RE = re.compile(f"{_START}((?:(?!{_START}).)*?){_END}", re.DOTALL)
_CELL = r"<\|([xy])_([0-9]+)\|>"
_CELLS_RE = re.compile(f"(?:{_CELL})+")
_CELL_RE = re.compile(_CELL)
_CROP_PATH_RE = re.compile(r"(.+)_([0-9]+),([0-9]+),([0-9]+),([0-9]+)", re.DOTALL)

OUT_OF_RANGE = ("clamp", "reject")
"""How a region span with an index past the grid is read: clamped to the last cell (the project's default) or not a
region span at all (the released evaluation's regex)."""


@dataclass(frozen=True)
class RegionSpan:
    """The grid cells named by one region span: the sets of x and y indices (order and duplicates do not matter)."""

    xs: frozenset[int]
    ys: frozenset[int]

    def __post_init__(self) -> None:
        if not self.xs or not self.ys or min(self.xs | self.ys) < 0:
            raise ValueError(f"A region needs non-negative x and y indices, got xs={set(self.xs)}, ys={set(self.ys)}")

    @property
    def bounds(self) -> Box:
        """Inclusive cell bounds ``(x_min, y_min, x_max, y_max)``."""
        return min(self.xs), min(self.ys), max(self.xs), max(self.ys)

    @classmethod
    def from_bounds(cls, cells: Box) -> RegionSpan:
        """The region of inclusive cell bounds ``(x_min, y_min, x_max, y_max)``."""
        x_min, y_min, x_max, y_max = cells
        return cls(frozenset((x_min, x_max)), frozenset((y_min, y_max)))


@dataclass(frozen=True)
class SpanCells:
    """One region span as written: the sets of x and y indices inside it, either of which may be empty.

    The released evaluation counted a span of x tokens only as a region (its regex allows it) and failed when it
    built the crop; `bounds` fails the same way, with a `ValueError` naming the span.
    """

    xs: frozenset[int]
    ys: frozenset[int]
    text: str = ""

    @property
    def complete(self) -> bool:
        """Whether the span has an x and a y index (it names a region)."""
        return bool(self.xs) and bool(self.ys)

    def region(self) -> RegionSpan:
        """The `RegionSpan` of a complete span; `ValueError` when an axis has no index."""
        if not self.complete:
            missing = " and ".join(axis for axis, cells in (("x", self.xs), ("y", self.ys)) if not cells)
            raise ValueError(f"region span {self.text!r} has no {missing} index, so it names no cells to crop")
        return RegionSpan(self.xs, self.ys)

    @property
    def bounds(self) -> Box:
        """Inclusive cell bounds, as `RegionSpan.bounds`; `ValueError` for an incomplete span."""
        return self.region().bounds


def _check_out_of_range(out_of_range: str) -> None:
    if out_of_range not in OUT_OF_RANGE:
        raise ValueError(f"out_of_range must be one of {list(OUT_OF_RANGE)}, got {out_of_range!r}")


def _read_span(inside: str, grid_size: int, out_of_range: str = "clamp") -> tuple[SpanCells | None, list[str]]:
    """The cells of one span's inside (None when it is not cell tokens only, or, with ``"reject"``, when an index
    is not one of the grid's tokens), and the out-of-range indices it clamped (``"clamp"``) or met."""
    if not _CELLS_RE.fullmatch(inside):
        return None, []
    cells: dict[str, set[int]] = {"x": set(), "y": set()}
    out_of_grid = []
    for axis, digits in _CELL_RE.findall(inside):
        index = int(digits)
        if index >= grid_size:
            out_of_grid.append(f"<|{axis}_{digits}|> is out of range for a {grid_size}x{grid_size} grid")
            index = grid_size - 1
        elif out_of_range == "reject" and digits != str(index):  # "<|x_07|>" is no grid token either
            out_of_grid.append(f"<|{axis}_{digits}|> is not a grid token")
        cells[axis].add(index)
    if out_of_range == "reject" and out_of_grid:
        return None, out_of_grid
    return SpanCells(frozenset(cells["x"]), frozenset(cells["y"]), REGION_START + inside + REGION_END), out_of_grid


def find_spans(text: str, grid_size: int = GRID_SIZE, out_of_range: str = "clamp") -> list[SpanCells]:
    """Every region span of ``text`` made of cell tokens only, in order, complete or not (see `SpanCells`).

    ``out_of_range="clamp"`` clamps an index past the grid to the last cell (with a warning); ``"reject"`` leaves
    such a span out, as the released evaluation's regex did (logged at debug level). Spans with other text inside
    are never counted.
    """
    _check_out_of_range(out_of_range)
    spans = []
    for match in _SPAN_RE.finditer(text):
        span, out_of_grid = _read_span(match.group(1), grid_size, out_of_range)
        if out_of_range == "clamp":
            for message in out_of_grid:
                logger.warning("%s; clamped to %d", message, grid_size - 1)
        elif out_of_grid:
            logger.debug("Not a region span (%s): %r", "; ".join(out_of_grid), match.group(0))
        if span is not None:
            spans.append(span)
    return spans


def parse_regions(text: str, grid_size: int = GRID_SIZE, out_of_range: str = "clamp") -> list[RegionSpan]:
    """Every well-formed region span in ``text``, in order.

    Out-of-range indices (the released GQA data has ``<|x_8|>``) are clamped to the last cell with a warning
    (``out_of_range="clamp"``, the default) or make the span no region (``"reject"``, the released reading);
    malformed spans (other text inside, no x or no y index) are skipped.
    """
    regions = []
    for span in find_spans(text, grid_size, out_of_range):
        if span.complete:
            regions.append(span.region())
        else:
            logger.debug("Skipping malformed region span %r", span.text)
    return regions


def region_problems(text: str, grid_size: int = GRID_SIZE) -> list[str]:
    """Human-readable problems of the region spans in ``text`` (empty when all are clean), for data validation."""
    problems = []
    spans = list(_SPAN_RE.finditer(text))
    for match in spans:
        region, clamped = _read_span(match.group(1), grid_size)
        problems += clamped
        if region is None or not region.complete:
            problems.append(f"malformed region span {match.group(0)!r}")
    if text.count(REGION_START) != len(spans) or text.count(REGION_END) != len(spans):
        problems.append("unpaired region delimiter")
    return problems


def region_to_box(
    region: RegionSpan | SpanCells,
    image_size: tuple[int, int],
    grid_size: int = GRID_SIZE,
    margin: int = 1,
    nonempty: bool = True,
) -> Box:
    """Pixel crop box of ``region`` on an image of ``(width, height)``.

    The cell bounds are widened by ``margin`` cells on each side and clamped to the grid, then scaled to pixels and
    truncated, as the released evaluation did. On images narrower than the grid the box is kept one pixel wide
    (``nonempty``, the default); ``nonempty=False`` keeps the released formula as it is, which can give an empty box
    there. An incomplete `SpanCells` raises `ValueError` (the released crop failure).
    """
    if grid_size < 1 or margin < 0:
        raise ValueError(f"Need grid_size >= 1 and margin >= 0, got {grid_size} and {margin}")
    width, height = image_size

    def clamp(cell: int) -> int:
        return min(max(cell, 0), grid_size - 1)

    x_edges, y_edges = cell_edges(width, grid_size), cell_edges(height, grid_size)
    x_min, y_min, x_max, y_max = region.bounds
    x0, y0 = x_edges[clamp(x_min - margin)], y_edges[clamp(y_min - margin)]
    x1, y1 = x_edges[clamp(x_max + margin) + 1], y_edges[clamp(y_max + margin) + 1]
    if not nonempty:
        return x0, y0, x1, y1
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def cell_edges(length: int, grid_size: int = GRID_SIZE) -> list[int]:
    """Pixel edges of the grid cells along a side of ``length`` pixels: cell c spans
    ``[int(c * length / grid_size), int((c + 1) * length / grid_size))``, truncated as the released evaluation did."""
    return [int(c * length / grid_size) for c in range(grid_size + 1)]


def box_to_cells(box: Box, image_size: tuple[int, int], grid_size: int = GRID_SIZE) -> Box:
    """Inclusive cell bounds ``(x_min, y_min, x_max, y_max)`` of the grid cells that a pixel ``box`` (x1/y1
    exclusive) inside an image of ``(width, height)`` touches, with the cells of `cell_edges` (the crop rule's)."""
    width, height = image_size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"Box {box} is empty or not inside a {width}x{height} image")
    x_edges, y_edges = cell_edges(width, grid_size), cell_edges(height, grid_size)
    return (
        bisect_right(x_edges, x0) - 1,
        bisect_right(y_edges, y0) - 1,
        bisect_right(x_edges, x1 - 1) - 1,
        bisect_right(y_edges, y1 - 1) - 1,
    )


def crop_regions(
    image: Image.Image,
    text_or_regions: str | Iterable[RegionSpan],
    grid_size: int = GRID_SIZE,
    margin: int = 1,
) -> list[tuple[Box, Image.Image]]:
    """In-memory crops of ``image`` for every region (parsed from text when a string is given)."""
    regions = parse_regions(text_or_regions, grid_size) if isinstance(text_or_regions, str) else text_or_regions
    boxes = [region_to_box(region, image.size, grid_size, margin) for region in regions]
    return [(box, image.crop(box)) for box in boxes]


def box_to_region_text(cells: Box, grid_size: int = GRID_SIZE) -> str:
    """Region span for inclusive cell bounds ``(x_min, y_min, x_max, y_max)``, in the released token order."""
    x_min, y_min, x_max, y_max = cells
    if not (0 <= x_min <= x_max < grid_size and 0 <= y_min <= y_max < grid_size):
        raise ValueError(f"Cell bounds {cells} are not ordered within a {grid_size}x{grid_size} grid")
    return REGION_START + x_token(x_min) + y_token(y_min) + x_token(x_max) + y_token(y_max) + REGION_END


def split_crop_path(path: str) -> tuple[str, Box | None]:
    """Split ``"img.jpg_x0,y0,x1,y1"`` into ``("img.jpg", box)``; any other string is a plain path (box None).

    Only an exact suffix of four non-negative integers counts, so underscores elsewhere (``a/b_c/img.jpg``,
    ``img.tar_gz``) never turn a path into a crop.
    """
    match = _CROP_PATH_RE.fullmatch(path)
    if match is None:
        return path, None
    x0, y0, x1, y1 = map(int, match.groups()[1:])
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"Empty crop box in image path {path!r}")
    return match.group(1), (x0, y0, x1, y1)


def join_crop_path(path: str, box: Box) -> str:
    """Crop path ``"<path>_x0,y0,x1,y1"`` for a pixel ``box``."""
    x0, y0, x1, y1 = box
    if not path or not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ValueError(f"Cannot make a crop path from {path!r} and box {box}")
    return f"{path}_{x0},{y0},{x1},{y1}"


def open_image(path: str) -> Image.Image:
    """Open a plain or crop path as an RGB image in viewer pixels: `transformers_vpt.images.load_image`."""
    from .images import load_image

    return load_image(path)
