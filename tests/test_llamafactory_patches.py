"""The LLaMA-Factory patches in-process on a tiny VPT checkpoint: arguments, data, labels, batches, model loading."""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from utils import train_args

import llamafactory_patches
from llamafactory_patches import hook
from llamafactory_patches.build_pth import PTH_LINE, PTH_NAME
from llamafactory_patches.data import unpack_paths
from transformers_vpt.tiny import build_tiny_tokenizer
from transformers_vpt.tiny.sources import make_tiny
from transformers_vpt.vocabulary import BRANCH_TOKENS, token_id

IGNORE_INDEX = -100
SEQLEN = {"detection_images": 4, "seg_images": 16}  # tiny DINOv2 (2x2 patches) and SAM (4x4 map, stride 1)

llamafactory_patches.apply()
llamafactory_patches.apply()  # idempotent

from llamafactory.hparams import get_train_args, parser  # noqa: E402
from llamafactory.train.sft import workflow  # noqa: E402
from llamafactory.train.test_utils import load_dataset_module, load_train_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dataset(tiny, tmp_path_factory):
    return load_dataset_module(**train_args(tiny, tmp_path_factory.mktemp("dataset")))["train_dataset"]


def test_yaml_keys(tiny, tmp_path):
    for arg_classes in (parser._TRAIN_ARGS, parser._INFER_ARGS, parser._EVAL_ARGS):
        assert arg_classes[0].__name__ == "VPTModelArguments"

    values = dict(vision_encoder_ls="dino, SAM", para_mask_id=1, para_mask_ratio=0.5, projector_scale=1)
    model_args = get_train_args(train_args(tiny, tmp_path, **values))[0]
    assert model_args.vision_encoder_ls == ["dino", "sam"] and model_args.num_inner_forward_run == 2
    assert (model_args.para_mask_id, model_args.para_mask_ratio, model_args.projector_scale) == (1, 0.5, 1)
    assert get_train_args(train_args(tiny, tmp_path, vision_encoder_ls=["clip"]))[0].vision_encoder_ls == ["clip"]
    with pytest.raises(ValueError, match="ara_mask_id"):  # the released Det recipe's typo is still rejected
        get_train_args(train_args(tiny, tmp_path, ara_mask_id=1))


def test_extra_images_are_expanded_and_kept(dataset, tiny):
    tokenizer = build_tiny_tokenizer()
    counts = dict.fromkeys(SEQLEN | {"clip_images": None}, 0)
    for row in dataset:
        for branch in BRANCH_TOKENS.values():
            images = unpack_paths(row[branch.images_key])
            counts[branch.images_key] += len(images)
            assert all(Path(image).is_absolute() and Path(image).is_file() for image in images)
            pads = row["input_ids"].count(token_id(tokenizer, branch.image_pad))
            if branch.images_key in SEQLEN:
                assert pads == len(images) * SEQLEN[branch.images_key]
            else:
                assert (pads > 0) == bool(images)
    assert all(counts.values()), counts


def test_extra_image_columns_survive_batches_without_them(tiny, tmp_path):
    # `datasets` types a column from its first written batch: with 2-row batches, the DINO file's rows (no SAM or
    # CLIP images) come first, and the SAM and CLIP rows must still be kept.
    args = train_args(tiny, tmp_path, preprocessing_batch_size=2)
    rows = load_dataset_module(**args)["train_dataset"]
    kinds = {key: sum(bool(unpack_paths(row[key])) for row in rows) for key in ("seg_images", "clip_images")}
    assert rows.num_rows == 3 * 16 and all(kinds.values()), kinds
    assert isinstance(rows[0]["seg_images"], str) and unpack_paths(rows[0]["seg_images"]) == []


def test_action_labels_are_masked(dataset):
    tokenizer = build_tiny_tokenizer()
    masked = 0
    for row in dataset:
        for branch in BRANCH_TOKENS.values():
            triple = (branch.action_start, branch.action, branch.action_end)
            start, action, end = (token_id(tokenizer, token) for token in triple)
            for i, token in enumerate(row["input_ids"]):
                if token == action:
                    assert row["labels"][i] == IGNORE_INDEX
                    assert (row["labels"][i - 1], row["labels"][i + 1]) == (start, end)  # the triple's ends train
                    masked += 1
    assert masked > 0


