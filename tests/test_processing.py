"""VPT_Qwen2VLProcessor: placeholder expansion, image outputs, chat template, padding, errors, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor
from utils import tiny_image, vision_run

from transformers_vpt.models.qwen2_vl_vpt.processing_qwen2_vl_vpt import (
    VPT_CHAT_TEMPLATE,
    VPT_Qwen2VLProcessor,
)
from transformers_vpt.tiny.processor import (
    TINY_DETECTION_IMAGE_SEQLEN,
    TINY_DINO_CROP_SIZE,
    TINY_SAM_IMAGE_SIZE,
    TINY_SEG_IMAGE_SEQLEN,
    build_tiny_processor,
)
from transformers_vpt.tiny.tokenizer import build_tiny_tokenizer
from transformers_vpt.vocabulary import BRANCH_TOKENS, IMAGE_PAD, REENCODE_TRIGGER

torch.set_num_threads(1)

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CLIP_KEYS = ("clip_pixel_values", "clip_images_grid_thw")


@pytest.fixture(scope="module")
def processor() -> VPT_Qwen2VLProcessor:
    return build_tiny_processor()


def pad_counts(processor, input_ids, pad: str) -> list[int]:
    pad_id = processor.tokenizer.convert_tokens_to_ids(pad)
    return [int((torch.as_tensor(row) == pad_id).sum()) for row in input_ids]


# (kind, dataset placeholder, pad token, images-argument name)
KINDS = [
    ("image", "<image>", IMAGE_PAD, "images"),
    ("detection", DET.placeholder, DET.image_pad, DET.images_key),
    ("seg", SEG.placeholder, SEG.image_pad, SEG.images_key),
    ("clip", CLIP.placeholder, CLIP.image_pad, CLIP.images_key),
]
# Three images of different sizes: Qwen2-VL grids (1,4,4), (1,4,8), (1,8,4) -> 4, 8, 8 tokens.
SIZES = [(56, 56), (112, 56), (56, 112)]


def expected_tokens(kind: str) -> list[int]:
    return {
        "image": [4, 8, 8],
        "clip": [4, 8, 8],
        "detection": [TINY_DETECTION_IMAGE_SEQLEN] * 3,
        "seg": [TINY_SEG_IMAGE_SEQLEN] * 3,
    }[kind]


def test_tiny_sizes_match_the_tiny_encoders():
    assert TINY_DETECTION_IMAGE_SEQLEN == 4  # 28x28 crop, patch 14 -> 2x2
    assert TINY_SEG_IMAGE_SEQLEN == 16  # 64x64, patch 16 -> 4x4


def test_num_image_tokens(processor):
    assert processor.num_image_tokens("image", [1, 4, 4]) == 4
    assert processor.num_image_tokens("clip", torch.tensor([1, 4, 8])) == 8
    assert processor.num_image_tokens("video", (2, 4, 4)) == 8
    assert processor.num_image_tokens("detection") == processor.num_image_tokens("dino") == 4
    assert processor.num_image_tokens("seg") == processor.num_image_tokens("sam") == 16
    with pytest.raises(ValueError, match="grid_thw"):
        processor.num_image_tokens("clip")
    with pytest.raises(ValueError, match="Unknown"):
        processor.num_image_tokens("depth")


@pytest.mark.parametrize("kind,placeholder,pad,images_key", KINDS)
@pytest.mark.parametrize("style", ["dataset", "chat"])
def test_expansion_several_images_and_samples(processor, kind, placeholder, pad, images_key, style):
    mark = placeholder if style == "dataset" else vision_run(pad, 1)
    texts = [f"{mark}red {mark}blue", f"What{mark}"]
    images = [tiny_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    out = processor(text=texts, **{images_key: images}, padding=True, return_tensors="pt")

    n = expected_tokens(kind)
    decoded = [t.replace("<|endoftext|>", "") for t in processor.batch_decode(out["input_ids"])]
    assert decoded == [f"{vision_run(pad, n[0])}red {vision_run(pad, n[1])}blue", f"What{vision_run(pad, n[2])}"]
    assert pad_counts(processor, out["input_ids"], pad) == [n[0] + n[1], n[2]]
    for other in {IMAGE_PAD, DET.image_pad, SEG.image_pad, CLIP.image_pad} - {pad}:
        assert pad_counts(processor, out["input_ids"], other) == [0, 0]

    if kind in ("image", "clip"):
        pixels, grid = ("pixel_values", "image_grid_thw") if kind == "image" else CLIP_KEYS
        assert out[grid].tolist() == [[1, 4, 4], [1, 4, 8], [1, 8, 4]]
        assert out[pixels].shape == (16 + 32 + 32, 3 * 2 * 14 * 14)
    elif kind == "detection":
        assert out[images_key].shape == (3, 3, TINY_DINO_CROP_SIZE, TINY_DINO_CROP_SIZE)
    else:
        assert out[images_key].shape == (3, 3, TINY_SAM_IMAGE_SIZE, TINY_SAM_IMAGE_SIZE)


def test_videos_and_mm_token_type_ids(processor):
    videos = [np.zeros((4, 56, 56, 3), np.uint8), np.zeros((2, 56, 112, 3), np.uint8)]  # grids (2,4,4), (1,4,8)
    texts = ["<image><video>a", f"{vision_run('<|video_pad|>', 1)}b"]
    out = processor(
        text=texts,
        images=[tiny_image()],
        videos=videos,
        padding=True,
        return_mm_token_type_ids=True,
        return_tensors="pt",
    )
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 8]]
    assert out["pixel_values_videos"].shape == (32 + 32, 3 * 2 * 14 * 14)
    assert pad_counts(processor, out["input_ids"], "<|video_pad|>") == [8, 8]
    assert out["mm_token_type_ids"].sum(1).tolist() == [4, 0]  # Qwen2-VL marks image tokens only


def test_dataset_and_chat_styles_give_identical_inputs(processor):
    images = {"images": [tiny_image()], "detection_images": [tiny_image(seed=1)], "seg_images": [tiny_image(seed=2)]}
    dataset = "<image>\nWhat colour?<detection_image><seg_image>"
    chat = f"{vision_run(IMAGE_PAD, 1)}\nWhat colour?{vision_run(DET.image_pad, 1)}{vision_run(SEG.image_pad, 1)}"
    a = processor(text=dataset, **images, return_tensors="pt")
    b = processor(text=chat, **images, return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nested_images_equal_flat_images(processor):
    texts = ["<image><detection_image>a", "<detection_image><clip_image><detection_image>b"]
    imgs = [tiny_image(seed=i) for i in range(6)]
    flat = processor(
        text=texts,
        images=[imgs[0]],
        detection_images=imgs[1:4],
        clip_images=[imgs[4]],
        padding=True,
        return_tensors="pt",
    )
    nested = processor(
        text=texts,
        images=[[imgs[0]], []],
        detection_images=[[imgs[1]], imgs[2:4]],
        clip_images=[[], [imgs[4]]],
        padding=True,
        return_tensors="pt",
    )
    assert flat.keys() == nested.keys()
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key


def test_reencoding_sample_layout(processor):
    """The released re-encoding conversation with every output present."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"\nWhat is red?\n{REENCODE_TRIGGER}"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": DET.action_triple}]},
        {"role": "user", "content": [{"type": "detection_image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == (
        f"{SYSTEM}<|im_start|>user\n{vision_run(IMAGE_PAD, 1)}\nWhat is red?\n{REENCODE_TRIGGER}<|im_end|>\n"
        f"<|im_start|>assistant\n{DET.action_triple}<|im_end|>\n"
        f"<|im_start|>user\n{vision_run(DET.image_pad, 1)}<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n"
    )
    out = processor(text=[text], images=[tiny_image()], detection_images=[tiny_image(seed=1)], return_tensors="pt")
    decoded = processor.decode(out["input_ids"][0])
    assert decoded == text.replace(vision_run(IMAGE_PAD, 1), vision_run(IMAGE_PAD, 4)).replace(
        vision_run(DET.image_pad, 1), vision_run(DET.image_pad, TINY_DETECTION_IMAGE_SEQLEN)
    )
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "detection_images"}
    for token in (DET.action_start, DET.action, DET.action_end):
        assert pad_counts(processor, out["input_ids"], token) == [1]


def test_chat_template_all_part_types(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "video"},
                {"type": "detection_image"},
                {"type": "seg_image"},
                {"type": "clip_image"},
                {"type": "text", "text": "What?"},
            ],
        },
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        f"{vision_run(IMAGE_PAD, 1)}{vision_run('<|video_pad|>', 1)}"
        f"{vision_run(DET.image_pad, 1)}{vision_run(SEG.image_pad, 1)}"
        f"{vision_run(CLIP.image_pad, 1)}What?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    vision_id = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], add_vision_id=True
    )
    assert (
        vision_id
        == f"{SYSTEM}<|im_start|>user\nPicture 1: {vision_run(IMAGE_PAD, 1)}"
        f"Picture 2: {vision_run(IMAGE_PAD, 1)}<|im_end|>\n"
    )
    assert processor.chat_template == VPT_CHAT_TEMPLATE


