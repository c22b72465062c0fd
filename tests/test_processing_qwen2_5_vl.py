"""VPT_Qwen2_5_VLProcessor: the shared VPT processor layer on Qwen2.5-VL's processor.

It must give exactly the Qwen2-VL VPT processor's inputs (placeholders, literal text, extra images, chat template,
errors), save and load itself, keep what Qwen2.5-VL's own processor adds for videos (``second_per_grid_ts``), and the
VPT vocabulary must go onto a Qwen2.5-VL tokenizer.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorFast,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import (
    Qwen2_5_VLImagesKwargs,
    Qwen2_5_VLProcessorKwargs,
    Qwen2_5_VLVideosProcessorKwargs,
)
from transformers.processing_utils import ProcessingKwargs
from utils import assert_same_outputs, tiny_image, tiny_videos, vision_run

from transformers_vpt.models.qwen2_5_vl_vpt.processing_qwen2_5_vl_vpt import (
    VPT_Qwen2_5_VLProcessor,
    VPT_Qwen2_5_VLProcessorKwargs,
)
from transformers_vpt.models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_CHAT_TEMPLATE
from transformers_vpt.models.vpt.processing_vpt import VPTProcessorMixin
from transformers_vpt.tiny.processor import (
    TINY_DETECTION_IMAGE_SEQLEN,
    TINY_DETECTION_PROCESSOR_CONFIG,
    TINY_MAX_PIXELS,
    TINY_MERGE_SIZE,
    TINY_MIN_PIXELS,
    TINY_PATCH_SIZE,
    TINY_SEG_IMAGE_SEQLEN,
    TINY_SEG_PROCESSOR_CONFIG,
    TINY_TEMPORAL_PATCH_SIZE,
    build_tiny_processor,
)
from transformers_vpt.tiny.tokenizer import (
    QWEN2_PATTERN,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
    qwen2_vl_tokenizer_from_backend,
)
from transformers_vpt.vocabulary import (
    BRANCH_TOKENS,
    IMAGE_PAD,
    REGION_START,
    VIDEO_PAD,
    add_vpt_tokens,
    literal_text,
    vpt_tokens,
    x_token,
    y_token,
)

torch.set_num_threads(1)

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]

QWEN2_5_EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
"""The normal (not special) tokens Qwen2.5-VL's tokenizer has after Qwen2-VL's 14 special ones (151657-151664)."""


def qwen_kwargs() -> dict:
    """Tiny Qwen2-VL image / video processor sizes (Qwen2.5-VL uses the same classes): 56 px -> grid (1, 4, 4)."""
    return {
        "size": {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        "patch_size": TINY_PATCH_SIZE,
        "temporal_patch_size": TINY_TEMPORAL_PATCH_SIZE,
        "merge_size": TINY_MERGE_SIZE,
    }


def build_tiny_qwen2_5_vl_processor(tokenizer=None, image_processor=None, **kwargs) -> VPT_Qwen2_5_VLProcessor:
    return VPT_Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**qwen_kwargs()) if image_processor is None else image_processor,
        tokenizer=build_tiny_tokenizer() if tokenizer is None else tokenizer,
        video_processor=Qwen2VLVideoProcessor(**qwen_kwargs()),
        detection_processor_config=TINY_DETECTION_PROCESSOR_CONFIG,
        seg_processor_config=TINY_SEG_PROCESSOR_CONFIG,
        detection_image_seqlen=TINY_DETECTION_IMAGE_SEQLEN,
        seg_image_seqlen=TINY_SEG_IMAGE_SEQLEN,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer) -> VPT_Qwen2_5_VLProcessor:
    return build_tiny_qwen2_5_vl_processor(tokenizer)


@pytest.fixture(scope="module")
def qwen2_vl(tokenizer):
    """The Qwen2-VL VPT processor on the same tokenizer and sizes: the reference for everything base-independent."""
    return build_tiny_processor(tokenizer)


# --------------------------------------------------------------------------------------------- the shared layer
def test_the_class_is_the_shared_layer_on_the_base():
    assert VPT_Qwen2_5_VLProcessor.__mro__[1:3] == (VPTProcessorMixin, Qwen2_5_VLProcessor)
    assert VPT_Qwen2_5_VLProcessor.valid_processor_kwargs is VPT_Qwen2_5_VLProcessorKwargs
    # nothing but the kwargs class is the subclass's own
    own = {name for name in vars(VPT_Qwen2_5_VLProcessor) if not name.startswith("__") or name == "__call__"}
    assert own == {"valid_processor_kwargs"}


def _all_kinds(processor, **kwargs):
    texts = [
        f"<image>\nWhat is {literal_text('<image> <|detection_action|> <|x_3|>')}?<detection_image><clip_image>",
        f"{vision_run(SEG.image_pad, 1)}b{vision_run(IMAGE_PAD, 1)} {DET.action_triple}",
    ]
    return processor(
        text=texts,
        images=[[tiny_image(seed=0)], [tiny_image(112, 56, seed=1)]],
        detection_images=[[tiny_image(seed=2)], []],
        seg_images=[tiny_image(seed=3)],
        clip_images=[tiny_image(56, 112, seed=4)],
        padding=True,
        return_tensors="pt",
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"padding_side": "left", "return_mm_token_type_ids": True}, {"images_kwargs": {"max_pixels": 56 * 56}}],
)
def test_same_inputs_as_the_qwen2_vl_processor(processor, qwen2_vl, kwargs):
    """Dataset and chat placeholders, nested and flat image lists, literal text, every extra kind."""
    # a copy for each call: merging the kwargs empties nested modality dicts (transformers' `_merge_kwargs`)
    assert_same_outputs(_all_kinds(processor, **copy.deepcopy(kwargs)), _all_kinds(qwen2_vl, **copy.deepcopy(kwargs)))


def test_the_inputs_themselves(processor):
    out = _all_kinds(processor)
    assert out["detection_images"].shape == (1, 3, 28, 28) and out["seg_images"].shape == (1, 3, 64, 64)
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert out["clip_images_grid_thw"].tolist() == [[1, 8, 4]]
    first, second = (text.replace("<|endoftext|>", "") for text in processor.batch_decode(out["input_ids"]))
    # the literal span stays text: no image slot, no control token
    assert first == (
        f"{vision_run(IMAGE_PAD, 4)}\nWhat is <image> <|detection_action|> <|x_3|>?{vision_run(DET.image_pad, 4)}"
        f"{vision_run(CLIP.image_pad, 8)}"
    )
    assert second == f"{vision_run(SEG.image_pad, 16)}b{vision_run(IMAGE_PAD, 8)} {DET.action_triple}"
    action = processor.tokenizer.convert_tokens_to_ids(DET.action)
    assert (out["input_ids"] == action).sum(1).tolist() == [0, 1]


def test_same_chat_template_and_typed_parts(processor, qwen2_vl):
    image, det, clip = tiny_image(seed=0), tiny_image(seed=1), tiny_image(seed=2)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video"},
                {"type": "detection_image", "image": det},
                {"type": "seg_image"},
                {"type": "clip_image", "image": clip},
                {"type": "text", "text": "What?"},
            ],
        }
    ]
    assert processor.chat_template == VPT_CHAT_TEMPLATE
    assert processor.apply_chat_template(messages) == qwen2_vl.apply_chat_template(messages)
    # tokenized: the parts that carry an image
    messages[0]["content"] = [part for part in messages[0]["content"] if part["type"] not in ("video", "seg_image")]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    reference = qwen2_vl.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same_outputs(out, reference)
    assert {"pixel_values", "detection_images", "clip_pixel_values"} <= set(out)


def test_same_expansion_helpers(processor, qwen2_vl):
    grids = {"image_grid_thw": [[1, 4, 4]], "clip_grid_thw": [[1, 4, 8]], "video_grid_thw": [[2, 4, 4]]}
    texts = ["<image>a<video>", "<clip_image><seg_image><detection_image>"]
    expected = qwen2_vl.expand_placeholders(texts, **grids, num_detection_images=1, num_seg_images=1)
    assert processor.expand_placeholders(texts, **grids, num_detection_images=1, num_seg_images=1) == expected
    assert expected[1] == vision_run(CLIP.image_pad, 8) + vision_run(SEG.image_pad, 16) + vision_run(DET.image_pad, 4)
    for kind, grid in (("image", [1, 4, 8]), ("video", (2, 4, 4)), ("dino", None), ("sam", None)):
        assert processor.num_image_tokens(kind, grid) == qwen2_vl.num_image_tokens(kind, grid)
    images = [tiny_image(seed=1), tiny_image(80, 40, seed=2)]
    for kind in ("detection", "seg", "clip"):
        reference = qwen2_vl.preprocess_extra_images(kind, images)
        assert_same_outputs(processor.preprocess_extra_images(kind, images), reference)


IMAGE = tiny_image()


@pytest.mark.parametrize(
    "texts,kwargs,match",
    [
        (["<detection_image>a", "<detection_image>b"], {"detection_images": [IMAGE]}, r"Sample 1 .*<detection_image>"),
        (["<clip_image>a", "<clip_image>b"], {"clip_images": [[IMAGE], []]}, r"Sample 1 has 1 <clip_image> .* 0 clip"),
        (["hello <seg_image>"], {"seg_images": [IMAGE], "truncation": True, "max_length": 8}, "truncation"),
    ],
)
def test_same_errors(processor, qwen2_vl, texts, kwargs, match):
    for which in (processor, qwen2_vl):
        with pytest.raises(ValueError, match=match):
            which(text=texts, **kwargs)


# ------------------------------------------------------------------------------------------ what Qwen2.5-VL adds
@pytest.mark.parametrize("fps", [None, 1.0, [1.0, 4.0]])
def test_videos_come_out_as_qwen2_5_vl_gives_them(processor, fps):
    """Images and videos: every output of the stock Qwen2_5_VLProcessor, second_per_grid_ts included, identical."""
    stock = Qwen2_5_VLProcessor(processor.image_processor, processor.tokenizer, processor.video_processor)
    texts = [f"{vision_run(IMAGE_PAD, 1)}{vision_run(VIDEO_PAD, 1)}a", f"{vision_run(VIDEO_PAD, 1)}b"]
    kwargs = {
        "images": [tiny_image()],
        "videos": tiny_videos(),
        "padding": True,
        "return_mm_token_type_ids": True,
        "return_tensors": "pt",
        **({} if fps is None else {"fps": fps}),
    }
    ours, reference = processor(text=texts, **kwargs), stock(text=texts, **kwargs)
    assert_same_outputs(ours, reference)
    temporal = processor.video_processor.temporal_patch_size
    per_video = [2.0, 2.0] if fps is None else [fps, fps] if isinstance(fps, float) else fps
    assert ours["second_per_grid_ts"].tolist() == [temporal / f for f in per_video]
    assert ours["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 8]]


def test_videos_with_vpt_inputs_and_dataset_placeholders(processor, qwen2_vl):
    """The VPT inputs only add their own keys; the Qwen2-VL VPT processor has no second_per_grid_ts."""
    texts = ["<video><detection_image>a", "<video><clip_image>b"]
    kwargs = {
        "videos": tiny_videos(),
        "detection_images": [tiny_image(seed=1)],
        "clip_images": [tiny_image(seed=2)],
        "padding": True,
        "fps": [2.0, 0.5],
        "return_tensors": "pt",
    }
    ours, qwen2 = processor(text=texts, **kwargs), qwen2_vl(text=texts, **kwargs)
    assert set(ours) - set(qwen2) == {"second_per_grid_ts"}
    for key in qwen2:
        assert torch.equal(ours[key], qwen2[key]), key
    assert ours["second_per_grid_ts"].tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="length of fps"):
        processor(text=texts, **{**kwargs, "fps": [1.0, 2.0, 3.0]})


def test_qwen2_vl_videos_come_out_as_qwen2_vl_gives_them(qwen2_vl):
    """The same shared video path on the other base: the stock Qwen2VLProcessor's outputs, nothing added."""
    stock = Qwen2VLProcessor(qwen2_vl.image_processor, qwen2_vl.tokenizer, qwen2_vl.video_processor)
    texts = [f"{vision_run(IMAGE_PAD, 1)}{vision_run(VIDEO_PAD, 1)}a", f"{vision_run(VIDEO_PAD, 1)}b"]
    kwargs = {"images": [tiny_image()], "videos": tiny_videos(), "padding": True, "return_tensors": "pt"}
    assert_same_outputs(qwen2_vl(text=texts, **kwargs), stock(text=texts, **kwargs))


