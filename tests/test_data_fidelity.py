"""The released image rule and image processor in inference: token counts computed here from the rule itself."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorFast,
    Qwen2VLVideoProcessor,
)

from transformers_vpt import VPT_Qwen2VLProcessor
from transformers_vpt.images import fit_image
from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.tiny.sources import make_tiny
from transformers_vpt.tiny.tokenizer import build_tiny_tokenizer
from transformers_vpt.vocabulary import BRANCH_TOKENS, IMAGE_PAD

# Qwen2-VL-2B/7B-Instruct's image processor settings.
REAL = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def released_tokens(width: int, height: int, resolution: int = 512) -> tuple[int, int]:
    """(image tokens, merged grid h * w) of the released pipeline, written out from the rule: long side capped at
    ``resolution`` (sides truncated), sides under 28 stretched to 28, then Qwen2-VL's smart resize."""
    if max(width, height) > resolution:
        scale = resolution / max(width, height)
        width, height = int(width * scale), int(height * scale)
    width, height = max(width, 28), max(height, 28)
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > REAL["max_pixels"]:
        beta = math.sqrt(height * width / REAL["max_pixels"])
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h * w < REAL["min_pixels"]:
        beta = math.sqrt(REAL["min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return (h // 28) * (w // 28), (h // 14, w // 14)


SIZES = [(1100, 700), (600, 300), (500, 400), (25, 15)]


def make_processor(image_processor, **kwargs) -> VPT_Qwen2VLProcessor:
    return VPT_Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**REAL),
        **kwargs,
    )


def test_the_rule_written_out():
    assert [released_tokens(*size)[0] for size in SIZES] == [216, 162, 252, 4]


