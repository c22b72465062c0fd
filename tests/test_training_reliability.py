"""Training refuses what prepare_data.py refuses, names the record a batch fails on, and never drops a branch
silently: `transformers_vpt.records` and the LLaMA-Factory data, trainer and model-loading patches, in-process."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from utils import train_args as tiny_train_args

import llamafactory_patches
from llamafactory_patches.records import SOURCES, batch_error
from transformers_vpt import VPT_Qwen2VLForConditionalGeneration
from transformers_vpt.errors import VPTUserError
from transformers_vpt.records import record_problems
from transformers_vpt.regions import box_to_region_text
from transformers_vpt.tiny.sources import make_tiny
from transformers_vpt.vocabulary import BRANCH_TOKENS, REENCODE_TRIGGER, REGION_TRIGGER

DINO, SAM, CLIP = (BRANCH_TOKENS[kind] for kind in ("dino", "sam", "clip"))

llamafactory_patches.apply()

from llamafactory.hparams import get_train_args  # noqa: E402
from llamafactory.train.test_utils import load_dataset_module, load_train_model  # noqa: E402
from llamafactory.train.tuner import run_exp  # noqa: E402


def chat(*contents):
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


def record(messages, images=("a.jpg",), **extra):
    return {"messages": messages, "images": list(images), **{f"{k}_images": list(v) for k, v in extra.items()}}


def reencode(branch=DINO, images=("a.jpg",)):
    turns = chat(f"<image>\nWhat?\n{REENCODE_TRIGGER}", branch.action_triple, branch.placeholder, "a cat")
    return record(turns, **{branch.prefix: images})


REGION = record(
    chat(f"<image>\nWhat? {REGION_TRIGGER}", box_to_region_text((0, 0, 3, 6)), "<image>", "a cat"),
    images=["a.jpg", "a.jpg_0,0,40,40"],
)
ALIGNMENT = record(chat(f"{DINO.placeholder}\nDescribe the image.", "A cat."), images=(), detection=["a.jpg"])


# ------------------------------------------------------------------------------------------------ records.py
def test_clean_records_have_no_problems():
    for rec in (REGION, reencode(DINO), reencode(SAM), reencode(CLIP), ALIGNMENT, record(chat("<image>\nQ", "A"))):
        assert record_problems(rec) == [], rec
    two = record(chat("<image>Q", DINO.action_triple, f"{DINO.placeholder}", DINO.action_triple, DINO.placeholder, "A"),
                 detection=["a.jpg", "b.jpg"])
    assert record_problems(two, require_actions=True, branches=["dino"]) == []


def test_placeholders_must_match_images():
    rec = record(chat("<image>\n<image>\nSame?", "yes"))
    assert record_problems(rec) == ["2 <image> placeholders but 1 images"]
    rec = reencode(DINO, images=("a.jpg", "b.jpg"))
    assert "1 <detection_image> placeholders but 2 detection_images" in record_problems(rec)


def test_actions_must_match_extra_images():
    no_images = reencode(SAM, images=())
    assert record_problems(no_images) == [
        "1 <seg_image> placeholders but 0 seg_images",
        "1 <|seg_action|> tokens but no seg_images: each action re-encodes one",
    ]
    two_actions = record(
        chat("<image>Q", CLIP.action_triple + CLIP.action_triple, CLIP.placeholder, "A"), clip=["a.jpg"]
    )
    assert record_problems(two_actions) == ["2 <|clip_action|> tokens for 1 clip_images; each image needs 1"]
    assert record_problems(two_actions, actions_per_image=2) == []  # projector_scale 2
    image_first = record(chat(f"<image>{DINO.placeholder}Q", DINO.action_triple, "ok", "A"), detection=["a.jpg"])
    expected = "<detection_image> #1 comes before the <|detection_action|> that asks for it"
    assert record_problems(image_first) == [expected]


def test_extra_images_need_actions_in_two_pass_training():
    assert record_problems(ALIGNMENT) == []  # single pass (alignment) conditions nothing
    problems = record_problems(ALIGNMENT, require_actions=True)
    assert problems == [
        "1 detection_images but no <|detection_action|> token: two-pass training (num_inner_forward_run: 2) "
        "conditions every extra image on its action; add the action triple before the image, or train the record "
        "in single-pass (alignment) mode"
    ]


def test_branches_the_model_does_not_build():
    problems = record_problems(reencode(SAM), branches=["dino"])
    assert problems == [
        "uses the 'sam' branch (seg_images / <|seg_action|>) but the model builds only ['dino']: add 'sam' to "
        "vision_encoder_ls or leave the record out"
    ]


def test_region_tokens_outside_the_vocabulary():
    span = "<|region_token_start|><|x_0|><|y_0|><|x_8|><|y_6|><|region_token_end|>"
    rec = record(chat(f"<image>\nQ {REGION_TRIGGER}", span, "<image>", "A"), images=["a.jpg", "a.jpg_0,0,4,4"])
    assert record_problems(rec) == ["<|x_8|> is out of range for a 8x8 grid"]
    rec = record(chat("<image>\nQ", "It is in <|y_9|> and <|x_07|>."))
    assert record_problems(rec) == [
        "<|x_07|> is not a region token (write <|x_7|>)",
        "<|y_9|> is out of range for a 8x8 grid",
    ]


def test_paths_and_structure():
    rec = record(chat("<image>Q", "A"), images=["a.jpg_5,5,5,5"])
    assert record_problems(rec) == ["images[0]: Empty crop box in image path 'a.jpg_5,5,5,5'"]
    assert record_problems({"messages": chat("Q", "A"), "images": "a.jpg"}) == ["images is not a list of path strings"]
    assert record_problems([]) == ["record is not a JSON object"]
    assert record_problems({"messages": chat("Q")})[0].startswith("roles ['user'] do not alternate")


# ------------------------------------------------------------------------------------------------ data path
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def dataset_dir(tiny, directory: Path, records: list, name="vpt_train") -> Path:
    """A dataset_info.json next to ``records`` (written as ``{name}.json``) with the tiny data's columns."""
    info = json.loads((tiny["data"] / "dataset_info.json").read_text())["synthetic_vpt_dino_train"]
    (directory / f"{name}.json").write_text(json.dumps(records))
    (directory / "dataset_info.json").write_text(json.dumps({name: {**info, "file_name": f"{name}.json"}}))
    return directory


