"""Reliability of the evaluation driver (issue 12): judge scores never silently out of range, unreadable images
(decompression bombs included) as per-record problems, EXIF-correct crop checks, one run per output directory,
names that cannot leave it, per-record sampling seeds, and one-line CLI failures. Tiny CPU models, as
test_evaluation.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from utils import ROOT, FakeOpenAI, action_record, draw, load, read_jsonl, scripted

from transformers_vpt.evaluation import evaluation as ev
from transformers_vpt.evaluation.datasets import BrokenRecord, make_item, prepare_items
from transformers_vpt.evaluation.storage import OutputDirError, exclusive_run, output_path
from transformers_vpt.pipeline import VPTPipeline

DATASET = "POPE_action_test"
RECORDS = 5


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A data dir with one POPE split of five action records; returns (data dir, {question key: answer})."""
    root = tmp_path_factory.mktemp("reliability_data")
    (root / "images").mkdir()
    records, answers = [], {}
    for k in range(RECORDS):
        key, answer = f"[r{k}]", ("Yes", "No")[k % 2]
        draw(root / f"images/{k}.png", k)
        records.append(action_record(f"What is in {key}?", answer, f"images/{k}.png"))
        answers[key] = answer
    (root / f"{DATASET}.json").write_text(json.dumps(records))
    return root, answers


def argv_for(data_dir, out, model_dir, *extra) -> list[str]:
    return [
        "--model",
        f"vpt={model_dir}",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--max-image-side",
        "64",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        *extra,
    ]


def run_config(data_dir, out, model_dir, *extra) -> ev.EvalConfig:
    return ev.parse_config(argv_for(data_dir, out, model_dir, "--greedy", *extra))


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


# --- 1. the judge score rule ----------------------------------------------------------------------------------------

JUDGE_REPLIES = {"[r0]": "Score: 100", "[r1]": "no idea"}  # every other answer: "score: 0.5"


@pytest.fixture
def judge_server():
    def reply(body):
        prompt = body["messages"][0]["content"]
        return 200, next((r for key, r in JUDGE_REPLIES.items() if key in prompt), "score: 0.5")

    with FakeOpenAI(reply) as server:
        yield server


def test_out_of_range_and_missing_judge_scores_are_unscored_and_counted(split, vpt, tmp_path, judge_server):
    data_dir, answers = split
    model_dir, processor = vpt
    out = tmp_path / "out"
    cfg = run_config(data_dir, out, model_dir, "--judge-base-url", judge_server.url)
    results, markdown = ev.evaluate(cfg, scripted(processor, answers))

    judge = results["vpt"][DATASET]["judge"]
    assert judge == {"model": "gpt-4o", "score_rule": "strict", "score": 0.5, "judged": 3, "unscored": 2, "failed": 0}
    assert load(out / "vpt" / DATASET / "scores.json")["judge"] == judge
    assert len(judge_server.requests) == 3 + 2 * 2  # each reply without a valid score was asked once more
    rows = {row["index"]: row for row in load(out / "vpt" / DATASET / "final_answers.json")}
    assert [rows[i]["scores"]["judge"] for i in range(RECORDS)] == [None, None, 0.5, 0.5, 0.5]
    assert rows[0]["judge_reply"] == "Score: 100" and "no score in [0, 1]" in rows[0]["judge_error"]

    table = load(out / "summary.json")
    assert table["models"]["vpt"]["unscored"] == {DATASET: 2}
    assert table["models"]["vpt"]["scores"] == {DATASET: 0.5}
    header, _, row = list(csv.reader((out / "summary.csv").open()))
    assert dict(zip(header, row))[f"unscored {DATASET}"] == "2"
    md = (out / "summary.md").read_text()
    assert f"| unscored | {DATASET} | total |" in md and "| vpt | 2 | 2 |" in md and md in markdown

    # The released rule, for like-for-like comparisons: the cached replies are rescored, no request is sent.
    judge_server.requests.clear()
    upstream = run_config(
        data_dir, out, model_dir, "--judge-base-url", judge_server.url, "--judge-score-rule", "upstream"
    )
    again, _ = ev.evaluate(upstream, scripted(processor, answers))
    assert judge_server.requests == []
    old = again["vpt"][DATASET]["judge"]
    assert (old["score_rule"], old["judged"], old["unscored"]) == ("upstream", 5, 0)
    assert old["score"] == pytest.approx((100.0 + 0.0 + 3 * 0.5) / 5)  # first [01]\.?\d*, 0 when absent
    assert "judge_score_rule" not in load(out / "vpt" / DATASET / "settings.json")  # scoring, not answers