def test_model_input_names(processor):
    names = processor.model_input_names
    for key in ("input_ids", "pixel_values", "image_grid_thw", "second_per_grid_ts", "detection_images", "seg_images",
                "clip_pixel_values", "clip_images_grid_thw"):
        assert key in names


def test_kwargs_are_typed_like_qwen2_5_vl(processor, monkeypatch):
    hints = VPT_Qwen2_5_VLProcessorKwargs.__annotations__
    assert set(ProcessingKwargs.__annotations__) <= set(hints)
    assert hints["images_kwargs"] is Qwen2_5_VLImagesKwargs
    assert hints["videos_kwargs"] is Qwen2_5_VLVideosProcessorKwargs
    assert VPT_Qwen2_5_VLProcessorKwargs._defaults == Qwen2_5_VLProcessorKwargs._defaults
    used = []
    merge = processor._merge_kwargs
    monkeypatch.setattr(processor, "_merge_kwargs", lambda cls, **kw: used.append(cls) or merge(cls, **kw))
    processor(text=["<image>hi"], images=[tiny_image()])
    assert used == [VPT_Qwen2_5_VLProcessorKwargs]


def test_a_fast_image_processor_is_replaced_by_the_slow_one(tokenizer):
    fast = Qwen2VLImageProcessorFast(**qwen_kwargs())
    assert type(build_tiny_qwen2_5_vl_processor(tokenizer, fast).image_processor) is Qwen2VLImageProcessor
    assert build_tiny_qwen2_5_vl_processor(tokenizer, fast, fast_image_processor=True).image_processor is fast


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "VPT_Qwen2_5_VLProcessor"
    assert saved["detection_processor_config"] == processor.detection_processor_config
    assert saved["seg_processor_config"] == processor.seg_processor_config
    assert (saved["detection_image_seqlen"], saved["seg_image_seqlen"]) == (4, 16)
    loaded = VPT_Qwen2_5_VLProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VPT_Qwen2_5_VLProcessor
    assert type(loaded.image_processor) is Qwen2VLImageProcessor
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.detection_processor.to_dict() == processor.detection_processor.to_dict()
    assert loaded.seg_processor.to_dict() == processor.seg_processor.to_dict()
    assert_same_outputs(_all_kinds(loaded), _all_kinds(processor))
    texts = ["<video>a", "<video>b"]
    assert_same_outputs(loaded(text=texts, videos=tiny_videos(), padding=True, return_tensors="pt"),
                        processor(text=texts, videos=tiny_videos(), padding=True, return_tensors="pt"))


