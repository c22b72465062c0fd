"""Runtime patches that teach LLaMA-Factory 0.9.5 to train and run VPT models, without forking it.

`apply()` is idempotent. It runs by itself in every process that imports `llamafactory.train.tuner` (`train`,
`export`, torchrun ranks) once the package's `.pth` import hook is installed (see `hook`); `vpt-cli`
(`launch.main`) works without it. Importing this package is cheap: LLaMA-Factory is imported by `apply()` only.
"""

_applied = False


def apply() -> None:
    r"""Register the VPT model, template, dataset columns, record checks, processors, collator, trainer and YAML
    keys."""
    global _applied
    if _applied:
        return

    import transformers_vpt  # noqa: F401  (registers the VPT classes with the transformers Auto classes)

    from . import args, collator, data, model, plugin, processors, records, trainer

    for module in (args, data, records, plugin, processors, collator, model, trainer):
        module.patch()
    _applied = True
