import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transformers_vpt.regions import (
    RegionSpan,
    box_to_cells,
    box_to_region_text,
    cell_edges,
    crop_regions,
    join_crop_path,
    open_image,
    parse_regions,
    region_problems,
    region_to_box,
    split_crop_path,
)
from transformers_vpt.vocabulary import GRID_SIZE, REGION_END, REGION_START, x_token, y_token

LOGGER = "transformers_vpt.regions"
indices = st.integers(0, GRID_SIZE - 1)


@st.composite
def cell_bounds(draw, grid_size=GRID_SIZE):
    xs = sorted(draw(st.lists(st.integers(0, grid_size - 1), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.integers(0, grid_size - 1), min_size=2, max_size=2)))
    return xs[0], ys[0], xs[1], ys[1]


regions = st.builds(RegionSpan, st.frozensets(indices, min_size=1), st.frozensets(indices, min_size=1))
boxes = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6), st.integers(1, 10**6)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
)


def span(*tokens: str) -> str:
    return REGION_START + "".join(tokens) + REGION_END


# Text <-> regions


def test_released_gqa_example_is_clamped_with_a_warning(caplog):
    text = "<|region_token_start|><|x_0|><|y_0|><|x_8|><|y_6|><|region_token_end|>"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert parse_regions(text) == [RegionSpan(frozenset({0, 7}), frozenset({0, 6}))]
    assert "<|x_8|>" in caplog.text
    assert region_problems(text) == ["<|x_8|> is out of range for a 8x8 grid"]


@given(cell_bounds())
def test_text_round_trip(cells):
    x_min, y_min, x_max, y_max = cells
    [region] = parse_regions(box_to_region_text(cells))
    assert region == RegionSpan(frozenset({x_min, x_max}), frozenset({y_min, y_max}))
    assert region.bounds == cells
    assert box_to_region_text(region.bounds) == box_to_region_text(cells)


def test_region_text_uses_released_order():
    assert box_to_region_text((1, 2, 3, 4)) == span(x_token(1), y_token(2), x_token(3), y_token(4))


@pytest.mark.parametrize("cells", [(3, 0, 2, 0), (0, 0, 8, 1), (-1, 0, 1, 1)])
def test_region_text_rejects_bad_bounds(cells):
    with pytest.raises(ValueError):
        box_to_region_text(cells)


@given(st.lists(indices, min_size=1), st.lists(indices, min_size=1), st.randoms())
def test_order_and_duplicates_do_not_matter(xs, ys, rng):
    tokens = [x_token(i) for i in xs + xs] + [y_token(j) for j in ys]
    rng.shuffle(tokens)
    assert parse_regions(span(*tokens)) == [RegionSpan(frozenset(xs), frozenset(ys))]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 100), min_size=1), st.lists(st.integers(0, 100), min_size=1), st.integers(1, 16))
def test_out_of_range_indices_are_clamped(caplog, xs, ys, grid_size):
    caplog.clear()
    text = span(*map(x_token, xs), *map(y_token, ys))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        [region] = parse_regions(text, grid_size)
    assert region.xs == {min(i, grid_size - 1) for i in xs}
    assert region.ys == {min(j, grid_size - 1) for j in ys}
    out_of_range = sum(i >= grid_size for i in xs + ys)
    assert len(caplog.records) == out_of_range
    assert len(region_problems(text, grid_size)) == out_of_range


@pytest.mark.parametrize(
    "inside",
    [
        "",
        x_token(1),
        y_token(1) + y_token(2),
        x_token(1) + " " + y_token(1),
        x_token(1) + y_token(1) + "a",
        x_token(1) + "<|z_1|>" + y_token(1),
        x_token(1) + "<|x_-1|>" + y_token(1),
        x_token(1) + "<|y_|>" + y_token(1),
    ],
)
def test_malformed_spans_are_skipped(inside):
    text = "before " + REGION_START + inside + REGION_END + " after"
    assert parse_regions(text) == []
    assert region_problems(text) == [f"malformed region span {REGION_START + inside + REGION_END!r}"]


def test_unterminated_start_does_not_swallow_the_next_span():
    text = REGION_START + x_token(1) + " " + span(x_token(2), y_token(3))
    assert [r.bounds for r in parse_regions(text)] == [(2, 3, 2, 3)]
    assert region_problems(text) == ["unpaired region delimiter"]
    assert region_problems(REGION_END) == ["unpaired region delimiter"]


def test_text_without_regions():
    assert parse_regions("The answer is 42.") == []
    assert region_problems("The answer is 42.") == []