def train_args(tiny, tmp_path, **overrides) -> dict:
    """The tiny run of `utils.train_args`, on the dataset written by `dataset_dir` into ``tmp_path``."""
    return tiny_train_args(
        tiny, tmp_path, dataset="vpt_train", dataset_dir=str(tmp_path), media_dir=str(tiny["data"]), **overrides
    )


@pytest.fixture(scope="module")
def records(tiny):
    return json.loads((tiny["data"] / "synthetic_vpt_dino_train.json").read_text())


def with_x8(records: list) -> tuple[list, int]:
    """The records with the first x cell of one region record turned into ``<|x_8|>``; returns its index."""
    records = json.loads(json.dumps(records))
    index = next(i for i, r in enumerate(records) if "<|region_token_start|>" in r["messages"][1]["content"])
    answer = records[index]["messages"][1]
    answer["content"] = re.sub(r"<\|x_[0-7]\|>", "<|x_8|>", answer["content"], count=1)
    return records, index


def test_bad_record_stops_training_before_tokenisation(tiny, records, tmp_path, monkeypatch):
    bad, index = with_x8(records)
    dataset_dir(tiny, tmp_path, bad)
    from llamafactory.data import loader

    def no_tokenisation(*args, **kwargs):
        raise AssertionError("tokenisation started")

    monkeypatch.setattr(loader, "_get_preprocessed_dataset", no_tokenisation)
    with pytest.raises(VPTUserError) as error:
        load_dataset_module(**train_args(tiny, tmp_path))
    message = str(error.value)
    assert f"1 of {len(bad)} records of {tmp_path / 'vpt_train.json'} break the VPT record rules" in message
    assert f"vpt_train.json[{index}]: <|x_8|> is out of range for a 8x8 grid" in message
    assert "vpt_skip_bad_records: true" in message


def test_streamed_files_are_checked_before_training(tiny, records, tmp_path):
    """The released recipes stream their files (`streaming: true`): the check still runs on the whole file first."""
    bad, index = with_x8(records)
    dataset_dir(tiny, tmp_path, bad)
    streamed = dict(streaming=True, max_steps=1, dataloader_num_workers=1)  # 0 workers: 0 shards, an empty stream
    with pytest.raises(VPTUserError, match=rf"vpt_train.json\[{index}\]: <\|x_8\|> is out of range"):
        load_dataset_module(**train_args(tiny, tmp_path, **streamed))
    rows = load_dataset_module(**train_args(tiny, tmp_path, **streamed, vpt_skip_bad_records=True))
    assert sorted(i for _, i in (row["vpt_record"] for row in rows["train_dataset"])) == [
        i for i in range(len(bad)) if i != index
    ]


def test_record_ids_are_file_indices_under_num_samples(tiny, records, tmp_path):
    dataset_dir(tiny, tmp_path, records)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["vpt_train"]["num_samples"] = 5
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    rows = load_dataset_module(**train_args(tiny, tmp_path))["train_dataset"]
    by_index = {tuple(records[i]["images"]) for _, i in rows["vpt_record"]}
    assert rows.num_rows == 5 and {tuple(Path(p).name for p in row["images"]) for row in rows} == {
        tuple(Path(p).name for p in images) for images in by_index
    }


