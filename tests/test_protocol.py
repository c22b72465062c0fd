"""The protocol edges (issue 13, item 4), under the project's rules and under ``protocol="released"``.

The released evaluation (vpt_behaviour.md 3.2) finds region spans with the regex
``<\\|region_token_start\\|>(<\\|[xy]_[0-7]\\|>)+<\\|region_token_end\\|>``: ``<|x_8|>`` makes a span no region, an
x-only span is one, and its crop then fails, which drops the record from scoring. More than one kind (region, dino,
sam, clip) means no round 2. The project clamps ``<|x_8|>``, skips x-only spans and keeps crops at least one pixel
wide. Tiny scripted models as in test_pipeline.py and test_evaluation.py.
"""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image
from utils import (
    BOX_A,
    BOX_B,
    MAX_SIDE,
    SPAN_A,
    SPAN_B,
    FakeOpenAI,
    draw,
    eval_config,
    expected_round2,
    load,
    make_image,
    read_jsonl,
    region_record,
    scripted,
    scripted_kwargs,
)

from transformers_vpt.evaluation import evaluation as ev
from transformers_vpt.evaluation.scoring import region_hit
from transformers_vpt.pipeline import PROTOCOLS, route
from transformers_vpt.regions import (
    RegionSpan,
    SpanCells,
    find_spans,
    parse_regions,
    region_problems,
    region_to_box,
)
from transformers_vpt.vocabulary import BRANCH_TOKENS, REGION_END, REGION_START, x_token

DET = BRANCH_TOKENS["dino"]
X_ONLY = REGION_START + x_token(1) + x_token(3) + REGION_END
X8 = "<|region_token_start|><|x_0|><|y_0|><|x_8|><|y_6|><|region_token_end|>"  # the released GQA data bug
FULL = (0, 0, 640, 480)  # X8 clamped: cells x 0..7, y 0..6, widened to the whole 640x480 image

# edge -> (round-1 text, {protocol: (action, boxes, dropped)}); "dropped": no round 2, no answer, not scored.
P, R = "project", "released"
EDGES = {
    "x-only": (X_ONLY, {P: ("none", [], False), R: ("region", [], True)}),
    "x_8": (X8, {P: ("region", [FULL], False), R: ("none", [], False)}),
    "x_8 and a span": (SPAN_B + " " + X8, {P: ("region", [BOX_B, FULL], False), R: ("region", [BOX_B], False)}),
    "a span and x-only": (SPAN_A + X_ONLY, {P: ("region", [BOX_A], False), R: ("region", [], True)}),
    "span and dino": (SPAN_A + DET.action_triple, {P: ("conflict", [], False), R: ("conflict", [], False)}),
    "x_8 and dino": (X8 + DET.action_triple, {P: ("conflict", [], False), R: ("dino", [], False)}),
    "x-only and dino": (X_ONLY + DET.action_triple, {P: ("dino", [], False), R: ("conflict", [], False)}),
}
QUESTIONS = {name: f"Q {name}?" for name in EDGES}
SCRIPTS = {QUESTIONS[name]: text for name, (text, _) in EDGES.items()}


def answer(pipeline, question, protocol, image=None, scripts=SCRIPTS):
    kwargs = {"max_image_side": MAX_SIDE, "generation_kwargs": scripted_kwargs(pipeline.processor, scripts)}
    (result,) = pipeline([make_image() if image is None else image], [question], protocol=protocol, **kwargs)
    return result


# --- the parsing variants ------------------------------------------------------------------------------------------


