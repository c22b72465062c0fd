import json
import subprocess
import sys

import pytest
from PIL import Image

from scripts import prepare_data as prep
from transformers_vpt.files import write_atomic
from transformers_vpt.regions import box_to_region_text
from transformers_vpt.vocabulary import BRANCH_TOKENS, REENCODE_TRIGGER, REGION_TRIGGER

SCRIPT = prep.__file__
OLD = "/root/autodl-tmp/vpt_data"
CLIP = BRANCH_TOKENS["clip"]


def chat(*contents):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


def record(messages, images=(), detection=(), seg=(), clip=(), clip_key="clip_images"):
    return {
        "messages": messages,
        "images": list(images),
        "detection_images": list(detection),
        "seg_images": list(seg),
        clip_key: list(clip),
    }


def region_record(answer, crop, question="What's the dog on? café"):
    return record(
        chat(f"<image>\n{question} \n{REGION_TRIGGER}", answer, "<image>", "pillow"),
        images=[f"{OLD}/gqa/dog.jpg", f"{OLD}/gqa/dog.jpg_{crop}"],
    )


GOOD_REGION = region_record(box_to_region_text((0, 0, 3, 6)), "0,0,400,350")
GQA = [
    GOOD_REGION,
    region_record("<|region_token_start|><|x_0|><|y_0|><|x_8|><|y_6|><|region_token_end|>", "0,0,800,350"),
    record(chat("<image>\n<image>\nSame dog? <image>", "yes"), images=[f"{OLD}/gqa/dog.jpg"] * 2),
    record(chat("<image>\nWhat is it?", "a cat"), images=[f"{OLD}/gqa/missing.jpg"]),
    region_record(box_to_region_text((0, 0, 7, 7)), "0,0,900,400"),
]
CLIP_RECORDS = [
    record(
        [{"role": "system", "content": "You are a helpful assistant."}]
        + chat(f"<image>\nWhat animal?\n{REENCODE_TRIGGER}", CLIP.action_triple, CLIP.placeholder, "a cat"),
        images=[f"{OLD}/coco/cat.png"],
        clip=[f"{OLD}/coco/cat.png"],
        clip_key="depth_images",
    ),
    record(chat("<detection_image>\nDescribe the image.", "A cat on a mat."), detection=[f"{OLD}/coco/cat.png"]),
    record(chat("<image>", "a") + [{"role": "assistant", "content": 3}], images=[f"{OLD}/coco/cat.png"]),
]
EXPECTED_PROBLEMS = {
    ("GQA_region_train.json", 1): ["<|x_8|> is out of range for a 8x8 grid"],
    ("GQA_region_train.json", 2): ["3 <image> placeholders but 2 images"],
    ("GQA_region_train.json", 3): ["images[0]: missing image file {new}/gqa/missing.jpg"],
    ("GQA_region_train.json", 4): [
        "images[1]: crop box (0, 0, 900, 400) lies outside the 800x400 image {new}/gqa/dog.jpg"
    ],
    ("CLIP_action_train.json", 2): [
        "messages[2] is not a {role, content} object with string content",
        "roles ['user', 'assistant', 'assistant'] do not alternate user, assistant (after an optional system turn)",
    ],
}


@pytest.fixture
def dataset(tmp_path):
    """Released-style files in ``released/`` and their images under ``images/``."""
    new = tmp_path / "images"
    (new / "gqa").mkdir(parents=True)
    (new / "coco").mkdir()
    Image.new("RGB", (800, 400), "red").save(new / "gqa" / "dog.jpg")
    Image.new("RGBA", (64, 48)).save(new / "coco" / "cat.png")
    released = tmp_path / "released"
    released.mkdir()
    for name, records in [("GQA_region_train.json", GQA), ("CLIP_action_train.json", CLIP_RECORDS)]:
        (released / name).write_text(json.dumps(records, indent=4, ensure_ascii=False), encoding="utf-8")
    return released, new, tmp_path / "out"


def expected_record(rec, new):
    """The input record as JSON text with only the prefix rewritten and depth_images renamed."""
    text = json.dumps(rec, ensure_ascii=False).replace(OLD, str(new))
    return text.replace('"depth_images"', '"clip_images"')


def run_main(released, new, out, *extra):
    return prep.main(["--input", str(released), "--output-dir", str(out), "--image-root", f"{OLD}={new}", *extra])


