"""Helpers shared by the test files: ``from utils import ...`` (``tests`` is on pytest's pythonpath).

Fixtures live in conftest.py; everything here is plain code. Sections: hand-built token sequences for the model
tests, generation helpers, scripted two-round inference, evaluation data, a fake OpenAI-compatible judge server,
LLaMA-Factory run arguments.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.models.vpt.modeling_vpt import BRANCH_MODULES
from transformers_vpt.pipeline import VPTPipeline, build_user_text, cap_image
from transformers_vpt.regions import box_to_region_text
from transformers_vpt.tiny.model import TINY_BASES, TINY_DINO_TOKENS, TINY_SAM_TOKENS, tiny_config
from transformers_vpt.tiny.tokenizer import TINY_BPE_VOCAB_SIZE
from transformers_vpt.vocabulary import BRANCH_TOKENS, REENCODE_TRIGGER, REGION_TRIGGER
from transformers_vpt.vocabulary import IM_END as IM_END_TEXT
from transformers_vpt.vocabulary import IM_START as IM_START_TEXT
from transformers_vpt.vocabulary import VISION_END as VISION_END_TEXT
from transformers_vpt.vocabulary import VISION_START as VISION_START_TEXT

ROOT = Path(__file__).resolve().parents[1]

# --- hand-built token sequences -------------------------------------------------------------------------------------

# Token ids of the hand-built sequences (the tiny vocabulary has 384 rows).
PAD, IMAGE, VIDEO, VSTART, VEND, IM_START, IM_END, NEWLINE = 299, 300, 301, 302, 303, 340, 341, 10
PREFIX = {"dino": "detection", "sam": "seg", "clip": "clip"}
BRANCH_IDS = {"dino": 310, "sam": 320, "clip": 330}
"""A branch's image pad, action start, action and action end are its id + 0, 1, 2, 3."""
TOKEN_IDS = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": VSTART}
TOKEN_IDS |= {"vision_end_token_id": VEND, "para_start_id": IM_START, "para_end_id": IM_END, "pad_token_id": PAD}
TOKEN_IDS |= {
    f"{PREFIX[kind]}_{field}": first + offset
    for kind, first in BRANCH_IDS.items()
    for offset, field in enumerate(("image_token_id", "action_start_id", "action_id"))
}
ACTION_END = {kind: first + 3 for kind, first in BRANCH_IDS.items()}
CLIP_GRID = [1, 4, 4]  # 16 patches -> 4 merged tokens
IMAGE_GRID = [1, 4, 4]
PATCH_DIM = 3 * 2 * 14 * 14


BASES = tuple(TINY_BASES)
"""The Qwen-VL bases the model tests run on: every base with a tiny config (`transformers_vpt.tiny.model`)."""


def make_model(vision_encoder_ls=("dino", "sam", "clip"), seed=0, base="qwen2_vl", **overrides):
    """A tiny VPT model of ``base`` (eval mode) whose token ids are `TOKEN_IDS`."""
    torch.manual_seed(seed)
    config = tiny_config(vision_encoder_ls, token_ids=TOKEN_IDS, base=base, **overrides)
    return AutoModelForImageTextToText.from_config(config).eval()


def stock_twin(model, base: str):
    """The stock model of ``base`` (`VPT_BASES`) holding the VPT model's text and vision weights (branches left
    out), in eval mode."""
    stock_class = VPT_BASES[base].stock_model_class
    stock_config = stock_class.config_class(**{
        key: value for key, value in model.config.to_dict().items()
        if key not in ("model_type", "architectures", "detection_config", "seg_config")
    })
    stock = stock_class(stock_config).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.removeprefix("model.").startswith(BRANCH_MODULES) for key in unexpected)
    return stock


def turn(role_token: int, body: list[int]) -> list[int]:
    return [IM_START, role_token, *body, IM_END, NEWLINE]


def image_run(pad: int, count: int) -> list[int]:
    return [VSTART, *([pad] * count), VEND]