# ---------------------------------------------------------------------------------------------- the vocabulary
def qwen2_5_vl_tokenizer(backend):
    """A Qwen2.5-VL-layout tokenizer: Qwen2-VL's 14 special tokens, then Qwen2.5's 8 normal ones."""
    tokenizer = qwen2_vl_tokenizer_from_backend(backend)
    tokenizer.add_tokens(list(QWEN2_5_EXTRA_TOKENS), special_tokens=False)
    return tokenizer


def test_add_vpt_tokens_on_a_tiny_qwen2_5_vl_tokenizer(qwen2_vl):
    tokenizer = build_tiny_tokenizer(vision_encoder_ls=(), with_regions=False)
    first_extra = len(tokenizer)
    tokenizer.add_tokens(list(QWEN2_5_EXTRA_TOKENS), special_tokens=False)
    special, normal = vpt_tokens(list(BRANCH_TOKENS))
    assert add_vpt_tokens(tokenizer, vision_encoder_ls=list(BRANCH_TOKENS)) == len(special) + len(normal)
    assert add_vpt_tokens(tokenizer, vision_encoder_ls=list(BRANCH_TOKENS)) == 0  # idempotent
    assert len(tokenizer) <= TINY_VOCAB_SIZE
    reference = qwen2_vl.tokenizer
    # the released order, after the 8 extra tokens
    for token in special + normal:
        assert tokenizer.convert_tokens_to_ids(token) == reference.convert_tokens_to_ids(token) + 8, token
    assert tokenizer.convert_tokens_to_ids(special[0]) == first_extra + 8
    processor = build_tiny_qwen2_5_vl_processor(tokenizer)
    texts = ["<detection_image>a<seg_image><clip_image>", DET.action_triple + "<|x_3|>"]
    kwargs = {"detection_images": [tiny_image()], "seg_images": [tiny_image()], "clip_images": [tiny_image()]}
    ours, reference = processor(text=texts, **kwargs), qwen2_vl(text=texts, **kwargs)
    assert processor.batch_decode(ours["input_ids"]) == qwen2_vl.batch_decode(reference["input_ids"])
    triple = (DET.action_start, DET.action, DET.action_end)
    assert ours["input_ids"][1] == [tokenizer.convert_tokens_to_ids(t) for t in (*triple, x_token(3))]