def test_chat_template_tokenize_collects_typed_images(processor):
    image, det, seg = tiny_image(seed=0), tiny_image(seed=1), tiny_image(seed=2)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "detection_image", "image": det},
                {"type": "seg_image", "image": seg},
                {"type": "text", "text": "red"},
            ],
        }
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    text = processor.apply_chat_template(messages)
    ref = processor(text=[text], images=[image], detection_images=[det], seg_images=[seg], return_tensors="pt")
    assert out.keys() == ref.keys()
    for key in ref:
        assert torch.equal(out[key], ref[key]), key


@pytest.mark.parametrize("how", ["kwarg", "tokenizer"])
def test_left_padding(how):
    processor = build_tiny_processor()
    texts = ["<detection_image>What colour is the circle?", "<detection_image>red"]
    kwargs = {"padding_side": "left"} if how == "kwarg" else {}
    if how == "tokenizer":
        processor.tokenizer.padding_side = "left"
    det = [tiny_image(seed=1), tiny_image(seed=2)]
    out = processor(text=texts, detection_images=det, padding=True, return_tensors="pt", **kwargs)
    mask, ids = out["attention_mask"], out["input_ids"]
    assert mask[0].all() and not mask[1].all()
    assert mask[:, -1].all()
    assert (mask[1].cumsum(0) > 0).long().equal(mask[1])  # zeros only on the left
    assert (ids[1][mask[1] == 0] == processor.tokenizer.pad_token_id).all()
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["What colour is the circle?", "red"]


