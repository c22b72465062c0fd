#!/usr/bin/env python
"""Generate a synthetic VPT dataset that a tiny model can learn on a CPU in minutes.

The command line of `transformers_vpt.tiny.synthetic.generate`, whose module docstring describes the task and the
files written into ``--out-dir``. Same options and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from transformers_vpt.tiny.synthetic import Options, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Options()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python scripts/make_synthetic_data.py --out-dir data/synthetic --train-size 2000",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out-dir", required=True, help="output directory (created if missing)")
    for option in fields(Options):
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            type=type(getattr(defaults, option.name)),
            default=getattr(defaults, option.name),
            help=option.metadata["help"].replace("%", "%%"),
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    summary = generate(args.pop("out_dir"), **args)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