def test_full_run_reports_every_problem_and_keeps_every_record(dataset, capsys):
    released, new, out = dataset
    report = out / "report.json"
    assert run_main(released, new, out, "--report", str(report)) == 1
    stdout = capsys.readouterr().out

    expected = {key: [m.replace("{new}", str(new)) for m in messages] for key, messages in EXPECTED_PROBLEMS.items()}
    for (name, index), messages in expected.items():
        for message in messages:
            assert f"{name}[{index}]: {message}" in stdout
    assert "Found 6 problems" in stdout

    data = json.loads(report.read_text())
    found: dict = {}
    for p in data["problems"]:
        found.setdefault((p["file"], p["index"]), []).append(p["message"])
    assert found == expected
    assert data["files"] == [
        {"file": "CLIP_action_train.json", "records": 3, "problems": 2, "written": True},
        {"file": "GQA_region_train.json", "records": 5, "problems": 4, "written": True},
    ]

    for name, records in [("GQA_region_train.json", GQA), ("CLIP_action_train.json", CLIP_RECORDS)]:
        written = json.loads((out / name).read_text(encoding="utf-8"))
        assert [json.dumps(r, ensure_ascii=False) for r in written] == [expected_record(r, new) for r in records]
    clip_record = json.loads((out / "CLIP_action_train.json").read_text())[0]
    assert list(clip_record) == ["messages", "images", "detection_images", "seg_images", "clip_images"]
    assert clip_record["clip_images"] == [f"{new}/coco/cat.png"]
    assert sorted(p.name for p in out.iterdir()) == ["CLIP_action_train.json", "GQA_region_train.json", "report.json"]


def test_clean_data_exits_zero(dataset, capsys):
    released, new, out = dataset
    (released / "GQA_region_train.json").write_text(json.dumps([GOOD_REGION]))
    (released / "CLIP_action_train.json").write_text(json.dumps(CLIP_RECORDS[:2]))
    assert run_main(released, new, out) == 0
    stdout = capsys.readouterr().out
    assert "No problems found." in stdout
    assert stdout.splitlines()[-2].split() == ["total", "3", "0", "all", "written"]


def test_no_check_files_skips_file_checks(dataset, capsys):
    released, new, out = dataset
    assert run_main(released / "GQA_region_train.json", new, out, "--no-check-files") == 1
    stdout = capsys.readouterr().out
    assert "missing image file" not in stdout and "lies outside" not in stdout
    assert "3 <image> placeholders but 2 images" in stdout


def test_conflicting_depth_and_clip_images_are_reported_and_kept(dataset, capsys):
    released, new, out = dataset
    rec = dict(CLIP_RECORDS[0], clip_images=[f"{OLD}/gqa/dog.jpg"])
    (released / "CLIP_action_train.json").write_text(json.dumps([rec]))
    assert (
        prep.main(["--input", str(released / "CLIP_action_train.json"), "--output-dir", str(out), "--no-check-files"])
        == 1
    )
    assert "depth_images and clip_images are both given and differ" in capsys.readouterr().out
    assert json.loads((out / "CLIP_action_train.json").read_text()) == [rec]


def test_output_is_replaced_atomically(dataset, monkeypatch):
    released, new, out = dataset
    out.mkdir()
    target = out / "GQA_region_train.json"
    target.write_text("old contents")

    def broken_write_json(path, data, indent=1):
        def write(file):
            file.write(b"[{")
            raise RuntimeError("disk full")

        write_atomic(path, write)

    monkeypatch.setattr(prep, "write_json", broken_write_json)
    with pytest.raises(RuntimeError):
        run_main(released / "GQA_region_train.json", new, out, "--debug")
    assert target.read_text() == "old contents"
    assert run_main(released / "GQA_region_train.json", new, out) == 2  # one line, see the CLI test
    assert target.read_text() == "old contents"
    assert [p.name for p in out.iterdir()] == [target.name]

    monkeypatch.undo()
    run_main(released / "GQA_region_train.json", new, out)
    assert len(json.loads(target.read_text())) == len(GQA)
    assert [p.name for p in out.iterdir()] == [target.name]


def test_unreadable_input_is_reported_and_not_written(dataset, capsys):
    released, new, out = dataset
    (released / "dataset_info.json").write_text('{"vpt": {}}')
    (released / "broken.json").write_text("[{")
    assert run_main(released, new, out, "--no-check-files") == 1
    stdout = capsys.readouterr().out
    assert "dataset_info.json: not a JSON list of records; not written" in stdout
    assert "broken.json: cannot read JSON" in stdout
    assert not (out / "dataset_info.json").exists() and not (out / "broken.json").exists()
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()}
    assert rows["broken.json"] == ["-", "1", "not", "written"]
    assert rows["dataset_info.json"] == ["-", "1", "not", "written"]
    assert rows["GQA_region_train.json"][-1] == "written"
    assert rows["total"] == ["8", "6", "2", "not", "written"]
    assert "Not written (cannot be read as a JSON list of records): broken.json, dataset_info.json." in stdout


def test_only_unreadable_input_still_exits_nonzero(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.json").write_bytes(b"\xff\xfe not utf-8")
    assert prep.main(["--input", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]) == 1
    stdout = capsys.readouterr().out
    assert "empty.json: cannot read JSON" in stdout
    assert stdout.splitlines()[-3].split() == ["total", "0", "1", "1", "not", "written"]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--input", "{released}/nope.json", "--output-dir", "{out}"],
        ["--input", "{released}", "--output-dir", "{out}", "--image-root", "=/x"],
        ["--input", "{released}", "--output-dir", "{out}", "--image-root", "/a", "--image-root", "/b"],
        ["--input", "{released}", "--output-dir", "{released}"],
        ["--input", "{released}", "{released}/GQA_region_train.json", "--output-dir", "{out}"],
        ["--output-dir", "{out}"],
    ],
)
def test_usage_errors_exit_2(dataset, args):
    released, _, out = dataset
    with pytest.raises(SystemExit) as exit_info:
        prep.main([a.format(released=released, out=out) for a in args])
    assert exit_info.value.code == 2