def test_released_reading_rejects_out_of_range_spans_and_keeps_x_only_ones(caplog):
    with caplog.at_level(logging.WARNING, logger="transformers_vpt.regions"):
        assert find_spans(X8, out_of_range="reject") == []
        assert parse_regions(X8, out_of_range="reject") == []
    assert caplog.text == ""  # rejecting is the released reading, not a repair: no warning
    assert parse_regions(X8) == [RegionSpan(frozenset({0, 7}), frozenset({0, 6}))]  # the project clamps
    assert find_spans("<|region_token_start|><|x_07|><|y_1|><|region_token_end|>", out_of_range="reject") == []

    for out_of_range in ("clamp", "reject"):
        [span] = find_spans("a " + X_ONLY + " b", out_of_range=out_of_range)
        assert span == SpanCells(frozenset({1, 3}), frozenset(), X_ONLY) and not span.complete
        assert parse_regions(X_ONLY, out_of_range=out_of_range) == []
        with pytest.raises(ValueError, match="has no y index"):
            region_to_box(span, (640, 480))
    assert region_problems(X_ONLY) == [f"malformed region span {X_ONLY!r}"]
    with pytest.raises(ValueError, match="out_of_range"):
        find_spans(X8, out_of_range="drop")

    [span_b, _] = find_spans(SPAN_B + X8)
    [only_b] = find_spans(SPAN_B + X8, out_of_range="reject")
    assert only_b == span_b and region_to_box(only_b, (640, 480)) == BOX_B


def test_released_box_is_the_formula_as_is():
    region = RegionSpan(frozenset({0}), frozenset({0}))
    assert region_to_box(region, (3, 3)) == (0, 0, 1, 1)  # the project keeps a box at least one pixel wide
    assert region_to_box(region, (3, 3), nonempty=False) == (0, 0, 0, 0)  # int(2 * 3 / 8) == 0
    assert region_to_box(region, (640, 480), nonempty=False) == region_to_box(region, (640, 480)) == BOX_B


def test_route_under_both_protocols():
    for name, (text, expected) in EDGES.items():
        for protocol in PROTOCOLS:
            action, regions = route(text, ["dino", "sam", "clip"], protocol)
            assert action == expected[protocol][0], (name, protocol)
            assert (len(regions) > 0) == (action == "region")
    with pytest.raises(ValueError, match="protocol"):
        route(SPAN_A, [], "upstream")


def test_region_accuracy_reads_regions_as_they_were_routed():
    assert region_hit(SPAN_B + X8, (1, 1, 7, 6))  # the clamped <|x_8|> span covers the target
    assert not region_hit(SPAN_B + X8, (1, 1, 7, 6), "released")  # the released regex never saw that span
    assert region_hit(SPAN_B + X8, (0, 0, 0, 0), "released")
    with pytest.raises(ValueError, match="protocol"):
        region_hit(SPAN_B, (0, 0, 0, 0), "upstream")


# --- the pipeline ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(EDGES))
def test_every_edge_in_the_pipeline(pipeline, generate_calls, name, protocol):
    text, expected = EDGES[name]
    action, boxes, dropped = expected[protocol]
    image = make_image()
    result = answer(pipeline, QUESTIONS[name], protocol, image)
    assert (result.round1_text, result.action, result.boxes, result.error) == (text, action, boxes, None)
    if dropped:
        assert result.dropped.startswith("crop failed: ValueError: region span")
        assert "has no y index" in result.dropped
        assert (result.answer, result.round2_prompt, len(generate_calls)) == ("", None, 1)
    elif action not in ("region", "dino"):
        assert result.dropped is None and result.round2_prompt is None and len(generate_calls) == 1
        assert result.answer == text.strip()
    else:
        assert result.dropped is None and len(generate_calls) == 2
        prompt, images = expected_round2(QUESTIONS[name], text, action, boxes, image)
        assert result.round2_prompt == prompt
        inputs, _ = generate_calls[1]
        expected_inputs = pipeline.processor(text=[prompt], **images, return_tensors="pt")
        for key, value in expected_inputs.items():
            assert inputs[key].equal(value), key