def test_skip_key_drops_and_reports_bad_records(tiny, records, tmp_path, caplog):
    bad, index = with_x8(records)
    other = next(i for i, r in enumerate(bad) if r["detection_images"])
    bad[other]["detection_images"] = []  # a second bad record: an action and a placeholder without its image
    dataset_dir(tiny, tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        rows = load_dataset_module(**train_args(tiny, tmp_path, vpt_skip_bad_records=True))["train_dataset"]
    assert rows.num_rows == len(bad) - 2
    assert f"Skipped 2 of {len(bad)} records of {tmp_path / 'vpt_train.json'}" in caplog.text
    assert f"indices {sorted([other, index])}" in caplog.text
    assert f"vpt_train.json[{other}]: 1 <detection_image> placeholders but 0 detection_images" in caplog.text
    kept = sorted(index for _, index in rows["vpt_record"])
    assert kept == [i for i in range(len(bad)) if i not in (other, index)]
    assert {key for key, _ in rows["vpt_record"]} == {
        key for key, label in SOURCES.items() if label == str(tmp_path / "vpt_train.json")
    }


def test_model_rules_come_from_the_run(tiny, records, tmp_path):
    alignment = json.loads((tiny["data"] / "synthetic_alignment_detection_train.json").read_text())
    dataset_dir(tiny, tmp_path, alignment[:2])
    with pytest.raises(VPTUserError, match=r"vpt_train.json\[0\]: 1 detection_images but no <\|detection_action\|>"):
        load_dataset_module(**train_args(tiny, tmp_path))  # two-pass training
    rows = load_dataset_module(**train_args(tiny, tmp_path, num_inner_forward_run=1))["train_dataset"]
    assert rows.num_rows == 2


def test_unknown_keys_are_still_rejected(tiny, tmp_path):
    assert get_train_args(train_args(tiny, tmp_path, vpt_skip_bad_records=True))[1].vpt_skip_bad_records is True
    assert get_train_args(train_args(tiny, tmp_path, vpt_drop_branches=True))[0].vpt_drop_branches is True
    with pytest.raises(ValueError, match="vpt_skip_bad_record"):
        get_train_args(train_args(tiny, tmp_path, vpt_skip_bad_record=True))


# ------------------------------------------------------------------------------------------------ batches
def test_batch_error_names_the_record():
    SOURCES[7] = "data/x.json"
    ids = torch.tensor([[7, 3], [7, 12]])
    error = batch_error(ValueError("Sample 1 has 3 <|seg_image_pad|> tokens but ..."), ids)
    assert str(error).startswith("Sample 1 has 3 <|seg_image_pad|> tokens but ... -- in dataset record data/x.json[12]")
    assert "batch row 1 of ['data/x.json[3]', 'data/x.json[12]']" in str(error)
    SOURCES.pop(8, None)
    error = batch_error(ValueError("bad pixel values"), torch.tensor([[7, 3], [8, 1]]))
    expected = "bad pixel values -- in a batch of dataset records ['data/x.json[3]', 'dataset #8[1]']"
    assert str(error).startswith(expected)


def test_a_failing_batch_names_its_dataset_record(tiny, records, tmp_path, monkeypatch):
    dataset_dir(tiny, tmp_path, records[:2])
    forward = VPT_Qwen2VLForConditionalGeneration.forward

    def failing_forward(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] == 2:
            raise ValueError("Sample 1 has 3 <|detection_image_pad|> tokens but its detection_images give 4 features")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(VPT_Qwen2VLForConditionalGeneration, "forward", failing_forward)
    args = train_args(tiny, tmp_path, per_device_train_batch_size=2, max_steps=1, disable_shuffling=True,
                      save_strategy="no", overwrite_output_dir=True)
    with pytest.raises(ValueError) as error:
        run_exp(args)
    assert f"in dataset record {tmp_path / 'vpt_train.json'}[1] (batch row 1 of" in str(error.value)
    assert str(error.value).startswith("Sample 1 has 3 <|detection_image_pad|> tokens")


# ------------------------------------------------------------------------------------------------ branches
def test_a_recipe_cannot_drop_trained_branches_silently(tiny, records, tmp_path):
    dataset_dir(tiny, tmp_path, records[:1])
    with pytest.raises(ValueError, match=r"the sam, clip branches \(seg_model, seg_projector, clip_projector"):
        load_train_model(**train_args(tiny, tmp_path, vision_encoder_ls="dino"))
    model = load_train_model(**train_args(tiny, tmp_path, vision_encoder_ls="dino", vpt_drop_branches=True))
    assert model.config.vision_encoder_ls == ["dino"]
    assert not any(name.startswith(("seg_", "clip_")) for name, _ in model.named_parameters())
