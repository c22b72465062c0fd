"""The VPT evaluation (``vpt-eval``, ``python evaluation/evaluation.py``): the released two-round benchmark on VPT
checkpoints and plain base-model baselines, data parallel under ``torchrun``/``accelerate launch``.

Modules: `evaluation` (the command line and the driver), `parallel` (ranks, shards, run locks), `datasets` (the
released test splits), `baseline` (the one-round baseline), `metrics` (judge-free metrics per dataset), `judge` (the
upstream LLM judge), `scoring`, `report` (summary tables, chart, action usage) and `storage` (crash-safe answer logs,
the output-directory lock). Nothing is imported here.
"""
