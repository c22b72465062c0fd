"""The rules of a VPT dataset record, in one place: `scripts/prepare_data.py` reports every record that breaks
them, and training (`llamafactory_patches.records`) refuses such a record before the first step.

A record in the released JSON format::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
     "images": [...], "detection_images": [...], "seg_images": [...], "clip_images": [...]}

`record_problems` lists, in words, everything the tokenizer, the processor or the model would get wrong:

* **messages**: a non-empty list of ``{role, content}`` objects with string content; the roles alternate user,
  assistant (after an optional system turn), so every user turn has its answer.
* **images per kind**: each image column is a list of path strings, as long as the number of its placeholders
  (``<image>``, ``<detection_image>``, ``<seg_image>``, ``<clip_image>``) in the messages.
* **region tokens**: region spans are well formed and their cells lie on the grid, and no ``<|x_i|>``/``<|y_i|>``
  outside the vocabulary (``<|x_8|>`` on an 8x8 grid, ``<|x_07|>``) appears anywhere: the tokenizer would split it
  into plain text pieces and the model would learn to write them.
* **actions vs extra images**: every ``<|detection_action|>`` (``seg``, ``clip``) re-encodes one image of its
  column, which comes after it (each image needs ``actions_per_image`` actions); with ``require_actions`` (two-pass
  training) extra images without any action are refused too; with ``branches``, a record that uses a branch the
  model does not build is refused.
* **paths**: crop paths ``path_x0,y0,x1,y1`` have a non-empty box; with ``check_image`` (e.g. `ImageChecker`) every
  file is opened (header only) and every crop box must fit the image in viewer pixels (EXIF orientation applied).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

from .images import ImageLoadError, image_size
from .regions import Box, region_problems, split_crop_path
from .vocabulary import BRANCH_TOKENS, GRID_SIZE, IMAGE_PLACEHOLDER, REGION_END, REGION_START

__all__ = ["IMAGE_KINDS", "ImageChecker", "message_problems", "record_problems"]

IMAGE_KINDS = (("images", IMAGE_PLACEHOLDER),) + tuple((b.images_key, b.placeholder) for b in BRANCH_TOKENS.values())
"""``(column, text placeholder)`` of every image kind a record can carry."""
TURN_ROLES = ("user", "assistant")

_SPAN_RE = re.compile(f"{re.escape(REGION_START)}.*?{re.escape(REGION_END)}", re.DOTALL)
_CELL_TOKEN_RE = re.compile(r"<\|([xy])_([0-9]+)\|>")

ImageCheck = Callable[[str, "Box | None"], "str | None"]
"""``check_image(real_path, crop_box_or_None) -> problem or None``."""


class ImageChecker:
    """Opens every image once (header only, `transformers_vpt.images.image_size`) and checks that crop boxes fit.

    Any failure — a missing file, not an image, a truncated header, a decompression bomb — is a problem of the
    record that names the image, never an exception. Results are cached per file (region records reuse images).
    """

    def __init__(self) -> None:
        self._size = functools.cache(self._read_size)

    @staticmethod
    def _read_size(path: str) -> tuple[int, int] | str:
        try:
            return image_size(path)
        except ImageLoadError as error:
            return str(error)

    def __call__(self, real_path: str, box: Box | None) -> str | None:
        size = self._size(real_path)
        if isinstance(size, str):
            return size
        if box is not None and (box[2] > size[0] or box[3] > size[1]):
            return f"crop box {box} lies outside the {size[0]}x{size[1]} image {real_path}"
        return None


def message_problems(messages: Any) -> list[str]:
    """Problems of the message list: its type, each message's shape, and the order of the roles."""
    if not isinstance(messages, list) or not messages:
        return ["messages is not a non-empty list"]
    problems = [
        f"messages[{i}] is not a {{role, content}} object with string content"
        for i, message in enumerate(messages)
        if not (isinstance(message, dict) and isinstance(message.get("content"), str))
    ]
    roles = [message.get("role") if isinstance(message, dict) else None for message in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or len(turns) % 2 or any(role != TURN_ROLES[i % 2] for i, role in enumerate(turns)):
        problems.append(f"roles {roles} do not alternate user, assistant (after an optional system turn)")
    return problems


def token_problems(text: str, grid_size: int = GRID_SIZE) -> list[str]:
    """Region-span problems (`regions.region_problems`) plus cell tokens the vocabulary does not have.

    ``<|x_8|>`` outside a span and ``<|x_07|>`` anywhere are text to the tokenizer (plain pieces it would train on).
    """
    problems = region_problems(text, grid_size)
    outside = _SPAN_RE.sub(" ", text)
    for match in _CELL_TOKEN_RE.finditer(text):
        axis, digits = match.groups()
        if digits != str(int(digits)):
            problems.append(f"{match.group(0)} is not a region token (write <|{axis}_{int(digits)}|>)")
    for match in _CELL_TOKEN_RE.finditer(outside):
        if int(match.group(2)) >= grid_size:
            problems.append(f"{match.group(0)} is out of range for a {grid_size}x{grid_size} grid")
    return problems


def _path_problems(key: str, paths: list[str], check_image: ImageCheck | None) -> list[str]:
    problems = []
    for i, path in enumerate(paths):
        try:
            real_path, box = split_crop_path(path)
        except ValueError as error:
            problems.append(f"{key}[{i}]: {error}")
            continue
        problem = check_image(real_path, box) if check_image else None
        if problem:
            problems.append(f"{key}[{i}]: {problem}")
    return problems


def _image_problems(record: dict, texts: list[str], check_image: ImageCheck | None) -> list[str]:
    """Each image column is a list of paths, one per placeholder; crop boxes and (optionally) files are checked."""
    problems = []
    for key, placeholder in IMAGE_KINDS:
        paths = record.get(key)
        paths = [] if paths is None else paths
        if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            problems.append(f"{key} is not a list of path strings")
            continue
        count = sum(text.count(placeholder) for text in texts)
        if count != len(paths):
            problems.append(f"{count} {placeholder} placeholders but {len(paths)} {key}")
        problems += _path_problems(key, paths, check_image)
    return problems


def _action_problems(
    record: dict,
    texts: list[str],
    branches: Collection[str] | None,
    actions_per_image: int | None,
    require_actions: bool,
) -> list[str]:
    """Every action re-encodes one image of its branch, which follows it; unbuilt branches are refused."""
    problems = []
    conversation = "\n".join(texts)
    for kind, branch in BRANCH_TOKENS.items():
        paths = record.get(branch.images_key)
        images = len(paths) if isinstance(paths, list) else 0
        actions = conversation.count(branch.action)
        if branches is not None and kind not in branches and (images or actions or branch.placeholder in conversation):
            problems.append(
                f"uses the '{kind}' branch ({branch.images_key} / {branch.action}) but the model builds only "
                f"{sorted(branches)}: add '{kind}' to vision_encoder_ls or leave the record out"
            )
            continue
        if actions and not images:
            problems.append(f"{actions} {branch.action} tokens but no {branch.images_key}: each action re-encodes one")
        elif actions and (actions % images if actions_per_image is None else actions != images * actions_per_image):
            need = "a whole number of" if actions_per_image is None else str(actions_per_image)
            problems.append(
                f"{actions} {branch.action} tokens for {images} {branch.images_key}; each image needs {need}"
            )
        elif images and not actions and require_actions:
            problems.append(
                f"{images} {branch.images_key} but no {branch.action} token: two-pass training "
                "(num_inner_forward_run: 2) conditions every extra image on its action; add the action triple "
                "before the image, or train the record in single-pass (alignment) mode"
            )
        elif actions == images and images and actions_per_image in (1, None):
            problems += _order_problems(conversation, branch)
    return problems


def _positions(text: str, needle: str) -> list[int]:
    return [match.start() for match in re.finditer(re.escape(needle), text)]


def _order_problems(conversation: str, branch) -> list[str]:
    """The k-th image placeholder of a branch comes after its k-th action (images pair with actions in order)."""
    for k, (action, image) in enumerate(
        zip(_positions(conversation, branch.action), _positions(conversation, branch.placeholder))
    ):
        if image < action:
            return [f"{branch.placeholder} #{k + 1} comes before the {branch.action} that asks for it"]
    return []


def record_problems(
    record: Any,
    grid_size: int = GRID_SIZE,
    check_image: ImageCheck | None = None,
    *,
    branches: Iterable[str] | None = None,
    actions_per_image: int | None = 1,
    require_actions: bool = False,
) -> list[str]:
    """Every problem of one record, in words (empty when it is clean); see the module rules.

    Args:
        record: The record, a released-format JSON object (anything else is one problem).
        grid_size: The region grid (8 for every released model).
        check_image: Called with ``(real_path, crop_box_or_None)`` for every image; returns a problem or None.
            None checks no files (only crop-path syntax). `ImageChecker` opens image headers.
        branches: The branches the model builds (``vision_encoder_ls``); None accepts any.
        actions_per_image: Action tokens per extra image (the model's ``projector_scale``, 1 in every released
            recipe); None accepts any whole number.
        require_actions: Refuse extra images without an action token (two-pass training needs them).
    """
    if not isinstance(record, dict):
        return ["record is not a JSON object"]
    messages = record.get("messages")
    problems = message_problems(messages)
    texts = [m["content"] for m in messages or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for text in texts:
        problems += token_problems(text, grid_size)
    problems += _image_problems(record, texts, check_image)
    branches = None if branches is None else set(branches)
    problems += _action_problems(record, texts, branches, actions_per_image, require_actions)
    return problems