# --- 2. images ------------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_a_problem_of_its_record(split, vpt, tmp_path, monkeypatch):
    data_dir, answers = split
    records = json.loads((data_dir / f"{DATASET}.json").read_text())[:3]
    Image.new("RGB", (300, 300), "white").save(tmp_path / "bomb.png")  # 90000 pixels: > 2 x the limit below
    records.insert(1, action_record("What is in [r9]?", "Yes", str(tmp_path / "bomb.png")))
    (tmp_path / "data").mkdir()
    (tmp_path / f"data/{DATASET}.json").write_text(json.dumps(records))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # the split's own images have < 8000 pixels

    model_dir, processor = vpt
    cfg = run_config(tmp_path / "data", tmp_path / "out", model_dir, "--media-dir", str(data_dir))
    results, _ = ev.evaluate(cfg, scripted(processor, answers))  # finishes

    folder = tmp_path / "out/vpt" / DATASET
    [problem] = load(folder / "problems.json")
    assert problem["index"] == 1 and "too large to decode safely" in problem["problem"]
    assert [a["index"] for a in read_jsonl(folder / "answers.jsonl")] == [0, 2, 3]
    assert (results["vpt"][DATASET]["answered"], results["vpt"][DATASET]["problems"]) == (3, 1)


def test_a_bomb_met_at_answer_time_is_a_problem_too(split, vpt, tmp_path, monkeypatch):
    """An image that passed the header check but cannot be decoded later (here: the limit drops meanwhile)."""
    data_dir, answers = split
    model_dir, processor = vpt
    evaluator = ev.Evaluator(run_config(data_dir, tmp_path / "out", model_dir), scripted(processor, answers))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)  # every image of the split is now a bomb (> 6000 pixels)
    evaluator.run()
    problems = load(tmp_path / "out/vpt" / DATASET / "problems.json")
    assert [p["index"] for p in problems] == list(range(RECORDS))
    assert all(p["problem"].startswith("image ") and "too large to decode safely" in p["problem"] for p in problems)


