"""`vpt-cli`: LLaMA-Factory's CLI with the VPT patches, including every torchrun rank.

`main(["train", "cfg.yaml"])` behaves like `llamafactory-cli train cfg.yaml`. It works without the `.pth` hook:
the import hook is installed in this process, and LLaMA-Factory's launcher is pointed at this file, so torchrun
runs it as each rank's script (the `__main__` block), which applies the patches before `run_exp`. The installed
LLaMA-Factory is checked first (`guard.check_version`), so a release the patches were not written for stops the
command before any rank starts.
"""

import sys

import llamafactory_patches
from llamafactory_patches import hook


def main(argv: list[str] | None = None) -> None:
    from llamafactory import launcher

    from llamafactory_patches.guard import check_version

    check_version()
    hook.install()
    launcher.__file__ = __file__  # read by `launch()` as the torchrun script
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    launcher.launch()


if __name__ == "__main__":  # a torchrun rank
    from llamafactory_patches.guard import PatchError

    try:
        llamafactory_patches.apply()
    except PatchError as error:
        hook.stop(str(error))
    from llamafactory.train.tuner import run_exp

    run_exp()