def test_path_rewriter():
    rewrite = prep.PathRewriter.from_args(["/data=/mnt/d", "/data/gqa/=/fast/gqa", "rel_root"])
    assert rewrite("/data/coco/a.jpg") == "/mnt/d/coco/a.jpg"
    assert rewrite("/data/gqa/a.jpg_1,2,30,40") == "/fast/gqa/a.jpg_1,2,30,40"
    assert rewrite("/data/gqa/a.jpg_01,2,30,40") == "/fast/gqa/a.jpg_01,2,30,40"
    assert rewrite("/database/a.jpg") == "/database/a.jpg"
    assert rewrite("/data/a.jpg_5,5,5,5") == "/mnt/d/a.jpg_5,5,5,5"
    assert rewrite("coco/a_b.tar_gz_0,0,2,2") == "rel_root/coco/a_b.tar_gz_0,0,2,2"
    assert rewrite("/elsewhere/a.jpg") == "/elsewhere/a.jpg"
    assert prep.PathRewriter.from_args([])("x/a.jpg") == "x/a.jpg"


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--help"])
    assert exit_info.value.code == 0
    assert "OLD_PREFIX=NEW_ROOT" in capsys.readouterr().out


def test_script_runs_as_a_subprocess(dataset):
    """One end-to-end run through the interpreter (each start imports torch, so keep it to one)."""
    released, new, out = dataset
    command = [sys.executable, str(SCRIPT), "--input", str(released), "--output-dir", str(out)]
    result = subprocess.run([*command, "--image-root", f"{OLD}={new}"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "GQA_region_train.json[2]: 3 <image> placeholders but 2 images" in result.stdout
    assert result.stdout.splitlines()[-2].split() == ["total", "8", "6", "all", "written"]
    assert sorted(p.name for p in out.iterdir()) == ["CLIP_action_train.json", "GQA_region_train.json"]


def test_decompression_bomb_is_a_problem_of_its_records(dataset, monkeypatch, capsys):
    """An image over PIL's pixel limit is reported for every record that uses it; the run goes on."""
    released, new, out = dataset
    (released / "GQA_region_train.json").write_text(json.dumps([GOOD_REGION, CLIP_RECORDS[1]]))
    (released / "CLIP_action_train.json").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # dog.jpg (800x400) is a bomb, cat.png (64x48) is not
    assert run_main(released, new, out) == 1
    stdout = capsys.readouterr().out
    for i in (0, 1):
        assert f"GQA_region_train.json[0]: images[{i}]: image {new}/gqa/dog.jpg is too large to decode safely" in stdout
    assert "GQA_region_train.json[1]" not in stdout
    assert stdout.splitlines()[-2].split() == ["total", "2", "2", "all", "written"]
    assert len(json.loads((out / "GQA_region_train.json").read_text())) == 2


def test_unreadable_image_is_a_problem_of_its_record(dataset, capsys):
    released, new, out = dataset
    (new / "gqa" / "dog.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (released / "CLIP_action_train.json").unlink()
    assert run_main(released, new, out) == 1
    stdout = capsys.readouterr().out
    assert f"GQA_region_train.json[0]: images[0]: cannot read image {new}/gqa/dog.jpg" in stdout
    assert "GQA_region_train.json[3]: images[0]: missing image file" in stdout


def test_crop_boxes_are_checked_in_viewer_pixels(tmp_path, capsys):
    """A JPEG stored 40x80 with EXIF orientation 6 (rotate 90) is 80x40 on screen, where crop boxes live."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 80), "blue").save(tmp_path / "rotated.jpg", exif=exif)
    path = str(tmp_path / "rotated.jpg")
    records = [
        record(chat("<image>\nQ", "<image>", "<image>", "A"), images=[path, f"{path}_0,0,70,30", f"{path}_0,0,30,70"])
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    assert prep.main(["--input", str(tmp_path / "in.json"), "--output-dir", str(tmp_path / "out")]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("in.json[")]
    assert problems == [f"in.json[0]: images[2]: crop box (0, 0, 30, 70) lies outside the 80x40 image {path}"]


def test_failures_are_one_line_and_exit_2(dataset, capsys):
    released, new, out = dataset
    out.write_text("a file where the output folder should be")
    assert run_main(released, new, out) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("prepare_data.py: error: ")
    assert "File exists" in stderr and "Traceback" not in stderr
    with pytest.raises(FileExistsError):
        run_main(released, new, out, "--debug")
