#!/usr/bin/env python
"""Point the released VPT dataset files at local images and check every record before training.

The released JSON files name images by absolute paths on the authors' machines, call the CLIP column
"depth_images" (the data loader reads "clip_images") and contain a few broken records. This script writes a copy of
each file with rewritten image paths and "clip_images" instead of "depth_images", and reports every problem by file
and record index. Records are never dropped or otherwise changed, so a report can be acted on without losing data.

Exit status: 0 when no problem was found, 1 when problems were found (the files are still written), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from transformers_vpt.regions import Box, region_problems, split_crop_path
from transformers_vpt.vocabulary import BRANCH_TOKENS, GRID_SIZE, IMAGE_PLACEHOLDER

# (column, text placeholder) of every image kind a record can carry.
IMAGE_KINDS = [("images", IMAGE_PLACEHOLDER)] + [(b.images_key, b.placeholder) for b in BRANCH_TOKENS.values()]
CLIP_KEY = BRANCH_TOKENS["clip"].images_key
LEGACY_CLIP_KEY = "depth_images"
IMAGE_KEYS = [key for key, _ in IMAGE_KINDS] + [LEGACY_CLIP_KEY]
TURN_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Problem:
    file: str
    index: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.index is None else f"{self.file}[{self.index}]"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class PathRewriter:
    """Replaces the longest matching leading directory ``old`` by ``new``; other relative paths join ``root``."""

    prefixes: tuple[tuple[str, str], ...] = ()
    root: str | None = None

    @classmethod
    def from_args(cls, values: Sequence[str]) -> PathRewriter:
        prefixes, roots = [], []
        for value in values:
            old, sep, new = value.partition("=")
            if sep and not (old and new):
                raise ValueError(f"--image-root {value!r}: expected OLD_PREFIX=NEW_ROOT with both parts non-empty")
            if sep:
                prefixes.append((old.rstrip("/"), new.rstrip("/")))
            elif value:
                roots.append(value)
            else:
                raise ValueError("--image-root needs a non-empty value")
        if len(roots) > 1:
            raise ValueError(f"--image-root: give at most one plain NEW_ROOT, got {roots}")
        prefixes.sort(key=lambda pair: len(pair[0]), reverse=True)
        return cls(tuple(prefixes), roots[0] if roots else None)

    def __call__(self, path: str) -> str:
        try:
            real_path, _ = split_crop_path(path)
        except ValueError:  # an empty crop box; reported by the record checks, rewritten as a plain path here
            real_path = path
        crop_suffix = path[len(real_path) :]
        for old, new in self.prefixes:
            if real_path == old or real_path.startswith(old + "/"):
                return new + real_path[len(old) :] + crop_suffix
        if self.root is not None and not os.path.isabs(real_path):
            return os.path.join(self.root, real_path) + crop_suffix
        return path


def read_image_size(path: str) -> tuple[int, int] | str:
    """``(width, height)`` from the image header, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        return str(error)


class ImageChecker:
    """Checks that image files exist and that crop boxes fit, caching per file (region records reuse images)."""

    def __init__(self) -> None:
        self._exists = functools.cache(os.path.isfile)
        self._size = functools.cache(read_image_size)

    def __call__(self, real_path: str, box: Box | None) -> str | None:
        if not self._exists(real_path):
            return f"missing image file {real_path}"
        if box is None:
            return None
        size = self._size(real_path)
        if isinstance(size, str):
            return f"unreadable image {real_path}: {size}"
        if box[2] > size[0] or box[3] > size[1]:
            return f"crop box {box} lies outside the {size[0]}x{size[1]} image {real_path}"
        return None


def merge_depth_images(record: Any) -> tuple[Any, list[str]]:
    """Write the released ``depth_images`` column as ``clip_images``, at the same position in the record."""
    if not isinstance(record, dict) or LEGACY_CLIP_KEY not in record:
        return record, []
    depth, clip = record[LEGACY_CLIP_KEY], record.get(CLIP_KEY)
    if depth and clip and depth != clip:
        return record, [f"{LEGACY_CLIP_KEY} and {CLIP_KEY} are both given and differ"]
    merged = clip or depth
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in (LEGACY_CLIP_KEY, CLIP_KEY):
            out.setdefault(CLIP_KEY, merged)
        else:
            out[key] = value
    return out, []


def rewrite_paths(record: Any, rewrite: PathRewriter) -> Any:
    if not isinstance(record, dict):
        return record
    return {
        key: [rewrite(p) if isinstance(p, str) else p for p in value]
        if key in IMAGE_KEYS and isinstance(value, list)
        else value
        for key, value in record.items()
    }


def message_problems(messages: Any) -> list[str]:
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