@given(st.lists(cell_bounds(), max_size=5), st.sampled_from(["", " ", "\nRegion: ", "x_1|>"]))
def test_several_spans_give_several_regions_in_order(cells_list, separator):
    text = separator.join(box_to_region_text(cells) for cells in cells_list)
    assert [region.bounds for region in parse_regions(text)] == cells_list


@pytest.mark.parametrize("xs, ys", [(set(), {1}), ({1}, set()), ({-1}, {1})])
def test_region_needs_nonnegative_x_and_y(xs, ys):
    with pytest.raises(ValueError):
        RegionSpan(frozenset(xs), frozenset(ys))


# Region -> pixel box


@pytest.mark.parametrize(
    "xs, ys, size, grid_size, margin, box",
    [
        ({2, 3}, {1}, (800, 400), 8, 1, (100, 0, 500, 150)),
        ({0, 7}, {0, 7}, (800, 400), 8, 1, (0, 0, 800, 400)),
        ({3}, {3}, (800, 400), 8, 0, (300, 150, 400, 200)),
        ({6}, {7}, (800, 400), 8, 1, (500, 300, 800, 400)),
        ({1}, {1}, (100, 50), 8, 0, (12, 6, 25, 12)),
        ({1}, {2}, (90, 30), 4, 2, (0, 0, 90, 30)),
        ({0}, {0}, (3, 3), 8, 0, (0, 0, 1, 1)),
    ],
)
def test_box_rule_examples(xs, ys, size, grid_size, margin, box):
    assert region_to_box(RegionSpan(frozenset(xs), frozenset(ys)), size, grid_size, margin) == box


@given(
    st.integers(1, 16).flatmap(lambda g: st.tuples(st.just(g), cell_bounds(g))),
    st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    st.integers(0, 3),
)
def test_box_is_inside_the_image_non_empty_and_covers_the_cells(grid_and_cells, size, margin):
    grid_size, (x_min, y_min, x_max, y_max) = grid_and_cells
    region = RegionSpan(frozenset({x_min, x_max}), frozenset({y_min, y_max}))
    x0, y0, x1, y1 = region_to_box(region, size, grid_size, margin)
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
    if min(size) >= grid_size:  # smaller images get the one-pixel fallback, which need not contain the margin-0 box
        bx0, by0, bx1, by1 = region_to_box(region, size, grid_size, 0)
        assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1


def test_crop_box_rule():
    # Margin of one cell, clamped to the image, pixel edges truncated (the synthetic data's crops).
    assert region_to_box(RegionSpan.from_bounds((3, 5, 3, 5)), (448, 448), 8) == (112, 224, 280, 392)
    assert region_to_box(RegionSpan.from_bounds((0, 0, 7, 7)), (448, 448), 8) == (0, 0, 448, 448)
    assert region_to_box(RegionSpan.from_bounds((2, 2, 2, 2)), (450, 450), 8) == (56, 56, 225, 225)
    assert box_to_cells((56, 0, 113, 10), (448, 448), 8) == (1, 0, 2, 0)
    assert RegionSpan.from_bounds((1, 2, 3, 4)).bounds == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="not inside"):
        box_to_cells((0, 0, 449, 10), (448, 448), 8)


@given(
    st.integers(1, 16).flatmap(lambda g: st.tuples(st.just(g), cell_bounds(g))),
    st.tuples(st.integers(16, 5000), st.integers(16, 5000)),  # at least one pixel per cell
)
def test_the_cells_of_a_cell_box_are_that_box(grid_and_cells, size):
    """`box_to_cells` inverts the cell edges: the pixels of a cell box (margin 0) touch exactly its cells."""
    grid_size, cells = grid_and_cells
    box = region_to_box(RegionSpan.from_bounds(cells), size, grid_size, margin=0)
    assert box_to_cells(box, size, grid_size) == cells
    assert cell_edges(size[0], grid_size)[cells[0]] == box[0] and cell_edges(size[1], grid_size)[cells[3] + 1] == box[3]


def test_box_rejects_bad_parameters():
    region = RegionSpan(frozenset({1}), frozenset({1}))
    with pytest.raises(ValueError):
        region_to_box(region, (10, 10), margin=-1)
    with pytest.raises(ValueError):
        region_to_box(region, (10, 10), grid_size=0)


