#!/usr/bin/env python
"""`python evaluation/evaluation.py ...`: the documented command of the VPT evaluation, kept as a thin entry.

The evaluation is the installed package `transformers_vpt.evaluation` (its command line is also installed as
``vpt-eval``); this file only calls its `main`. It runs as well under ``torchrun --nproc-per-node N`` and
``accelerate launch`` (data parallel: see `transformers_vpt.evaluation.evaluation`).
"""

from transformers_vpt.evaluation.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