def record_problems(record: Any, grid_size: int, check_image: ImageChecker | None) -> list[str]:
    """Every problem of one record: message structure, placeholder counts, region spans, crop paths, files."""
    if not isinstance(record, dict):
        return ["record is not a JSON object"]
    messages = record.get("messages")
    problems = message_problems(messages)
    texts = [m["content"] for m in messages or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for text in texts:
        problems += region_problems(text, grid_size)
    for key, placeholder in IMAGE_KINDS:
        paths = record.get(key, [])
        if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            problems.append(f"{key} is not a list of path strings")
            continue
        count = sum(text.count(placeholder) for text in texts)
        if count != len(paths):
            problems.append(f"{count} {placeholder} placeholders but {len(paths)} {key}")
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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write through a temporary file in the same folder, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_file(
    src: Path, dst: Path, rewrite: PathRewriter, grid_size: int, check_image: ImageChecker | None
) -> tuple[int, list[Problem]]:
    """Rewrite, check and write one file; returns its record count and problems."""
    try:
        records = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return 0, [Problem(src.name, None, f"cannot read JSON ({error}); not written")]
    if not isinstance(records, list):
        return 0, [Problem(src.name, None, "not a JSON list of records; not written")]
    problems = []
    for index, record in enumerate(tqdm(records, desc=src.name, unit="record", disable=None)):
        record, found = merge_depth_images(record)
        records[index] = record = rewrite_paths(record, rewrite)
        found += record_problems(record, grid_size, check_image)
        problems += [Problem(src.name, index, message) for message in found]
    write_json_atomic(dst, records)
    return len(records), problems


def collect_inputs(paths: Sequence[Path], output_dir: Path) -> list[tuple[Path, Path]]:
    """``(input file, output file)`` pairs; folders contribute their ``*.json`` files."""
    pairs = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"--input {path}: no such file or folder")
        pairs += [(f, output_dir / f.name) for f in files]
    if not pairs:
        raise ValueError("no JSON files found in --input")
    names = [dst.name for _, dst in pairs]
    if len(set(names)) < len(names):
        raise ValueError(f"several inputs share a file name, so their outputs would collide: {sorted(names)}")
    for src, dst in pairs:
        if dst.resolve() == src.resolve():
            raise ValueError(f"--output-dir would overwrite the input {src}")
    return pairs


def summary_table(rows: Sequence[tuple[str, int, int]]) -> str:
    lines = [("file", "records", "problems")] + [(name, str(n), str(k)) for name, n, k in rows]
    lines.append(("total", str(sum(n for _, n, _ in rows)), str(sum(k for _, _, k in rows))))
    width = max(len(name) for name, _, _ in lines)
    return "\n".join(f"{name:<{width}}  {n:>9}  {k:>9}" for name, n, k in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example: prepare_data.py --input released/ --output-dir data/vpt "
            "--image-root /root/data=/mnt/datasets --report report.json\n\n" + __doc__.split("\n\n", 1)[1]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        type=Path,
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="released dataset JSON files, or folders whose *.json files are all processed",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="where the prepared files are written, under their original names",
    )
    parser.add_argument(
        "--image-root",
        action="append",
        default=[],
        metavar="[OLD_PREFIX=]NEW_ROOT",
        help="OLD_PREFIX=NEW_ROOT replaces the leading folder OLD_PREFIX of image paths by NEW_ROOT "
        "(repeatable, longest prefix wins); a plain NEW_ROOT resolves the remaining relative "
        "paths against it. Crop suffixes _x0,y0,x1,y1 are kept.",
    )
    parser.add_argument(
        "--check-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check that every (rewritten) image file exists and that crop boxes fit inside it (default: on)",
    )
    parser.add_argument("--report", type=Path, metavar="FILE", help="write every problem and the summary as JSON")
    parser.add_argument("--grid-size", type=int, default=GRID_SIZE, help="region grid size (default: %(default)s)")
    parser.add_argument(
        "--max-print",
        type=int,
        default=20,
        metavar="N",
        help="print at most N problems per file; --report lists them all (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rewrite = PathRewriter.from_args(args.image_root)
        pairs = collect_inputs(args.input, args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    check_image = ImageChecker() if args.check_files else None

    rows, problems = [], []
    for src, dst in pairs:
        count, found = process_file(src, dst, rewrite, args.grid_size, check_image)
        for problem in found[: args.max_print]:
            print(problem)
        if len(found) > args.max_print:
            print(f"{src.name}: ... and {len(found) - args.max_print} more problems")
        rows.append((src.name, count, len(found)))
        problems += found

    print(summary_table(rows))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            args.report,
            {
                "files": [{"file": name, "records": n, "problems": k} for name, n, k in rows],
                "problems": [{"file": p.file, "index": p.index, "message": p.message} for p in problems],
            },
        )
    if problems:
        print(
            f"Found {len(problems)} problems. All records were written; only image paths and the "
            f"{LEGACY_CLIP_KEY} column name were changed."
        )
        return 1
    print("No problems found.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
