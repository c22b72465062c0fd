#!/usr/bin/env python
"""Build everything the tiny recipes of this directory read, offline, in a few seconds.

Written into ``--out-dir`` (default ``outputs/tiny``, where the recipes look): tiny random source models
(``sources/``: the stock base model of ``--base``, Qwen2-VL by default, Qwen2.5-VL or Qwen3-VL, DINOv2 and SAM), the VPT
checkpoint ``scripts/prepare_weights.py`` makes from them (``vpt-init``) and a tiny synthetic dataset (``data``);
`transformers_vpt.tiny.sources.make_tiny` does the work.

Run from the repository root: ``python configs/tiny/make_tiny.py``, then e.g.
``llamafactory-cli train configs/tiny/alignment.yaml``.
"""

from __future__ import annotations

import argparse
import json

import torch

from transformers_vpt.models.bases import VPT_BASES, get_base
from transformers_vpt.tiny.sources import make_tiny


def text_field(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--text-config``; VALUE is read as JSON (10, 1e4, true, [2, 3, 3]) or else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="outputs/tiny")
    parser.add_argument(
        "--base",
        choices=list(VPT_BASES),
        default="qwen2_vl",
        help="the base of the tiny VPT model: " + ", ".join(f"{n} ({b.label})" for n, b in VPT_BASES.items())
        + " (default: qwen2_vl)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random weights (default: torch's unseeded random state)"
    )
    parser.add_argument("--bin", action="store_true", help="save the source models as pytorch_model.bin")
    parser.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the tiny synthetic dataset into OUT_DIR/data (--no-data: the models only)",
    )
    parser.add_argument(
        "--text-config",
        type=text_field,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the tiny text config, repeatable (the demo: rope_theta=10, so that M-RoPE's "
        "height and width frequencies tell the tiny model's image tokens apart)",
    )
    args = parser.parse_args(argv)
    text_config = dict(args.text_config)
    known = get_base(args.base).stock_model_class.config_class.sub_configs["text_config"]().to_dict()
    if unknown := sorted(set(text_config) - set(known)):
        parser.error(f"--text-config: {', '.join(unknown)} is not a field of the {args.base} text config")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    made = make_tiny(
        args.out_dir, safe_serialization=not args.bin, data=args.data, base=args.base, text_config=text_config
    )
    for name, path in made.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
