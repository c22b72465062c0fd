"""The LLaMA-Factory patches in-process on a tiny VPT checkpoint: arguments, data, labels, batches, model loading."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
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
        kind = next((key for key in ("detection_images", "seg_images", "clip_images") if unpack_paths(row[key])), "plain")
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
