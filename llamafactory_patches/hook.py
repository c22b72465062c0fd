"""Apply the patches right after `llamafactory.train.tuner` is imported, in any process.

The package installs `vpt_llamafactory.pth` into site-packages (see `build_pth.PTH_LINE`). Its line runs at every
interpreter start and only puts a small finder at the front of `sys.meta_path`, without importing anything; for
the one module name `llamafactory.train.tuner` that finder imports this module and defers to `find_spec` below.
Every `llamafactory-cli train`/`export` process and every torchrun rank imports the tuner module before parsing
arguments, so each of them is patched; other processes never import LLaMA-Factory or the patches.
"""

import sys

TRIGGER_MODULE = "llamafactory.train.tuner"
MARKER = "vpt_import_hook"
"""Class attribute of the finders that defer to `find_spec` (the `.pth` one and `TunerImportHook`)."""


class _ApplyAfterExec:
    r"""Wraps the trigger module's loader: executes the module, then applies the patches."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):  # get_source, get_filename ... of the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        from llamafactory_patches import apply

        apply()


def find_spec(fullname, path=None, target=None):
    r"""The trigger module's spec from the other finders, with a loader that applies the patches after it."""
    if fullname != TRIGGER_MODULE:
        return None

    for finder in sys.meta_path:
        if not getattr(finder, MARKER, False) and hasattr(finder, "find_spec"):
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _ApplyAfterExec(spec.loader)
                return spec

    return None


class TunerImportHook:
    vpt_import_hook = True
    find_spec = staticmethod(find_spec)


def install() -> None:
    r"""Install the hook in this process (what the `.pth` line does at start-up), once."""
    if not any(getattr(finder, MARKER, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, TunerImportHook())