class RecordingModel(torch.nn.Module):
    """Stands in for the model: records what `generate` gets and generates nothing."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vision_encoder_ls=["dino", "sam", "clip"])
        self.generation_config = SimpleNamespace(do_sample=False)
        self.device = torch.device("cpu")
        self.calls = []

    def generate(self, **inputs):
        self.calls.append(inputs)
        return inputs["input_ids"]


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_pipeline_inputs_follow_the_released_rule(size):
    processor = make_processor(Qwen2VLImageProcessor(**REAL))
    model = RecordingModel()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    VPTPipeline(model, processor)([image], ["Q?"], mode="free")
    (inputs,) = model.calls
    tokens, grid = released_tokens(*size)
    assert inputs["input_ids"][0].tolist().count(processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)) == tokens
    assert inputs["image_grid_thw"].tolist() == [[1, *grid]]


def test_fit_image_edges():
    assert fit_image(Image.new("RGB", (1100, 700))).size == (512, 325)
    assert fit_image(Image.new("RGB", (25, 15))).size == (28, 28)
    assert fit_image(Image.new("RGB", (300, 10)), None).size == (300, 28)
    assert fit_image(Image.new("RGB", (9000, 30)), None).size == (30 * 180, 30)


def test_the_slow_image_processor_is_the_default():
    fast = Qwen2VLImageProcessorFast(**REAL)
    processor = make_processor(fast)
    assert type(processor.image_processor) is Qwen2VLImageProcessor
    assert processor.image_processor.max_pixels == REAL["max_pixels"]
    kept = make_processor(fast, fast_image_processor=True)
    assert kept.image_processor is fast
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 600, 3), dtype=np.uint8))
    slow_pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    fast_pixels = fast(images=[image], return_tensors="pt")["pixel_values"]
    # what the switch is about: about one grey level on a few pixels
    assert 0 < (slow_pixels - fast_pixels).abs().max() <= 0.031


def test_training_data_follows_the_released_rule(tmp_path):
    """The tokenised dataset of `llamafactory-cli`'s own data path has the released counts (and the inference ones)."""
    import llamafactory_patches

    llamafactory_patches.apply()
    from llamafactory.train.test_utils import load_dataset_module

    tiny = make_tiny(tmp_path / "tiny", data=False)
    dino = BRANCH_TOKENS["dino"]
    real = make_processor(Qwen2VLImageProcessor(**REAL))
    checkpoint = VPT_Qwen2VLProcessor.from_pretrained(tiny["model"])
    checkpoint.image_processor = real.image_processor
    checkpoint.save_pretrained(tiny["model"])
    rng = np.random.default_rng(0)
    paths = []
    for width, height in SIZES[:3] + [(60, 40)]:
        path = tmp_path / f"image_{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    paths[3] += "_0,0,25,15"  # the 25x15 crop
    records = [
        {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A."}], "images": [p]}
        for p in paths
    ]
    span = "<|region_token_start|><|x_1|><|y_2|><|x_3|><|y_4|><|region_token_end|>"
    region_turns = [("user", "<image>Q?"), ("assistant", span), ("user", "<image>"), ("assistant", "A.")]
    action_turns = [("user", "<image>Q?"), ("assistant", dino.action_triple), ("user", dino.placeholder), ("assistant", "A.")]
    records.append({"messages": [{"role": r, "content": c} for r, c in region_turns], "images": paths[2:4]})
    records.append(
        {"messages": [{"role": r, "content": c} for r, c in action_turns], "images": paths[:1], "detection_images": paths[:1]}
    )
    (tmp_path / "fidelity.json").write_text(json.dumps(records))
    columns = {"messages": "messages", "images": "images", "detection_images": "detection_images"}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {"fidelity": {"file_name": "fidelity.json", "formatting": "sharegpt", "columns": columns, "tags": tags}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    args = dict(
        model_name_or_path=str(tiny["model"]),
        stage="sft",
        do_train=True,
        finetuning_type="full",
        dataset="fidelity",
        dataset_dir=str(tmp_path),
        template="vpt_qwen2_vl",
        cutoff_len=4096,
        overwrite_cache=True,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        report_to="none",
        image_max_pixels=12544,  # LLaMA-Factory's own area rule: the VPT rule wins
    )
    rows = load_dataset_module(**args)["train_dataset"]
    tokenizer = real.tokenizer
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    counts = [released_tokens(*size)[0] for size in SIZES]
    assert [list(row["input_ids"]).count(pad) for row in rows] == counts + [counts[2] + counts[3], counts[0]]

    # the released labels: `{content}<|im_end|>` per assistant turn; the newline after it opens the next prompt
    def labelled_runs(row) -> list[str]:
        runs, current = [], []
        for token, label in zip(row["input_ids"], row["labels"]):
            if label == -100 and current:
                runs.append(tokenizer.decode(current))
                current = []
            elif label != -100:
                current.append(token)
        return runs + ([tokenizer.decode(current)] if current else [])

    im_end = "<|im_end|>"
    assert labelled_runs(rows[4]) == [span + im_end, "A." + im_end]
    assert labelled_runs(rows[5]) == [dino.action_start, dino.action_end + im_end, "A." + im_end]  # action masked
    text = tokenizer.decode(rows[4]["input_ids"])
    assert text.endswith("A." + im_end) and f"{span}{im_end}\n<|im_start|>user\n" in text

    # the collator's batch has the same grids (the VPT rule, not image_max_pixels)
    from llamafactory.hparams import get_train_args
    from llamafactory.train.sft import workflow

    model_args, data_args, _, finetuning_args, _ = get_train_args(args)
    tokenizer_module = workflow.load_tokenizer(model_args)
    template = workflow.get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    model = workflow.load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=False)
    collator = workflow.SFTDataCollatorWith4DAttentionMask(template=template, model=model, **tokenizer_module)
    batch = collator([dict(row) for row in list(rows)[:4]])
    assert [int(t * h * w) // 4 for t, h, w in batch["image_grid_thw"].tolist()] == counts


def test_encoder_inputs_are_capped_in_training():
    """DINOv2 inputs are capped at 512 and SAM inputs at 1024 on the long side before their processors."""
    import llamafactory_patches

    llamafactory_patches.apply()
    from llamafactory.data.template import TEMPLATES

    plugin = TEMPLATES["vpt_qwen2_vl"].mm_plugin
    processor = SimpleNamespace(image_resolution=512)
    big = Image.new("RGB", (2200, 1100))
    assert [i.size for i in plugin._load_extra_images("detection", [big], processor)] == [(512, 256)]
    assert [i.size for i in plugin._load_extra_images("seg", [big], processor)] == [(1024, 512)]
    assert [i.size for i in plugin._load_extra_images("clip", [big], processor)] == [(512, 256)]
