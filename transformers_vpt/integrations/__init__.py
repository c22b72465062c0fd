"""VPT in other tools' harnesses, loaded only by the tool that asks for them.

`lmms_eval_manifest` is the ``lmms_eval.models`` entry point (``pyproject.toml``) through which lmms-eval 0.7 finds
the ``vpt`` model: ``lmms-eval --model vpt --model_args pretrained=DIR,mode=region --tasks ...``. It names the class
(`transformers_vpt.integrations.lmms_eval.VPTLmms`) without importing it; lmms-eval imports the class only when a run
asks for ``vpt``. The class needs the ``lmms`` extra (``pip install -c constraints.txt -e ".[lmms]"``).
"""

from __future__ import annotations

__all__ = ["LMMS_EVAL_CLASS", "LMMS_EVAL_MODEL", "lmms_eval_manifest"]

LMMS_EVAL_MODEL = "vpt"
"""The model name of ``lmms-eval --model``."""
LMMS_EVAL_CLASS = "transformers_vpt.integrations.lmms_eval.VPTLmms"
"""The class lmms-eval imports for `LMMS_EVAL_MODEL` (a simple, ``generate_until`` model)."""


def lmms_eval_manifest():
    """The lmms-eval model manifest of the ``vpt`` model (lmms-eval calls it while it builds its model registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)