def test_right_padding_is_the_default(processor):
    out = processor(text=["<seg_image>a long text here", "<seg_image>b"], seg_images=[tiny_image()] * 2, padding=True)
    assert out["attention_mask"][1][-1] == 0 and out["attention_mask"][1][0] == 1


@pytest.mark.parametrize(
    "texts,counts,match",
    [
        (["<detection_image>a", "<detection_image>b"], {"detection_images": 1}, r"Sample 1 .*<detection_image>"),
        (["<seg_image>a", "b"], {"seg_images": 2}, r"2 seg input\(s\) given .*<seg_image>.*\[1, 0\]"),
        (["<clip_image>a", "<clip_image>b"], {"clip_images": [1, 0]}, r"Sample 1 has 1 <clip_image> .* 0 clip"),
        (["a", f"{vision_run(IMAGE_PAD, 1)}b"], {}, r"Sample 1 .*<image>"),
        (["<image>a"], {"images": [1, 1]}, r"nested for 2 samples, but there are 1 texts"),
    ],
)
def test_count_mismatch_names_sample_and_kind(processor, texts, counts, match):
    """``counts``: an int gives a flat list of that many images, a list gives images nested per sample."""
    image = tiny_image()
    kwargs = {
        key: [[image] * n for n in count] if isinstance(count, list) else [image] * count
        for key, count in counts.items()
    }
    with pytest.raises(ValueError, match=match):
        processor(text=texts, **kwargs)


def test_missing_branch_token_is_an_error():
    processor = build_tiny_processor(tokenizer=build_tiny_tokenizer(vision_encoder_ls=["clip"]))
    with pytest.raises(ValueError, match=r"Sample 0 .*<\|seg_image_pad\|>.*add_vpt_tokens"):
        processor(text="<seg_image>", seg_images=[tiny_image()])
    assert processor.pad_token_id("sam") is None
    assert processor.pad_token_id("clip") == processor.tokenizer.convert_tokens_to_ids(CLIP.image_pad)


def test_truncation_that_cuts_pads_is_an_error(processor):
    with pytest.raises(ValueError, match="truncation"):
        processor(text="hello <seg_image>", seg_images=[tiny_image()], truncation=True, max_length=8)


def test_text_is_required(processor):
    with pytest.raises(ValueError, match="text"):
        processor(images=[tiny_image()])


