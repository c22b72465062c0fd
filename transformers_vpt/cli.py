"""``vpt-cli``: command-line entry points.

Each subcommand is a function that adds its parser, registered with `subcommand`; its handler does the heavy imports,
so ``vpt-cli --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

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
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (checkpoint and processor)")
    parser.add_argument(
        "--image", required=True, metavar="IMG", help="image path; 'path_x0,y0,x1,y1' loads that crop of the image"
    )
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument(
        "--mode",
        choices=("region", "reencode", "free"),
        default="region",
        help="trigger phrase appended to the question: region selection, re-encoding, or none (default: region)",
    )
    parser.add_argument(
        "--max-image-side",
        type=int,
        default=512,
        metavar="N",
        help="downscale images and crops to this long side before the model; 0 keeps full size (default: 512)",
    )
    parser.add_argument(
        "--save-boxes", metavar="PNG", help="save the image with the selected regions drawn on it to this file"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="model weights dtype (default: auto, the checkpoint's)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="token limit of each round (default: 128)"
    )
    parser.set_defaults(handler=_infer)


def _infer(args: argparse.Namespace) -> int:
    import torch
    from PIL import ImageDraw

    from .pipeline import VPTPipeline
    from .regions import open_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = VPTPipeline.from_pretrained(args.model, dtype=args.dtype, device=device)
    image = open_image(args.image)
    (result,) = pipeline(
        [image],
        [args.question],
        mode=args.mode,
        max_image_side=args.max_image_side or None,
        generation_kwargs={"max_new_tokens": args.max_new_tokens},
    )
    print(f"Answer: {result.answer}")
    print(f"Action: {result.action}")
    if result.boxes:
        print("Boxes: " + " ".join(f"({x0},{y0},{x1},{y1})" for x0, y0, x1, y1 in result.boxes))
    if args.save_boxes:
        draw = ImageDraw.Draw(image)
        width = max(2, max(image.size) // 200)
        for x0, y0, x1, y1 in result.boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0), width=width)
        image.save(args.save_boxes)
        print(f"Saved {len(result.boxes)} region box(es) drawn on the image to {args.save_boxes}")
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

    launch([args.command, *args.args])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpt-cli", description="Visual Perception Tokens for Qwen2-VL.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
