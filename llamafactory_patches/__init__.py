"""Runtime patches that teach LLaMA-Factory 0.9.5 to train and run VPT models, without forking it.

`apply()` is idempotent. It runs by itself in every process that imports `llamafactory.train.tuner` (`train`,
`export`, torchrun ranks) once the package's `.pth` import hook is installed (see `hook`; ``VPT_LLAMAFACTORY_PATCH=0``
switches the hook off); `vpt-cli` (`launch.main`) works without it. Importing this package is cheap: LLaMA-Factory
is imported by `apply()` only.

Runs that are not VPT are unaffected: registrations add names (a template, a plugin, formattings, model types)
and every replaced class or wrapped function does what the stock one does unless the run is VPT (tested bit for
bit: tests/test_llamafactory_isolation.py). DevNote.md has the table of patches, registry or guarded private.
"""

_applied = False

PATCH_MODULES = ("args", "data", "records", "plugin", "processors", "collator", "model", "trainer")
"""The patch modules, in the order `apply()` patches them; each has ``PRIVATE`` (see `guard`) and ``patch()``."""


def apply() -> None:
    r"""Check LLaMA-Factory (`guard`: the tested release, every private name the patches rely on), then register
    the VPT model, template, formattings, record checks, processors, collator, trainer and YAML keys.

    Raises:
        guard.PatchError: Another LLaMA-Factory release (unless ``VPT_LLAMAFACTORY_ANY_VERSION=1``), or a private
            name that is not as expected; nothing is patched then.
    """
    global _applied
    if _applied:
        return

    import importlib

    from . import guard

    guard.check_version()
    import transformers_vpt  # noqa: F401  (registers the VPT classes with the transformers Auto classes)

    modules = [importlib.import_module(f"{__name__}.{name}") for name in PATCH_MODULES]
    template = importlib.import_module(f"{__name__}.template")
    guard.check_private([name for module in (*modules, template) for name in module.PRIVATE])
    for module in modules:
        module.patch()
    _applied = True