def test_an_empty_released_crop_is_stretched_not_dropped(pipeline, generate_calls):
    """On a 3x3 image the released box of a corner cell is empty; PIL crops it to an empty image, which the
    released preprocessing stretches to 28 pixels. The project widens the box to one pixel instead."""
    scripts = {"Q tiny?": SPAN_B}
    project = answer(pipeline, "Q tiny?", "project", make_image(size=(3, 3)), scripts)
    released = answer(pipeline, "Q tiny?", "released", make_image(size=(3, 3)), scripts)
    assert (project.action, project.boxes) == ("region", [(0, 0, 1, 1)])
    assert (released.action, released.boxes, released.dropped) == ("region", [(0, 0, 0, 0)], None)
    assert len(generate_calls) == 4 and released.round2_prompt == project.round2_prompt
    grids = [kwargs["image_grid_thw"] for kwargs, _ in generate_calls[1::2]]
    assert grids[0].tolist() == grids[1].tolist()  # both crops reach the processor as one 28x28 image


def test_a_failing_crop_is_an_error_or_a_dropped_record(pipeline, monkeypatch):
    def broken_crop(self, box=None):
        raise OSError("crop backend gone")

    monkeypatch.setattr(Image.Image, "crop", broken_crop)
    project = answer(pipeline, "Q x_8 and a span?", "project")
    assert (project.action, project.error, project.dropped) == ("error", "OSError: crop backend gone", None)
    with pytest.raises(OSError, match="backend gone"):
        pipeline(
            [make_image()],
            ["Q x_8 and a span?"],
            protocol="project",
            on_error="raise",
            max_image_side=MAX_SIDE,
            generation_kwargs=scripted_kwargs(pipeline.processor, SCRIPTS),
        )
    released = answer(pipeline, "Q x_8 and a span?", "released")
    assert (released.action, released.error, released.answer) == ("region", None, "")
    assert released.dropped == "crop failed: OSError: crop backend gone"


def test_the_protocol_is_validated(pipeline):
    with pytest.raises(ValueError, match="protocol must be one of"):
        pipeline([make_image()], ["Q x-only?"], protocol="upstream")
    assert PROTOCOLS == ("project", "released")


# --- the evaluation -------------------------------------------------------------------------------------------------

DATASET = "GQA_region_test"
# record -> (round-1 text, action under project, action under released; None: dropped)
RECORDS = [
    (SPAN_A, "region", "region"),
    (X_ONLY, "none", None),
    (X8 + DET.action_triple, "conflict", "dino"),
    (X8, "region", "none"),
]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol_data")
    (root / "images").mkdir()
    records, scripts = [], {}
    for k, (text, _, _) in enumerate(RECORDS):
        draw(root / f"images/{k}.png", k)
        records.append(region_record(f"Where is [p{k}]?", f"red {k}", f"images/{k}.png"))
        scripts[f"[p{k}]"] = text
    (root / f"{DATASET}.json").write_text(json.dumps(records))
    return root, scripts


@pytest.fixture
def judge_server():
    with FakeOpenAI(lambda body: (200, "Score: 100")) as server:  # strict: unscored; upstream: 100.0
        yield server