def exif_rotated_jpeg(path: Path) -> None:
    """A JPEG stored 120x40 whose EXIF orientation (6, rotate 90) makes a viewer show it 40x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 40), "red").save(path, exif=exif)


def test_crop_box_check_uses_viewer_pixels(tmp_path):
    exif_rotated_jpeg(tmp_path / "rot.jpg")

    def item(box: str):
        return make_item(0, action_record("What?", "Yes", f"rot.jpg_{box}"), tmp_path)

    assert item("0,0,40,120").image == "rot.jpg_0,0,40,120"  # inside the 40x120 image the viewer shows
    with pytest.raises(BrokenRecord, match=r"lies outside the 40x120 image"):
        item("0,0,120,40")  # inside the stored pixels only


# --- 3. one run per output directory, names inside it ---------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_directory_fails_at_once(split, vpt, tmp_path, capsys):
    data_dir, _ = split
    out = tmp_path / "out"
    out.mkdir()
    argv = argv_for(data_dir, out, vpt[0], "--greedy")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True
    )  # another evaluation, as far as the lock is concerned
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert ev.main(argv) == 2
        [line] = error_lines(capsys)
        assert line.startswith("evaluation.py: error: another evaluation") and str(out) in line
        assert f"(pid {holder.pid})" in line
        assert not (out / "vpt").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    assert ev.main(argv) == 0  # a lock of a dead process is no lock


def test_the_lock_is_held_for_the_run_and_released(tmp_path):
    out = tmp_path / "out"
    with exclusive_run(out) as directory, pytest.raises(OutputDirError, match="another evaluation"), exclusive_run(out):
        pass
    with exclusive_run(directory):  # released
        pass


@pytest.mark.parametrize("name", ["../x_test", "ABSOLUTE"])
def test_dataset_names_cannot_leave_the_directories(split, vpt, tmp_path, capsys, name):
    data_dir, _ = split
    (tmp_path / "data").mkdir()
    shutil.copy(data_dir / f"{DATASET}.json", tmp_path / "x_test.json")  # what ../x_test would read
    if name == "ABSOLUTE":
        name = str(tmp_path / "x_test")
    out = tmp_path / "out"
    argv = argv_for(tmp_path / "data", out, vpt[0], "--greedy", "--datasets", name)
    assert ev.main([*argv, "--media-dir", str(data_dir)]) == 2
    [line] = error_lines(capsys)
    assert f"--datasets {name!r} is not a dataset name" in line
    assert not (tmp_path / "x_test").exists() and not (out / "x_test").exists()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("vpt", ".."), "starts with a dot"),
        (("vpt", "a/b"), "path separator"),
        (("/abs",), "path separator"),
        (("",), "empty"),
        (("vpt", ".lock"), "starts with a dot"),
    ],
)
def test_output_names_are_single_plain_components(tmp_path, names, message):
    with pytest.raises(OutputDirError, match=message):
        output_path(tmp_path, *names)


def test_a_symbolic_link_out_of_the_output_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out/vpt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputDirError, match="leads outside the output directory"):
        output_path(tmp_path / "out", "vpt", DATASET)
    assert output_path(tmp_path / "out", "other", DATASET) == tmp_path / "out/other" / DATASET


# --- 4. per-record seeds --------------------------------------------------------------------------------------------


def sampled_answers(data_dir, out, model_dir, batch_size: int, seed: int = 0) -> list[tuple]:
    argv = argv_for(data_dir, out, model_dir, "--no-greedy", "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0")
    cfg = ev.parse_config([*argv, "--batch-size", str(batch_size), "--seed", str(seed)])
    ev.evaluate(cfg)
    answers = read_jsonl(out / "vpt" / DATASET / "answers.jsonl")
    return sorted((a["index"], a["round1_text"], a["answer"]) for a in answers)


def test_sampled_answers_do_not_depend_on_batch_boundaries(split, vpt, tmp_path):
    data_dir, _ = split
    model_dir, _ = vpt
    one_by_one = sampled_answers(data_dir, tmp_path / "bs1", model_dir, batch_size=1)
    in_threes = sampled_answers(data_dir, tmp_path / "bs3", model_dir, batch_size=3)
    assert in_threes == one_by_one
    assert [index for index, *_ in one_by_one] == list(range(RECORDS))
    other_seed = sampled_answers(data_dir, tmp_path / "seed1", model_dir, batch_size=3, seed=1)
    assert other_seed != one_by_one  # the answers are sampled, and the seed matters
    assert load(tmp_path / "bs1/vpt" / DATASET / "settings.json")["seeding"] == "per_record"


def test_a_record_failing_inside_the_pipeline_is_a_problem_and_its_batch_is_kept(split, vpt, tmp_path, monkeypatch):
    data_dir, answers = split
    answer = VPTPipeline._answer

    def fails_on_r2(self, texts, *args, **kwargs):
        if any("[r2]" in text for text in texts):
            raise RuntimeError("boom")
        return answer(self, texts, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "_answer", fails_on_r2)  # the pipeline records it (on_error="record")
    model_dir, processor = vpt
    results, _ = ev.evaluate(run_config(data_dir, tmp_path / "out", model_dir), scripted(processor, answers))
    folder = tmp_path / "out/vpt" / DATASET
    assert load(folder / "problems.json") == [{"index": 2, "problem": "generation failed: RuntimeError: boom"}]
    answered = read_jsonl(folder / "answers.jsonl")
    assert [a["index"] for a in answered] == [0, 1, 3, 4] and all("error" not in a for a in answered)
    assert results["vpt"][DATASET]["answered"] == 4


# --- 5. one-line CLI failures ---------------------------------------------------------------------------------------


def broken_model(tmp_path, vpt) -> Path:
    """A directory with a VPT config.json but no weights: it resolves, then fails to load."""
    directory = tmp_path / "broken_model"
    directory.mkdir()
    shutil.copy(vpt[0] / "config.json", directory / "config.json")
    return directory


@pytest.mark.parametrize("failure", ["model dir", "data dir", "output under a file", "output is a file", "load"])
def test_cli_failures_are_one_line_and_exit_2(split, vpt, tmp_path, capsys, failure):
    data_dir, _ = split
    model_dir, out = vpt[0], tmp_path / "out"
    (tmp_path / "file").write_text("not a directory")
    expected = {
        "model dir": ({"model_dir": tmp_path / "no_model"}, "model directory"),
        "data dir": ({"data_dir": tmp_path / "no_data"}, "data directory"),
        "output under a file": ({"out": tmp_path / "file/out"}, "--output-dir"),
        "output is a file": ({"out": tmp_path / "file"}, "is not a directory"),
        "load": ({"model_dir": broken_model(tmp_path, vpt)}, "cannot load model vpt"),
    }
    changes, message = expected[failure]
    options = {"data_dir": data_dir, "out": out, "model_dir": model_dir} | changes
    assert ev.main(argv_for(**options)) == 2
    lines = error_lines(capsys)
    errors = [line for line in lines if line.startswith("evaluation.py: error:")]
    assert len(errors) == 1 and message in errors[0] and errors[0] == lines[-1]
    if failure != "load":  # a load failure comes after the progress log; the others before anything
        assert lines == errors
    name = {"model dir": "no_model", "data dir": "no_data", "load": "broken_model"}.get(failure, "file")
    assert name in errors[0]


def test_debug_shows_the_traceback(vpt, tmp_path):
    argv = argv_for(tmp_path / "no_data", tmp_path / "out", vpt[0], "--debug")
    with pytest.raises(ev.ConfigError, match="data directory"):
        ev.main(argv)


def test_a_model_that_fails_to_load_among_several_is_skipped(split, vpt, tmp_path, capsys):
    data_dir, _ = split
    argv = argv_for(data_dir, tmp_path / "out", vpt[0], "--greedy")
    argv += ["--model", f"broken={broken_model(tmp_path, vpt)}"]
    assert ev.main(argv) == 0
    lines = error_lines(capsys)
    [error] = [line for line in lines if "cannot load model broken" in line]
    assert "its missing answers are skipped" in error
    assert load(tmp_path / "out/vpt" / DATASET / "scores.json")["answered"] == RECORDS


def test_the_script_prints_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VPT_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "evaluation/evaluation.py", "--model", str(tmp_path / "none"), "--data-dir", str(tmp_path)]
        + ["--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    missing = tmp_path / "none"
    message = f"--model {missing}: model directory {missing} does not exist (give a local checkpoint directory)"
    assert done.stderr.splitlines() == [f"evaluation.py: error: {message}"]


def test_prepare_items_reports_every_unreadable_image_by_index(tmp_path, monkeypatch):
    draw(tmp_path / "ok.png", 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    records = [action_record("Q?", "Yes", name) for name in ("ok.png", "big.png", "bad.png", "ok.png_0,0,10,10")]
    items, problems = prepare_items(records, tmp_path)
    assert [item.index for item in items] == [0, 3]
    assert [(p["index"], p["problem"].split(" ")[0]) for p in problems] == [(1, "image"), (2, "cannot")]
