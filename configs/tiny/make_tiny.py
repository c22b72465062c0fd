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

from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.tiny.sources import make_tiny


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
    parser.add_argument("--bin", action="store_true", help="save the source models as pytorch_model.bin")
    parser.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the tiny synthetic dataset into OUT_DIR/data (--no-data: the models only)",
    )
    args = parser.parse_args(argv)
    for name, path in make_tiny(args.out_dir, safe_serialization=not args.bin, data=args.data, base=args.base).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