def test_labels_have_the_released_form(dataset):
    """Assistant turns train `{content}<|im_end|>`; the newline after it opens the next user turn (a prompt token),
    and a sequence ends with `<|im_end|>`, as LLaMA-Factory 0.9.1's template made them."""
    tokenizer = build_tiny_tokenizer()
    im_end, newline = token_id(tokenizer, "<|im_end|>"), tokenizer.encode("\n")
    multi_turn = 0
    for row in dataset:
        ids, labels = row["input_ids"], row["labels"]
        assert ids[-1] == labels[-1] == im_end
        ends = [i for i, label in enumerate(labels[:-1]) if label == im_end]
        for i in ends:  # the end of an assistant turn that is not the last
            assert ids[i + 1 : i + 1 + len(newline)] == newline
            assert all(label == IGNORE_INDEX for label in labels[i + 1 : i + 1 + len(newline)])
        multi_turn += bool(ends)
    assert multi_turn > 0


def test_crop_paths_and_released_clip_column(tiny, tmp_path):
    records = json.loads((tiny["data"] / "synthetic_vpt_clip_train.json").read_text())
    for record in records:
        record["depth_images"] = record.pop("clip_images")
    (tmp_path / "released.json").write_text(json.dumps(records))
    columns = {key: key for key in ("messages", "images", "detection_images", "seg_images", "depth_images")}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    entry = {"file_name": "released.json", "formatting": "sharegpt", "columns": columns, "tags": tags}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"released": entry}))

    args = train_args(tiny, tmp_path, dataset="released", dataset_dir=str(tmp_path), media_dir=str(tiny["data"]))
    rows = list(load_dataset_module(**args)["train_dataset"])
    assert len(rows) == len(records)
    crops = [image for row in rows for image in row["images"][1:]]
    clips = [image for row in rows for image in unpack_paths(row["clip_images"])]
    assert crops and all(image.startswith(str(tiny["data"])) for image in crops)  # resolved against media_dir
    assert all(Path(image.rsplit("_", 1)[0]).is_file() for image in crops)  # the suffix is kept
    assert clips and all(Path(image).is_file() for image in clips)


def test_packing_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="packing"):
        load_dataset_module(**train_args(tiny, tmp_path, packing=True))


def test_collator_batches_every_kind(tiny, dataset, tmp_path):
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(train_args(tiny, tmp_path))
    tokenizer_module = workflow.load_tokenizer(model_args)
    template = workflow.get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    model = workflow.load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    collator = workflow.SFTDataCollatorWith4DAttentionMask(
        template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX, **tokenizer_module
    )
    picked = {}
    for row in dataset:
        extra = ("detection_images", "seg_images", "clip_images")
        kind = next((key for key in extra if unpack_paths(row[key])), "plain")
        picked.setdefault(kind, row)
    batch = collator([dict(row) for row in picked.values()])
    records = batch.pop("vpt_record")  # [source key, index in its file] per row, popped by the trainer
    assert records.shape == (len(picked), 2) and records.dtype == torch.long

    assert batch["detection_images"].shape == (1, 3, 28, 28) and batch["seg_images"].shape == (1, 3, 64, 64)
    assert batch["clip_images_grid_thw"].shape == (1, 3)
    assert batch["clip_pixel_values"].shape[0] == int(batch["clip_images_grid_thw"].prod())
    assert batch["position_ids"].shape == (4, *batch["input_ids"].shape)  # text row + M-RoPE (get_rope_index)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for projector in ("detection_projector", "seg_projector", "clip_projector"):
        assert getattr(model, projector).linear_condition.weight.grad.abs().sum() > 0, projector


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_full_tuning_freezes_the_encoders(tiny, tmp_path):
    names = trainable(load_train_model(**train_args(tiny, tmp_path, freeze_vision_tower=True)))
    assert not any(name.startswith(("model.detection_model.", "model.seg_model.", "model.visual.")) for name in names)
    projectors = ("model.detection_projector.", "model.seg_projector.", "model.clip_projector.")
    for prefix in (*projectors, "model.language_model.", "lm_head."):
        assert any(name.startswith(prefix) for name in names), prefix


