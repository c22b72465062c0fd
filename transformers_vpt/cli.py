"""``vpt-cli``: command-line entry points.

Each subcommand is a function that adds its parser, registered with `subcommand`; its handler does the heavy imports,
so ``vpt-cli --help`` stays fast. Failures print one line and exit with status 2 (`errors.run_cli`); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import VPTUserError, run_cli
from .vocabulary import TRIGGER_MODES

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(add_parser: Callable[[argparse._SubParsersAction], None]):
    """Register a function that adds a subparser (with ``set_defaults(handler=...)``) to ``vpt-cli``."""
    _SUBCOMMANDS.append(add_parser)
    return add_parser


@subcommand
def _add_infer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="answer a question about an image with two-round VPT inference",
        description=(
            "Run round 1 with the trigger phrase of --mode, follow the perception action the model takes (region "
            "crops or re-encoding) in round 2, and print the answer, the action and the region boxes."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="model directory (checkpoint and processor): a VPT model of any supported base, or a plain base model "
        "(e.g. Qwen2-VL-2B-Instruct), which answers in one round",
    )
    parser.add_argument(
        "--image", required=True, metavar="IMG", help="image path; 'path_x0,y0,x1,y1' loads that crop of the image"
    )
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument(
        "--mode",
        choices=TRIGGER_MODES,
        default="region",
        help="trigger phrase appended to the question: region selection, re-encoding, or none (default: region)",
    )
    parser.add_argument(
        "--max-image-side",
        type=_non_negative,
        default=512,
        metavar="N",
        help="downscale images and crops to this long side before the model; 0 keeps full size (default: 512)",
    )
    parser.add_argument(
        "--save-boxes",
        metavar="PNG",
        help="save the image with the selected regions drawn on it to this new file (.png, .jpg, ...); an existing "
        "file or the input image is never written over",
    )
    parser.add_argument("--overwrite", action="store_true", help="let --save-boxes replace an existing file")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="model weights dtype (default: auto, the checkpoint's)",
    )
    parser.add_argument(
        "--protocol",
        choices=("project", "released"),
        default="project",
        help="routing at the protocol edges: the project's rules or the released ones (see README) (default: project)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive, default=128, metavar="N", help="token limit of each round (default: 128)"
    )
    parser.set_defaults(handler=_infer)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_output_image(path: str, inputs: Sequence[str], overwrite: bool) -> Path:
    """The ``--save-boxes`` file, checked before any work: a known image type, a writable folder, not an input and
    not an existing file (unless ``overwrite``)."""
    from PIL import Image

    from .regions import split_crop_path

    target = Path(path)
    if target.suffix.lower() not in Image.registered_extensions():
        raise VPTUserError(f"--save-boxes {path}: unknown image type {target.suffix!r}; use .png or .jpg")
    for source in inputs:
        real = Path(split_crop_path(source)[0])
        if real.exists() and target.exists() and target.resolve() == real.resolve():
            raise VPTUserError(f"--save-boxes {path} is the input image; choose another file")
    if target.exists() and not overwrite:
        raise VPTUserError(f"--save-boxes {path} already exists; choose another file or pass --overwrite")
    if target.is_dir():
        raise VPTUserError(f"--save-boxes {path} is a directory")
    folder = target.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise VPTUserError(f"--save-boxes {path}: cannot write to the folder {folder}")
    return target


def _save_image(image, target: Path, overwrite: bool) -> None:
    """Write ``image`` to a new ``target`` (with ``overwrite``: atomically, over an existing one)."""
    from PIL import Image

    from .files import write_atomic

    image_format = Image.registered_extensions()[target.suffix.lower()]
    if not overwrite:
        with open(target, "xb") as file:  # fails rather than replaces a file created meanwhile
            image.save(file, format=image_format)
        return
    write_atomic(target, lambda file: image.save(file, format=image_format))


def _infer(args: argparse.Namespace) -> int:
    import torch
    from PIL import ImageDraw

    from .images import load_image
    from .pipeline import BaselinePipeline, load_pipeline

    target = _check_output_image(args.save_boxes, [args.image], args.overwrite) if args.save_boxes else None
    image = load_image(args.image)  # before the model loads: a bad image fails at once
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(args.model, dtype=args.dtype, device=device)
    mode = args.mode
    if isinstance(pipeline, BaselinePipeline):
        label = pipeline.base.label if pipeline.base is not None else pipeline.model.config.model_type
        print(f"Note: {args.model} is a plain {label} checkpoint: answering in one round, without a trigger phrase")
        mode = "free"
    (result,) = pipeline(
        [image],
        [args.question],
        mode=mode,
        max_image_side=args.max_image_side or None,
        generation_kwargs={"max_new_tokens": args.max_new_tokens},
        on_error="raise",
        protocol=args.protocol,
    )
    if result.dropped:
        print(f"Dropped (released protocol): {result.dropped}")
    print(f"Answer: {result.answer}")
    print(f"Action: {result.action}")
    if result.boxes:
        print("Boxes: " + " ".join(f"({x0},{y0},{x1},{y1})" for x0, y0, x1, y1 in result.boxes))
    if target is not None:
        draw = ImageDraw.Draw(image)
        width = max(2, max(image.size) // 200)
        for x0, y0, x1, y1 in result.boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0), width=width)
        _save_image(image, target, args.overwrite)
        print(f"Saved {len(result.boxes)} region box(es) drawn on the image to {target}")
    return 0


@subcommand
def _add_llamafactory_commands(subparsers: argparse._SubParsersAction) -> None:
    for name, summary in (
        ("train", "train with LLaMA-Factory and the VPT patches: vpt-cli train configs/RECIPE.yaml [key=value ...]"),
        ("export", "export (e.g. merge a LoRA VPT model) with LLaMA-Factory: vpt-cli export CONFIG.yaml"),
    ):
        parser = subparsers.add_parser(
            name,
            help=summary,
            description=summary + ". The same as `llamafactory-cli " + name + "`, with the patches applied in every "
            "process (torchrun ranks included) even where the .pth import hook is not installed.",
        )
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the YAML recipe and key=value overrides")
        parser.set_defaults(handler=_run_llamafactory, command=name)


def _run_llamafactory(args: argparse.Namespace) -> int:
    from llamafactory_patches.launch import main as launch

    recipe = next((a for a in args.args if a.endswith((".yaml", ".yml", ".json"))), None)
    if recipe is None:
        raise VPTUserError(f"vpt-cli {args.command} needs a YAML recipe: vpt-cli {args.command} RECIPE.yaml")
    if not Path(recipe).is_file():
        raise VPTUserError(f"no such recipe file: {recipe}")

    launch([args.command, *args.args])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpt-cli", description="Visual Perception Tokens for the Qwen-VL models."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of a failure (also: VPT_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``vpt-cli``: one line and exit status 2 on failure; ``--debug`` (or ``VPT_DEBUG=1``) shows the traceback."""
    return run_cli(_main, argv, prog="vpt-cli")


if __name__ == "__main__":
    raise SystemExit(main())
