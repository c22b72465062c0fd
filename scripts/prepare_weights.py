#!/usr/bin/env python
"""Write the initial VPT checkpoint from a local base model (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) and DINOv2 / SAM
directories (Hugging Face format).

The command line of `transformers_vpt.weights.prepare_weights`, which describes what the directory holds and what is
checked before anything loads. The base model is given with ``--base-model DIR`` (any base: the base is the one its
config.json declares; ``--base`` checks it) or, for Qwen2-VL, with ``--qwen2-vl DIR`` as before.

Examples:
    python scripts/prepare_weights.py --qwen2-vl models/Qwen2-VL-2B-Instruct --dino models/dinov2-large \\
        --vision-encoder-ls dino --output-dir models/Qwen2-VL-2B-VPT-Det-init
    python scripts/prepare_weights.py --base qwen2_5_vl --base-model models/Qwen2.5-VL-3B-Instruct \\
        --dino models/dinov2-large --vision-encoder-ls dino --output-dir models/Qwen2.5-VL-3B-VPT-Det-init
    python scripts/prepare_weights.py --base-model models/Qwen3-VL-4B-Instruct --vision-encoder-ls clip \\
        --output-dir models/Qwen3-VL-4B-VPT-CLIP-init
"""

from __future__ import annotations

import argparse
import logging

from transformers_vpt.errors import VPTUserError, run_cli
from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.weights import BASE_MODEL_FLAG, SOURCE_FLAGS, check_output_dir, prepare_weights


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="prepare_weights.py")


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    labels = ", ".join(f"{name} ({base.label})" for name, base in VPT_BASES.items())
    parser.add_argument(
        "--base",
        choices=list(VPT_BASES),
        help=f"the base of the VPT model: {labels}; default: the one the base model's config.json declares "
        "(qwen2_vl with --qwen2-vl); given, it must agree with it",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        BASE_MODEL_FLAG,
        metavar="DIR",
        help="the base model directory (Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct, Qwen3-VL-4B-Instruct, ...)",
    )
    source.add_argument(
        SOURCE_FLAGS["qwen2_vl"], metavar="DIR", help="a Qwen2-VL-2B/7B-Instruct directory (base qwen2_vl)"
    )
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
    if args.qwen2_vl is not None:
        if args.base not in (None, "qwen2_vl"):
            raise VPTUserError(
                f"{SOURCE_FLAGS['qwen2_vl']} names a Qwen2-VL model but --base is {args.base}; give the "
                f"{VPT_BASES[args.base].label} directory with {BASE_MODEL_FLAG} DIR"
            )
        base_model, base, flag = args.qwen2_vl, "qwen2_vl", SOURCE_FLAGS["qwen2_vl"]
    else:
        base_model, base, flag = args.base_model, args.base, BASE_MODEL_FLAG
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_output_dir(args.output_dir, [d for d in (base_model, args.dino, args.sam) if d], args.overwrite)
    prepare_weights(
        base_model,
        args.output_dir,
        args.vision_encoder_ls,
        args.dino,
        args.sam,
        args.seg_projector_stride,
        base=base,
        base_model_flag=flag,
    )


if __name__ == "__main__":
    raise SystemExit(main())