def test_lora_targets_the_language_model_and_saves_projectors(tiny, tmp_path):
    projectors = "detection_projector,seg_projector,clip_projector"
    lora = dict(finetuning_type="lora", lora_target="all", additional_target=projectors)
    names = trainable(load_train_model(**train_args(tiny, tmp_path, **lora)))
    assert all(".language_model." in name for name in names if "lora_" in name)
    for projector in projectors.split(","):
        assert any(name.startswith(f"base_model.model.model.{projector}.modules_to_save.") for name in names), projector
    assert not any("lora_" in name and "projector" in name for name in names)


def test_missing_tokens_are_added_with_mean_embeddings(tiny, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny["model"], checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    plain = build_tiny_tokenizer(vision_encoder_ls=(), with_regions=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[len(plain) :] = 7.0  # untrained padding rows
    model.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (checkpoint / name).unlink()
    plain.save_pretrained(checkpoint)

    model = load_train_model(**train_args(tiny, tmp_path, model_name_or_path=str(checkpoint)))
    tokenizer = build_tiny_tokenizer()  # same ids as the tokens added in this run
    for branch in BRANCH_TOKENS.values():
        assert getattr(model.config, branch.action_id_field) == token_id(tokenizer, branch.action)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        expected = weight[: len(plain)].mean(0).expand(len(tokenizer) - len(plain), -1)
        torch.testing.assert_close(weight[len(plain) : len(tokenizer)], expected)
        assert torch.all(weight[len(tokenizer) :] == 7.0)


def test_vpt_keys_need_a_vpt_checkpoint(tiny, tmp_path):
    with pytest.raises(ValueError, match="not a VPT checkpoint"):
        load_train_model(**train_args(tiny, tmp_path, model_name_or_path=str(tiny["qwen2_vl"])))


def test_import_hook_is_installed_and_imports_nothing():
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert pth.is_file() and pth.read_text() == PTH_LINE, f"{pth} is missing or stale: run `pip install -e .`"
    code = (
        "import sys; print(sum(getattr(f, 'vpt_import_hook', False) for f in sys.meta_path), "
        "[m for m in sys.modules if m.startswith(('llamafactory', 'torch', 'transformers'))])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "[]"]
    hook.install()
    assert sum(getattr(finder, hook.MARKER, False) for finder in sys.meta_path) == 1


# ---------------------------------------------------------------------------------------------------- Qwen3-VL
QWEN3_TEMPLATES = {"vpt_qwen3_vl": "qwen3_vl", "vpt_qwen3_vl_nothink": "qwen3_vl_nothink"}
THINK = "<think>\n\n</think>\n\n"  # the empty thought the stock `qwen3_vl` (ReasoningTemplate) trains before answers


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """`make_tiny` on a tiny Qwen3-VL: the VPT checkpoint (every branch) of `prepare_weights` and the dataset."""
    return make_tiny(tmp_path_factory.mktemp("tiny3"), base="qwen3_vl")


def find(sequence: list[int], part: list[int]) -> list[int]:
    return [i for i in range(len(sequence) - len(part) + 1) if sequence[i : i + len(part)] == part]


@pytest.mark.parametrize("name", list(QWEN3_TEMPLATES))
def test_qwen3_vl_templates_keep_the_stock_formatting_and_labels(tiny3, tmp_path, name):
    """A VPT sample (image, clip image, action tokens) tokenizes as the stock `qwen3_vl` / `qwen3_vl_nothink` template
    would tokenize its expanded messages: the same ids and labels (plus the masked `<|clip_action|>`), not the released
    Qwen2-VL labels."""
    from llamafactory.data.template import TEMPLATES

    from llamafactory_patches.plugin import VPTQwen3VLPlugin

    args = train_args(tiny3, tmp_path, template=name, dataset="synthetic_vpt_clip_train")
    rows = list(load_dataset_module(**args)["train_dataset"])
    records = json.loads((tiny3["data"] / "synthetic_vpt_clip_train.json").read_text())
    assert len(rows) == len(records)
    model_args = get_train_args(args)[0]
    tokenizer_module = workflow.load_tokenizer(model_args)
    tokenizer, processor = tokenizer_module["tokenizer"], tokenizer_module["processor"]
    ours, stock = TEMPLATES[name], TEMPLATES[QWEN3_TEMPLATES[name]]
    assert type(ours) is type(stock) and isinstance(ours.mm_plugin, VPTQwen3VLPlugin)

    clip = BRANCH_TOKENS["clip"]
    action = token_id(tokenizer, clip.action)
    image_pad, clip_pad = token_id(tokenizer, "<|image_pad|>"), token_id(tokenizer, clip.image_pad)
    think, tail = tokenizer.encode(THINK, add_special_tokens=False), tokenizer.encode("<|im_end|>\n")
    reencoding = 0
    for row, record in zip(rows, records, strict=True):
        messages = [{"role": message["role"], "content": message["content"]} for message in record["messages"]]
        with ours.mm_plugin.extra_images(clip_images=unpack_paths(row["clip_images"])):
            expanded = ours.mm_plugin.process_messages(messages, row["images"], [], [], processor)
        ids, labels = [], []
        for source, target in stock.encode_multiturn(tokenizer, expanded, None, None):
            ids += source + target
            labels += [IGNORE_INDEX] * len(source) + target
        labels = [IGNORE_INDEX if label == action else label for label in labels]
        assert row["input_ids"] == ids and row["labels"] == labels, record["messages"]

        assert row["input_ids"].count(image_pad) > 0
        assert row["input_ids"][-len(tail) :] == row["labels"][-len(tail) :] == tail  # 0.9.5 trains the newline
        turns = len(messages) // 2
        if name == "vpt_qwen3_vl":  # every answer trains the empty thought first
            assert len(find(row["labels"], think)) == turns
        else:
            assert not find(row["input_ids"], think)
        if action in row["input_ids"]:
            reencoding += 1
            assert row["input_ids"].count(clip_pad) > 0
            assert row["labels"][row["input_ids"].index(action)] == IGNORE_INDEX
    assert reencoding > 0


def write_video(path: Path, frames: int, fps: int) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("source", ["frames", "file"])
def test_qwen3_vl_videos_expand_with_the_processors_timestamps(tiny3, tmp_path, source):
    """Two videos of different lengths in different turns expand frame by frame with the timestamps and grids that
    `VPT_Qwen3VLProcessor` itself writes for the same frames and metadata (LLaMA-Factory 0.9.5's own Qwen3-VL plugin
    reads metadata by message index and the frame count of the first video). ``file``: the grid and metadata come
    from the stream, without decoding (`_get_mm_token_metadata`); ``frames``: from the video processor."""
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny3["model"])
    plugin = TEMPLATES["vpt_qwen3_vl_nothink"].mm_plugin
    if source == "frames":
        videos = [[Image.new("RGB", (56, 56), (40 * i, 0, 0)) for i in range(n)] for n in (4, 6)]
    else:
        videos = [str(write_video(tmp_path / f"video{n}.mp4", n, fps=4)) for n in (8, 12)]
    messages = [
        {"role": "user", "content": "<video>What happens?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "And here? <video>"},
        {"role": "assistant", "content": "B"},
    ]
    if source == "file":
        assert plugin._get_mm_token_metadata([], videos, [], processor) is not None  # the no-decoding path
    expanded = plugin.process_messages(messages, [], videos, [], processor)
    assert [m["content"] for m in expanded[1::2]] == ["A", "B"]

    regularized = plugin._regularize_videos(videos, image_max_pixels=256 * 256, image_min_pixels=16 * 16,
                                            video_fps=2.0, video_maxlen=128)
    metadata = [
        {"fps": 2.0, "frames_indices": indices, "total_num_frames": len(frames)}
        for frames, indices in zip(regularized["videos"], regularized["frames_indices"], strict=True)
    ]
    text = expanded[0]["content"] + expanded[2]["content"]
    reference = processor(
        text=[messages[0]["content"] + messages[2]["content"]], videos=regularized["videos"],
        video_metadata=metadata, do_sample_frames=False,
    )
    assert processor.tokenizer(text)["input_ids"] == reference["input_ids"][0]
    # frames: 2 fps, indices 0..n-1; file: 4 fps streams sampled at 2 fps (indices 0, 2, 4, 7 and 0, 2, ..., 8, 11)
    stamps = {"frames": ["0.2", "1.2"] + ["0.2", "1.2", "2.2"], "file": ["0.2", "1.4"] + ["0.2", "1.2", "2.4"]}
    assert re.findall(r"<(\d+\.\d) seconds>", text) == stamps[source]


def test_qwen3_vl_freeze_vision_tower_freezes_pos_embed_and_deepstack_mergers(tiny3, tmp_path):
    qwen3 = dict(template="vpt_qwen3_vl_nothink", dataset="synthetic_vpt_clip_train")
    model = load_train_model(**train_args(tiny3, tmp_path, freeze_vision_tower=True, **qwen3))
    stock_keys = ("model.visual.pos_embed.", "model.visual.deepstack_merger_list.")
    qwen3_only = {name for name, _ in model.named_parameters() if name.startswith(stock_keys)}
    assert {key for key in stock_keys if any(name.startswith(key) for name in qwen3_only)} == set(stock_keys)
    names = trainable(model)
    assert not any(name.startswith(("model.detection_model.", "model.seg_model.", "model.visual.")) for name in names)
    for prefix in ("model.detection_projector.", "model.seg_projector.", "model.clip_projector.", "lm_head."):
        assert any(name.startswith(prefix) for name in names), prefix

    names = trainable(load_train_model(**train_args(tiny3, tmp_path, freeze_vision_tower=False, **qwen3)))
    assert qwen3_only <= names  # the flag decides, as for stock Qwen3-VL


def test_qwen3_vl_video_sample_batches_and_trains(tiny3, tmp_path):
    """A dataset with a video (frame files) and an image: tokenized with timestamps, batched with the videos'
    tensors and M-RoPE positions, and a training forward and backward run."""
    from llamafactory.data.template import TEMPLATES

    frames = []
    for i in range(4):
        frames.append(str(tmp_path / f"frame{i}.png"))
        Image.new("RGB", (56, 56), (60 * i, 0, 0)).save(frames[-1])
    records = [
        {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "red"}],
         "videos": [frames]},
        {"messages": [{"role": "user", "content": "<image>Shape?"}, {"role": "assistant", "content": "dot"}],
         "images": [frames[0]]},
    ]
    (tmp_path / "videos.json").write_text(json.dumps(records))
    columns = {"messages": "messages", "videos": "videos", "images": "images"}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    entry = {"file_name": "videos.json", "formatting": "sharegpt", "columns": columns, "tags": tags}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"videos": entry}))
    args = train_args({**tiny3, "data": tmp_path}, tmp_path, template="vpt_qwen3_vl_nothink", dataset="videos")
    rows = [dict(row) for row in load_dataset_module(**args)["train_dataset"]]
    model_args, _, _, finetuning_args, _ = get_train_args(args)
    tokenizer_module = workflow.load_tokenizer(model_args)
    text = tokenizer_module["tokenizer"].decode(rows[0]["input_ids"])
    assert re.findall(r"<(\d+\.\d) seconds><\|vision_start\|>", text) == ["0.2", "1.2"]

    model = workflow.load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    collator = workflow.SFTDataCollatorWith4DAttentionMask(
        template=TEMPLATES["vpt_qwen3_vl_nothink"], model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        **tokenizer_module,
    )
    batch = collator(rows)
    batch.pop("vpt_record")
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] and batch["image_grid_thw"].shape == (1, 3)
    assert batch["position_ids"].shape == (4, *batch["input_ids"].shape)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