def test_released_evaluation_drops_a_failed_crop_and_checks_the_protocol(split, vpt, tmp_path, judge_server):
    data_dir, scripts = split
    model_dir, processor = vpt
    out = tmp_path / "out"
    judge = ["--judge-base-url", judge_server.url]
    released = eval_config(data_dir, out, model_dir, extra=["--protocol", "released", *judge])
    results, _ = ev.evaluate(released, scripted(processor, scripts))

    folder = out / "vpt" / DATASET
    answers = read_jsonl(folder / "answers.jsonl")
    assert [a["index"] for a in answers] == [0, 1, 2, 3]
    assert [a["action"] for a in answers] == ["region", "region", "dino", "none"]
    assert answers[1]["dropped"].startswith("crop failed: ValueError: region span") and answers[1]["answer"] == ""
    assert all("dropped" not in a for k, a in enumerate(answers) if k != 1)
    final = load(folder / "final_answers.json")
    assert [(row["index"], row["action"]) for row in final] == [(0, "region"), (2, "dino"), (3, "none")]
    [problem] = load(folder / "problems.json")
    assert problem["index"] == 1
    assert problem["problem"].startswith("dropped from scoring (--protocol released): crop failed:")
    assert "has no y index" in problem["problem"]
    summary = results["vpt"][DATASET]
    assert (summary["records"], summary["answered"], summary["dropped"], summary["problems"]) == (4, 3, 1, 1)
    assert summary["actions"] == {"region": 1, "dino": 1, "none": 1}
    assert summary["judge"]["score_rule"] == "upstream" and summary["judge"]["score"] == 100.0
    assert len(judge_server.requests) == 3  # the dropped record is never judged
    assert load(folder / "settings.json")["protocol"] == "released"

    # A rerun answers nothing again (the dropped record is kept in answers.jsonl) and gives the same scores.
    again, _ = ev.evaluate(released, scripted(processor, scripts))
    assert again == results and len(read_jsonl(folder / "answers.jsonl")) == 4
    # An explicit judge rule wins over the protocol's default; the replies are cached.
    strict_rule = ["--protocol", "released", *judge, "--judge-score-rule", "strict"]
    strict = eval_config(data_dir, out, model_dir, extra=strict_rule)
    rescored, _ = ev.evaluate(strict, scripted(processor, scripts))
    assert rescored["vpt"][DATASET]["judge"]["score_rule"] == "strict"
    assert rescored["vpt"][DATASET]["judge"]["unscored"] == 3
    # The protocol changes answers, so it is part of the settings a rerun is checked against.
    with pytest.raises(ev.ConfigError, match=r"other settings \(protocol\)"):
        ev.evaluate(eval_config(data_dir, out, model_dir), scripted(processor, scripts))


def test_project_evaluation_and_settings_from_before_the_protocol(split, vpt, tmp_path):
    data_dir, scripts = split
    model_dir, processor = vpt
    out = tmp_path / "out"
    results, _ = ev.evaluate(eval_config(data_dir, out, model_dir), scripted(processor, scripts))
    folder = out / "vpt" / DATASET
    final = load(folder / "final_answers.json")
    assert [row["action"] for row in final] == [project for _, project, _ in RECORDS]
    assert final[3]["boxes"] == [[0, 0, 96, 72]]  # <|x_8|> clamped: the whole 96x72 image
    assert load(folder / "problems.json") == [] and results["vpt"][DATASET]["dropped"] == 0
    assert load(folder / "settings.json")["protocol"] == "project"

    # Settings written before --protocol existed read as the project protocol.
    settings = load(folder / "settings.json")
    del settings["protocol"]
    (folder / "settings.json").write_text(json.dumps(settings))
    again, _ = ev.evaluate(eval_config(data_dir, out, model_dir), scripted(processor, scripts))
    assert again == results
    assert "protocol" not in load(folder / "settings.json")  # nothing was answered, so the file was not rewritten
    released = eval_config(data_dir, out, model_dir, extra=["--protocol", "released"])
    with pytest.raises(ev.ConfigError, match=r"other settings \(protocol\)"):
        ev.evaluate(released, scripted(processor, scripts))


def test_protocol_option_and_judge_rule_default(tmp_path):
    base = ["--model", "m", "--data-dir", "d"]
    assert ev.parse_config(base).protocol == "project"
    assert ev.parse_config(base).score_rule() == "strict"
    assert ev.parse_config([*base, "--protocol", "released"]).score_rule() == "upstream"
    assert ev.parse_config([*base, "--protocol", "released", "--judge-score-rule", "strict"]).score_rule() == "strict"
    assert ev.parse_config([*base, "--judge-score-rule", "upstream"]).score_rule() == "upstream"
    path = tmp_path / "eval.yaml"
    path.write_text("model: m\ndata_dir: d\nprotocol: released\n")
    assert ev.parse_config(["--config", str(path)]).score_rule() == "upstream"
    with pytest.raises(SystemExit):
        ev.parse_config([*base, "--protocol", "upstream"])
    assert "--protocol {project,released}" in ev.build_parser().format_help()
