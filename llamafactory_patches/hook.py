"""Apply the patches right after `llamafactory.train.tuner` is imported, in any process.

The package installs `vpt_llamafactory.pth` into site-packages (see `build_pth.PTH_LINE`). Its line runs at every
interpreter start and only puts a small finder at the front of `sys.meta_path`, without importing anything; for
the module names in `TRIGGER_MODULES` that finder imports this module and defers to `find_spec` below.

* ``llamafactory.train.tuner``: every `llamafactory-cli train`/`export` process and every torchrun rank imports it
  before parsing arguments, so each of them is patched; other processes never import LLaMA-Factory or the patches.
  When the installed LLaMA-Factory is not the tested release (or a private name moved), a run that is not VPT goes
  on unpatched, exactly as without this project; a VPT run stops with one line saying why.
* ``llamafactory.v1.launcher`` (``USE_V1=1``): the v1 stack never imports the tuner, so the patches cannot take part;
  a VPT recipe stops with one line instead of training without its VPT keys; other runs are left alone.

``VPT_LLAMAFACTORY_PATCH=0`` switches the hook off: `llamafactory-cli` then runs exactly as without this project.
(`vpt-cli` applies the patches itself, whatever the variable says: it is the VPT entry point.)
"""

import os
import sys

TRIGGER_MODULE = "llamafactory.train.tuner"
V1_MODULE = "llamafactory.v1.launcher"
TRIGGER_MODULES = (TRIGGER_MODULE, V1_MODULE)
SWITCH_ENV = "VPT_LLAMAFACTORY_PATCH"
"""``VPT_LLAMAFACTORY_PATCH=0`` (or false/no/off): the hook leaves `llamafactory-cli` alone (no patch, no check)."""
MARKER = "vpt_import_hook"
"""Class attribute of the finders that defer to `find_spec` (the `.pth` one and `TunerImportHook`)."""
EXIT_STATUS = 2


def stop(message: str) -> None:
    r"""End the process with one line on stderr (an import hook has no caller that could report an exception)."""
    print(f"vpt: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_STATUS)


def apply_in_cli() -> None:
    r"""`llamafactory_patches.apply()` for a plain `llamafactory-cli` process (see the module docstring)."""
    import llamafactory_patches
    from llamafactory_patches.guard import PatchError
    from llamafactory_patches.recipe import vpt_markers

    try:
        llamafactory_patches.apply()
    except PatchError as error:
        markers = vpt_markers(sys.argv[1:])
        if markers:
            stop(f"{error} (this is a VPT run: {', '.join(markers)})")
        # not a VPT run: LLaMA-Factory runs unpatched, as it would without this project


def refuse_v1_vpt_recipe() -> None:
    r"""Stop a VPT recipe under ``USE_V1=1``, which would otherwise train without the VPT patches and keys."""
    from llamafactory_patches.recipe import vpt_markers

    markers = vpt_markers(sys.argv[1:])
    if markers:
        stop(
            f"USE_V1=1 runs LLaMA-Factory's v1 stack, which the VPT patches do not support, so this VPT recipe "
            f"({', '.join(markers)}) would train without VPT: unset USE_V1 (or use vpt-cli train)"
        )


_AFTER_EXEC = {TRIGGER_MODULE: apply_in_cli, V1_MODULE: refuse_v1_vpt_recipe}


class _ApplyAfterExec:
    r"""Wraps a trigger module's loader: executes the module, then runs its action."""

    def __init__(self, loader, action) -> None:
        self.loader = loader
        self.action = action

    def __getattr__(self, name: str):  # get_source, get_filename ... of the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.action()


def enabled() -> bool:
    r"""The hook is on unless `SWITCH_ENV` is 0/false/no/off."""
    return os.environ.get(SWITCH_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def find_spec(fullname, path=None, target=None):
    r"""A trigger module's spec from the other finders, with a loader that runs its action after it."""
    if fullname not in _AFTER_EXEC or not enabled():
        return None

    for finder in sys.meta_path:
        if not getattr(finder, MARKER, False) and hasattr(finder, "find_spec"):
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _ApplyAfterExec(spec.loader, _AFTER_EXEC[fullname])
                return spec

    return None


class TunerImportHook:
    vpt_import_hook = True
    find_spec = staticmethod(find_spec)


def install() -> None:
    r"""Install the hook in this process (what the `.pth` line does at start-up), once."""
    if not any(getattr(finder, MARKER, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, TunerImportHook())