class Sample:
    """Token ids plus the images of one sample, in the released conversation layout."""

    def __init__(self, kind: str, question=(50, 51), answer=(60, 61), extra_images=1, system=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.randn(IMAGE_GRID[1] * IMAGE_GRID[2], PATCH_DIM, generator=g)]
        self.extra = {"dino": [], "sam": [], "clip": []}
        ids = turn(20, [30]) if system else []
        ids += turn(21, [*image_run(IMAGE, 4), *question])
        if kind in PREFIX:
            start, action = TOKEN_IDS[f"{PREFIX[kind]}_action_start_id"], TOKEN_IDS[f"{PREFIX[kind]}_action_id"]
            pad = TOKEN_IDS[f"{PREFIX[kind]}_image_token_id"]
            for _ in range(extra_images):
                ids += turn(22, [start, action, ACTION_END[kind]])
                count = {"dino": TINY_DINO_TOKENS, "sam": TINY_SAM_TOKENS, "clip": 4}[kind]
                ids += turn(21, image_run(pad, count))
                self.extra[kind].append(
                    torch.randn(3, 28, 28, generator=g) if kind == "dino"
                    else torch.randn(3, 64, 64, generator=g) if kind == "sam"
                    else torch.randn(16, PATCH_DIM, generator=g)
                )
        elif kind == "region":
            ids += turn(22, [70, 71, 72])
            ids += turn(21, image_run(IMAGE, 4))
            self.images.append(torch.randn(16, PATCH_DIM, generator=g))
        ids += [IM_START, 22, *answer, IM_END]
        self.ids = ids


def collate(samples: list[Sample], padding_side="right") -> dict:
    """Pad and stack samples into model inputs; labels cover every non-pad token."""
    length = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), length), PAD)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, cols] = torch.tensor(sample.ids)
        attention_mask[row, cols] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    images = [img for s in samples for img in s.images]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.cat(images),
        "image_grid_thw": torch.tensor([IMAGE_GRID] * len(images)),
    }
    dino = [img for s in samples for img in s.extra["dino"]]
    sam = [img for s in samples for img in s.extra["sam"]]
    clip = [img for s in samples for img in s.extra["clip"]]
    if dino:
        batch["detection_images"] = torch.stack(dino)
    if sam:
        batch["seg_images"] = torch.stack(sam)
    if clip:
        batch["clip_pixel_values"] = torch.cat(clip)
        batch["clip_images_grid_thw"] = torch.tensor([CLIP_GRID] * len(clip))
    return batch


# --- generation -----------------------------------------------------------------------------------------------------


@contextmanager
def recorded_calls(modules: dict[str, torch.nn.Module], backward: bool = False):
    """Record, in order, the names of the ``modules`` whose forward runs inside the block, and with ``backward``
    those whose backward runs: yields ``(forward, backward)`` lists filled as they run.

    A module's backward is recorded when the gradient of its (first) output tensor arrives, through an identity
    autograd function on that output, as DeepSpeed ZeRO-3 hooks modules (PyTorch's full backward hooks return views,
    which Qwen3-VL's in-place DeepStack addition may not modify)."""
    forward_calls, backward_calls, handles = [], [], []

    def hook(module, args, output, name):
        forward_calls.append(name)
        if not backward:
            return None
        if isinstance(output, torch.Tensor):
            return _RecordBackward.apply(output, backward_calls, name) if output.requires_grad else None
        if isinstance(output, tuple) and not hasattr(output, "keys"):
            for i, item in enumerate(output):
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    return (*output[:i], _RecordBackward.apply(item, backward_calls, name), *output[i + 1 :])
        return None  # modules returning ModelOutput objects get no backward record; their layers do

    for name, module in modules.items():
        handles.append(module.register_forward_hook(lambda *hook_args, name=name: hook(*hook_args, name)))
    try:
        yield forward_calls, backward_calls
    finally:
        for handle in handles:
            handle.remove()


class _RecordBackward(torch.autograd.Function):
    """The identity (a copy, not a view), which records ``name`` when its gradient passes."""

    @staticmethod
    def forward(ctx, tensor, calls, name):
        ctx.calls, ctx.name = calls, name
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.calls.append(ctx.name)
        return grad, None, None


def spy_generate(pipeline, monkeypatch) -> list[tuple[dict, torch.Tensor]]:
    """Every ``pipeline.model.generate`` call of the test, as it happens: ``(kwargs, output)``."""
    calls = []
    generate = pipeline.model.generate

    def spy(**kwargs):
        output = generate(**kwargs)
        calls.append((kwargs, output))
        return output

    monkeypatch.setattr(pipeline.model, "generate", spy)
    return calls


# --- scripted two-round inference -----------------------------------------------------------------------------------