@given(st.lists(regions, max_size=3), st.integers(1, 60), st.integers(1, 60))
def test_crop_sizes_match_boxes(region_list, width, height):
    image = Image.new("RGB", (width, height))
    crops = crop_regions(image, region_list)
    assert [box for box, _ in crops] == [region_to_box(r, (width, height)) for r in region_list]
    for (x0, y0, x1, y1), crop in crops:
        assert crop.size == (x1 - x0, y1 - y0)


def test_crop_regions_from_text():
    image = Image.new("RGB", (800, 400))
    text = "Look here " + box_to_region_text((2, 1, 3, 1)) + " and " + box_to_region_text((0, 0, 0, 0))
    assert [box for box, _ in crop_regions(image, text)] == [(100, 0, 500, 150), (0, 0, 200, 100)]
    assert [crop.size for _, crop in crop_regions(image, text, margin=0)] == [(200, 50), (100, 50)]


# Crop paths


@pytest.mark.parametrize(
    "path",
    [
        "a/b_c/img.jpg",
        "img.tar_gz",
        "img.jpg_1,2,3",
        "img.jpg_1,2,3,4,5",
        "img.jpg_-1,2,3,4",
        "img.jpg_1,2,3,4 ",
        "img.jpg_1,2,3,4\n",
        "img.jpg 1,2,3,4",
        "_1,2,3,4",
        "/data/run_3/img_0001.png",
    ],
)
def test_plain_paths_stay_plain(path):
    assert split_crop_path(path) == (path, None)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/data/gqa/img.jpg_0,10,200,300", ("/data/gqa/img.jpg", (0, 10, 200, 300))),
        ("a/b_c/img.tar_gz_1,2,3,4", ("a/b_c/img.tar_gz", (1, 2, 3, 4))),
        ("noext_1,2,3,4", ("noext", (1, 2, 3, 4))),
        ("img.jpg_1,2,3,4_5,6,7,8", ("img.jpg_1,2,3,4", (5, 6, 7, 8))),
    ],
)
def test_crop_paths_are_split(path, expected):
    assert split_crop_path(path) == expected


@pytest.mark.parametrize("path", ["img.jpg_5,0,5,10", "img.jpg_0,9,10,3"])
def test_empty_crop_box_names_the_path(path):
    with pytest.raises(ValueError, match="img.jpg"):
        split_crop_path(path)


path_texts = st.text(alphabet="ab_.,/0123456789 -")
int_lists = st.lists(st.integers(0, 99).map(str), max_size=6).map(",".join)


@given(st.one_of(path_texts, st.tuples(path_texts, int_lists).map("_".join)))
def test_split_either_keeps_the_path_or_strips_exactly_four_integers(path):
    try:
        real, box = split_crop_path(path)
    except ValueError:
        return
    if box is None:
        assert real == path
    else:
        suffix = path[len(real) :]
        assert path.startswith(real) and real
        assert suffix[0] == "_"
        parts = suffix[1:].split(",")
        assert all(part.isdigit() for part in parts)
        assert tuple(map(int, parts)) == box


@given(st.text(min_size=1), boxes)
def test_join_then_split_round_trips(path, box):
    assert split_crop_path(join_crop_path(path, box)) == (path, box)


@pytest.mark.parametrize("path, box", [("img.jpg", (3, 0, 3, 5)), ("img.jpg", (-1, 0, 3, 5)), ("", (0, 0, 1, 1))])
def test_join_rejects_bad_input(path, box):
    with pytest.raises(ValueError):
        join_crop_path(path, box)


# Opening images


@pytest.fixture
def gradient(tmp_path):
    image = Image.new("L", (40, 20))
    image.putdata([x + 40 * y for y in range(20) for x in range(40)])
    path = tmp_path / "dir_with_underscore" / "img.tar_png"
    path.parent.mkdir()
    image.save(path, format="PNG")
    return str(path), image


def test_open_plain_path_gives_rgb(gradient):
    path, source = gradient
    image = open_image(path)
    assert image.mode == "RGB" and image.size == source.size


def test_open_crop_path_crops(gradient):
    path, source = gradient
    image = open_image(join_crop_path(path, (5, 2, 15, 12)))
    assert image.mode == "RGB" and image.size == (10, 10)
    assert image.getpixel((0, 0)) == (source.getpixel((5, 2)),) * 3
    assert image.getpixel((9, 9)) == (source.getpixel((14, 11)),) * 3


def test_open_rejects_box_outside_image(gradient):
    path, _ = gradient
    with pytest.raises(ValueError, match="outside"):
        open_image(join_crop_path(path, (0, 0, 41, 20)))