@pytest.fixture(scope="module")
def qwen_backend():
    """The converted Qwen2 BPE (151,643 ranks, shared by Qwen2-VL and Qwen2.5-VL); converting takes a few seconds."""
    spec = importlib.util.find_spec("dashscope")
    vocab_file = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    return TikTokenConverter(str(vocab_file), pattern=QWEN2_PATTERN, additional_special_tokens=[]).converted()


def test_add_vpt_tokens_on_the_real_qwen2_5_vl_vocabulary(qwen_backend):
    """With Qwen2.5-VL's 22 added tokens (151643-151664) the VPT tokens take the released ids plus 8, all within
    the smaller embedding matrix (3B: 151,936 rows), so no resize is needed."""
    tokenizer = qwen2_5_vl_tokenizer(qwen_backend)
    assert tokenizer.convert_tokens_to_ids(list(QWEN2_5_EXTRA_TOKENS)) == list(range(151657, 151665))
    assert tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD]) == [151655, 151656]
    assert add_vpt_tokens(tokenizer, vision_encoder_ls=["clip"]) == 1 + 18 + 3
    expected = {
        CLIP.image_pad: 151665,
        REGION_START: 151666,
        x_token(0): 151668,
        y_token(0): 151676,
        CLIP.action_start: 151684,
        CLIP.action: 151685,
        CLIP.action_end: 151686,
    }
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    assert len(tokenizer) == 151687  # below the 3B's (and 7B's) embedding rows, 151,936 (152,064)