MAX_SIDE = 64
SYSTEM = f"{IM_START_TEXT}system\nYou are a helpful assistant.{IM_END_TEXT}\n"
# On a 640x480 image one cell is 80x60 pixels; boxes widen the cell bounds by one cell and clamp to the grid.
SPAN_A = box_to_region_text((2, 3, 5, 4))  # cells x 1..6, y 2..5
SPAN_B = box_to_region_text((0, 0, 0, 0))  # cells x 0..1, y 0..1
SPAN_C = box_to_region_text((6, 6, 7, 7))  # cells x 5..7, y 5..7
BOX_A, BOX_B, BOX_C = (80, 120, 560, 360), (0, 0, 160, 120), (400, 300, 640, 480)


class Scripted(LogitsProcessor):
    """Round 1 (a single user turn) emits the script of the row's question, then EOS. Round 2 decodes greedily over
    plain-text tokens for a few steps, then EOS, so its answer depends on everything the model got in round 2."""

    def __init__(self, tokenizer, scripts: dict[str, str], answer_tokens: int = 3):
        self.tokenizer = tokenizer
        self.scripts = {q: tokenizer.encode(text) + [tokenizer.eos_token_id] for q, text in scripts.items()}
        self.answer_tokens = answer_tokens
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START_TEXT)
        self.user_turn = tokenizer.encode(f"{IM_START_TEXT}user")
        self.header = len(tokenizer.encode(f"{IM_START_TEXT}assistant\n"))

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(input_ids.tolist()):
            starts = [i for i, t in enumerate(ids) if t == self.im_start]
            generated = len(ids) - starts[-1] - self.header
            user_turns = sum(ids[i : i + len(self.user_turn)] == self.user_turn for i in starts)
            if user_turns == 1:  # round 1 (with or without a system turn: Qwen3-VL's template has none)
                prompt = self.tokenizer.decode(ids)
                script = next(s for q, s in self.scripts.items() if q in prompt)
                out[row, script[min(generated, len(script) - 1)]] = 0.0
            elif generated < self.answer_tokens:
                out[row, :TINY_BPE_VOCAB_SIZE] = scores[row, :TINY_BPE_VOCAB_SIZE]
            else:
                out[row, self.tokenizer.eos_token_id] = 0.0
        return out


def tiny_image(width: int = 56, height: int = 56, seed: int = 0) -> Image.Image:
    """A random RGB image at the tiny processors' sizes (56 px: a (1, 4, 4) grid)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_videos() -> list[np.ndarray]:
    """Two videos: 4 frames of 56x56 -> grid (2, 4, 4), 2 frames of 56x112 -> grid (1, 4, 8)."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), rng.integers(0, 256, (2, 56, 112, 3), dtype=np.uint8)]


def vision_run(pad: str, n: int) -> str:
    """``<|vision_start|>`` + ``n`` pads + ``<|vision_end|>``, as text."""
    return VISION_START_TEXT + pad * n + VISION_END_TEXT