def test_preprocess_extra_images(processor):
    images = [tiny_image(seed=1), tiny_image(80, 40, seed=2)]
    det = processor.preprocess_extra_images("dino", images)
    assert set(det) == {"detection_images"} and det["detection_images"].shape == (2, 3, 28, 28)
    seg = processor.preprocess_extra_images("seg", images)
    assert set(seg) == {"seg_images"} and seg["seg_images"].shape == (2, 3, 64, 64)
    assert (seg["seg_images"][1, :, 32:, :] == 0).all()  # 80x40 resized to 64x32, padded at the bottom
    clip = processor.preprocess_extra_images("clip", images)
    direct = processor.image_processor(images=images, return_tensors="pt")
    assert torch.equal(clip["clip_pixel_values"], direct["pixel_values"])
    assert torch.equal(clip["clip_images_grid_thw"], direct["image_grid_thw"])
    with pytest.raises(ValueError, match="re-encoding"):
        processor.preprocess_extra_images("image", images)


def test_expand_placeholders_per_message(processor):
    """How a LLaMA-Factory plugin uses it: one text per message, inputs consumed across messages."""
    clip = processor.preprocess_extra_images("clip", [tiny_image(112, 56)])
    messages = ["<image>\nWhat?", CLIP.action_triple, "<clip_image>", "red"]
    expanded = processor.expand_placeholders(
        messages, image_grid_thw=[[1, 4, 4]], clip_grid_thw=clip["clip_images_grid_thw"]
    )
    assert expanded == [f"{vision_run(IMAGE_PAD, 4)}\nWhat?", CLIP.action_triple, vision_run(CLIP.image_pad, 8), "red"]
    seg_twice = processor.expand_placeholders("<seg_image><seg_image>", num_seg_images=2)
    assert seg_twice == [vision_run(SEG.image_pad, 16) * 2]


def test_default_preprocessing_is_the_released_one(processor):
    released = VPT_Qwen2VLProcessor(processor.image_processor, processor.tokenizer, processor.video_processor)
    assert released.detection_image_seqlen == released.seg_image_seqlen == 256
    out = released(
        text="<detection_image><seg_image>",
        detection_images=[tiny_image(300, 200)],
        seg_images=[tiny_image(300, 200)],
        return_tensors="pt",
    )
    assert out["detection_images"].shape == (1, 3, 224, 224)
    assert out["seg_images"].shape == (1, 3, 1024, 1024)
    assert pad_counts(released, out["input_ids"], DET.image_pad) == [256]
    assert pad_counts(released, out["input_ids"], SEG.image_pad) == [256]


def test_model_input_names(processor):
    names = processor.model_input_names
    for key in ("input_ids", "pixel_values", "image_grid_thw", "detection_images", "seg_images", *CLIP_KEYS):
        assert key in names


def _all_kinds_inputs(processor):
    texts = ["<image>a<detection_image><clip_image>", "<seg_image>b<image>"]
    return processor(
        text=texts,
        images=[tiny_image(seed=0), tiny_image(112, 56, seed=1)],
        detection_images=[tiny_image(seed=2)],
        seg_images=[tiny_image(seed=3)],
        clip_images=[tiny_image(seed=4)],
        padding=True,
        return_tensors="pt",
    )


def _assert_same_processor(a, b):
    assert type(b) is VPT_Qwen2VLProcessor
    for attr in ("detection_processor_config", "seg_processor_config", "detection_image_seqlen", "seg_image_seqlen"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert b.chat_template == a.chat_template
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    assert b.detection_processor.to_dict() == a.detection_processor.to_dict()
    assert b.seg_processor.to_dict() == a.seg_processor.to_dict()
    x, y = _all_kinds_inputs(a), _all_kinds_inputs(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "VPT_Qwen2VLProcessor"
    assert saved["detection_processor_config"] == processor.detection_processor_config
    assert saved["seg_image_seqlen"] == TINY_SEG_IMAGE_SEQLEN
    _assert_same_processor(processor, VPT_Qwen2VLProcessor.from_pretrained(tmp_path))


def test_auto_processor_round_trip(processor, tmp_path):
    import transformers_vpt  # noqa: F401  (registers the VPT classes with the Auto classes)

    processor.save_pretrained(tmp_path)
    _assert_same_processor(processor, AutoProcessor.from_pretrained(tmp_path))
