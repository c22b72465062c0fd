#!/usr/bin/env python
"""Point the released VPT dataset files at local images and check every record before training.

The released JSON files name images by absolute paths on the authors' machines, call the CLIP column
"depth_images" (the data loader reads "clip_images") and contain a few broken records. This script writes a copy of
each file with rewritten image paths and "clip_images" instead of "depth_images", and reports every problem by file
and record index. Records are never dropped or otherwise changed, so a report can be acted on without losing data.
The record rules are those of `transformers_vpt.records`, the rules training enforces (llamafactory_patches).

Exit status: 0 when no problem was found; 1 when problems were found (every readable file is still written; a file
that cannot be read as a JSON list is not, and the summary says so); 2 on usage errors and failures (one line on
stderr; --debug shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from transformers_vpt.errors import run_cli
from transformers_vpt.files import write_json
from transformers_vpt.records import IMAGE_KINDS, ImageChecker, record_problems
from transformers_vpt.regions import split_crop_path
from transformers_vpt.vocabulary import BRANCH_TOKENS, GRID_SIZE

CLIP_KEY = BRANCH_TOKENS["clip"].images_key
LEGACY_CLIP_KEY = "depth_images"
IMAGE_KEYS = [key for key, _ in IMAGE_KINDS] + [LEGACY_CLIP_KEY]


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


@dataclass(frozen=True)
class FileResult:
    """What happened to one input file: its record count, its problems, and whether its output was written."""

    name: str
    records: int
    problems: list[Problem]
    written: bool


def read_records(src: Path) -> list | str:
    """The records of ``src``, or why they cannot be read."""
    try:
        records = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        return f"cannot read JSON ({' '.join(str(error).split())})"
    return records if isinstance(records, list) else "not a JSON list of records"


def process_file(
    src: Path, dst: Path, rewrite: PathRewriter, grid_size: int, check_image: ImageChecker | None
) -> FileResult:
    """Rewrite, check and write one file; a file that cannot be read is one problem and is not written."""
    records = read_records(src)
    if isinstance(records, str):
        return FileResult(src.name, 0, [Problem(src.name, None, f"{records}; not written")], written=False)
    problems = []
    for index, record in enumerate(tqdm(records, desc=src.name, unit="record", disable=None)):
        record, found = merge_depth_images(record)
        records[index] = record = rewrite_paths(record, rewrite)
        found += record_problems(record, grid_size, check_image)
        problems += [Problem(src.name, index, message) for message in found]
    write_json(dst, records, indent=2)
    return FileResult(src.name, len(records), problems, written=True)


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


def summary_table(results: Sequence[FileResult]) -> str:
    """One row per file (records, problems, written or not) and a total row."""
    unwritten = sum(not r.written for r in results)
    lines = [("file", "records", "problems", "output")]
    lines += [
        (r.name, str(r.records) if r.written else "-", str(len(r.problems)), "written" if r.written else "not written")
        for r in results
    ]
    total_output = f"{unwritten} not written" if unwritten else "all written"
    lines.append(
        ("total", str(sum(r.records for r in results)), str(sum(len(r.problems) for r in results)), total_output)
    )
    width = max(len(line[0]) for line in lines)
    return "\n".join(f"{name:<{width}}  {n:>9}  {k:>9}  {out}" for name, n, k, out in lines)


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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure (also: VPT_DEBUG=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit status 0 / 1 (see the module docstring); a failure is one line on stderr and 2."""
    return run_cli(_main, argv, prog="prepare_data.py")


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rewrite = PathRewriter.from_args(args.image_root)
        pairs = collect_inputs(args.input, args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    check_image = ImageChecker() if args.check_files else None

    results = []
    for src, dst in pairs:
        result = process_file(src, dst, rewrite, args.grid_size, check_image)
        for problem in result.problems[: args.max_print]:
            print(problem)
        if len(result.problems) > args.max_print:
            print(f"{src.name}: ... and {len(result.problems) - args.max_print} more problems")
        results.append(result)

    print(summary_table(results))
    problems = [problem for result in results for problem in result.problems]
    if args.report:
        write_json(
            args.report,
            {
                "files": [
                    {"file": r.name, "records": r.records, "problems": len(r.problems), "written": r.written}
                    for r in results
                ],
                "problems": [{"file": p.file, "index": p.index, "message": p.message} for p in problems],
            },
            indent=2,
        )
    unwritten = [r.name for r in results if not r.written]
    if unwritten:
        print(f"Not written (cannot be read as a JSON list of records): {', '.join(unwritten)}.")
    if problems:
        kept = "All readable files were written" if unwritten else "All records were written"
        print(
            f"Found {len(problems)} problems. {kept}; only image paths and the "
            f"{LEGACY_CLIP_KEY} column name were changed."
        )
        return 1
    print("No problems found.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