def assert_same_outputs(a, b, ordered_keys: bool = True) -> None:
    """Two processor outputs hold the same keys (in the same order unless ``ordered_keys`` is False), equal values."""
    assert (list(a.keys()) == list(b.keys())) if ordered_keys else (sorted(a.keys()) == sorted(b.keys()))
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def make_image(seed=0, size=(640, 480)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def scripted(processor, scripts: dict[str, str]) -> dict:
    """Generation overrides that play ``scripts`` (a key found in the question -> round-1 text, see `Scripted`)."""
    return {"logits_processor": LogitsProcessorList([Scripted(processor.tokenizer, scripts)])}


def scripted_kwargs(processor, scripts: dict[str, str]) -> dict:
    """`scripted` with a token limit: a pipeline call's ``generation_kwargs``."""
    return {**scripted(processor, scripts), "max_new_tokens": 32}


def script_pipeline_runs(monkeypatch, scripts: dict[str, str]) -> None:
    """Make every `VPTPipeline.run` of the test (vpt-cli's included) play ``scripts``."""
    run = VPTPipeline.run

    def scripted_run(self, user_texts, images, **kwargs):
        kwargs["generation_kwargs"] = scripted_kwargs(self.processor, scripts)
        return run(self, user_texts, images, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", scripted_run)


def expected_round2(question: str, round1: str, action: str, boxes, image):
    """The round-2 prompt and processor inputs of the released protocol."""
    shown = cap_image(image, MAX_SIDE)
    if action == "region":
        assistant = round1
        user = "<image>" if len(boxes) == 1 else "".join(f"Region {i}: <image>\n" for i in range(len(boxes)))
        images, extra = [shown] + [cap_image(image.crop(box), MAX_SIDE) for box in boxes], {}
    else:
        branch = BRANCH_TOKENS[action]
        assistant, user, images = branch.action_triple, branch.placeholder, [shown]
        # DINOv2 images are capped at 512, SAM at 1024 (released preprocessing); CLIP re-encodes the round-1 image.
        reencoded = {"dino": cap_image(image, 512), "sam": image, "clip": shown}[action]
        extra = {branch.images_key: [reencoded]}
    prompt = (
        f"{SYSTEM}{IM_START_TEXT}user\n{build_user_text(question)}{IM_END_TEXT}\n{IM_START_TEXT}assistant\n"
        f"{assistant}{IM_END_TEXT}\n{IM_START_TEXT}user\n{user}{IM_END_TEXT}\n{IM_START_TEXT}assistant\n"
    )
    return prompt, dict(images=[images], **{key: [value] for key, value in extra.items()})


# --- evaluation data --------------------------------------------------------------------------------------------


def record(turns: list[str], images: list[str], **extra) -> dict:
    """A released-format record: alternating user/assistant ``turns``, ``images`` and the extra-image lists."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages, "images": images, "detection_images": [], "seg_images": [], "clip_images": []} | extra


def region_record(question: str, answer: str, image: str) -> dict:
    messages = [f"<image>\n{question} \n{REGION_TRIGGER}", SPAN_A, "<image>", answer]
    return record(messages, [image, image + "_0,0,48,36"])


def action_record(question: str, answer: str, image: str) -> dict:
    dino = BRANCH_TOKENS["dino"]
    messages = [f"<image>\n{question}\n{REENCODE_TRIGGER}", dino.action_triple, dino.placeholder, answer]
    return record(messages, [image], detection_images=[image])


def draw(path: Path, k: int) -> None:
    """A small image, different for each ``k``."""
    image = Image.new("RGB", (96 + 8 * (k % 3), 72), "white")
    ImageDraw.Draw(image).rectangle((10 + k, 10, 50, 40), fill=(200, 30 * (k % 8), 40))
    image.save(path)


def eval_config(data_dir, output_dir, *models, extra=()):
    """The evaluation's `EvalConfig` for a greedy CPU run of ``models`` on ``data_dir``."""
    from transformers_vpt.evaluation import evaluation as ev

    argv = ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--device", "cpu", "--max-image-side", "64"]
    for model in models:
        argv += ["--model", str(model)]
    return ev.parse_config(argv + ["--greedy", "--max-new-tokens", "32", "--batch-size", "4", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def load(path: Path):
    return json.loads(path.read_text())


# --- a fake OpenAI-compatible judge ---------------------------------------------------------------------------------

SUCCESS = (200, "score: 1")


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 that records every request; ``script`` returns ``(status, reply)``
    per request body.

    ``reply`` is the assistant message content for status 200 (bytes are sent as the raw body instead). Use it as
    a context manager (``with FakeOpenAI(script) as server:``), or `start` and `close` it.
    """

    def __init__(self, script=None):
        self.requests = []
        self.script = script or (lambda body: SUCCESS)
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> Self:
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def sequence(self, *responses):
        """Answer requests with ``responses`` in order, repeating the last one."""
        queue = list(responses)
        self.script = lambda body: queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    status, reply = fake.script(body)
                time.sleep(fake.delay)
                with fake.lock:
                    fake.in_flight -= 1
                if isinstance(reply, bytes):
                    payload = reply
                elif status == 200:
                    message = {"role": "assistant", "content": reply}
                    payload = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
                else:
                    payload = json.dumps({"error": {"message": reply}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        return Handler


# --- LLaMA-Factory runs ---------------------------------------------------------------------------------------------

VPT_DATASETS = "synthetic_vpt_dino_train,synthetic_vpt_sam_train,synthetic_vpt_clip_train"


def train_args(tiny, tmp_path, **overrides) -> dict:
    """Arguments of a full two-pass tuning run on `make_tiny`'s checkpoint and data (``tiny``: its directories)."""
    return {
        "model_name_or_path": str(tiny["model"]),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": VPT_DATASETS,
        "dataset_dir": str(tiny["data"]),
        "template": "vpt_qwen2_vl",
        "cutoff_len": 1024,
        "overwrite_cache": True,
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "image_max_pixels": 12544,
        "num_inner_forward_run": 2,
        **overrides,
    }
