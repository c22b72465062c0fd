#!/usr/bin/env python
"""Write the initial VPT checkpoint from local Qwen2-VL, DINOv2 and SAM directories (Hugging Face format).

The command line of `transformers_vpt.weights.prepare_weights`, which describes what the directory holds and what is
checked before anything loads.

Example:
    python scripts/prepare_weights.py --qwen2-vl models/Qwen2-VL-2B-Instruct --dino models/dinov2-large \\
        --vision-encoder-ls dino --output-dir models/Qwen2-VL-2B-VPT-Det-init
"""

from __future__ import annotations

import argparse
import logging

from transformers_vpt.errors import run_cli
from transformers_vpt.weights import check_output_dir, prepare_weights


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="prepare_weights.py")


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen2-vl", required=True, help="Qwen2-VL-2B/7B-Instruct directory")
    parser.add_argument("--vision-encoder-ls", required=True, help="branches to build: dino, sam, clip (comma list)")
    parser.add_argument("--dino", help="DINOv2 directory (Dinov2Model weights), needed for dino")
    parser.add_argument("--sam", help="SAM directory (SamModel weights; vision_encoder.* is used), needed for sam")
    parser.add_argument(
        "--seg-projector-stride", type=int, default=4, help="SAM projector conv kernel and stride (64x64 -> 16x16)"
    )
    parser.add_argument("--output-dir", required=True, help="new directory for the VPT checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an --output-dir that already holds a checkpoint"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_output_dir(args.output_dir, [d for d in (args.qwen2_vl, args.dino, args.sam) if d], args.overwrite)
    prepare_weights(
        args.qwen2_vl, args.output_dir, args.vision_encoder_ls, args.dino, args.sam, args.seg_projector_stride
    )


if __name__ == "__main__":
    raise SystemExit(main())
