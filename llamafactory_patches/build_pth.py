"""setuptools commands that install `vpt_llamafactory.pth`, the start-up line of `llamafactory_patches.hook`.

`build_pth` is a sub-command of `build`: for a wheel it writes the file into `build_lib`, whose root becomes
site-packages; in an editable install (`pip install -e .`, setuptools' `editable_wheel` sets `editable_mode`) it
writes it into the editable wheel's root, which is site-packages as well. Loaded by setuptools from
`[tool.setuptools.cmdclass]`, so this module imports nothing from the package.
"""

import os

from setuptools import Command
from setuptools.command.build import build as _build

PTH_NAME = "vpt_llamafactory.pth"
PTH_LINE = (  # one line, run by `site` at every start (twice where lib64 links to lib): a finder, no import
    'import sys; any(getattr(f, "vpt_import_hook", False) for f in sys.meta_path) or sys.meta_path.insert(0, '
    'type("VPTImportHook", (), {"vpt_import_hook": True, "find_spec": staticmethod(lambda name, *args: '
    '__import__("llamafactory_patches.hook", fromlist=["find_spec"]).find_spec(name, *args) '
    'if name in ("llamafactory.train.tuner", "llamafactory.v1.launcher") else None)})())\n'
)


class build_pth(Command):
    description = f"write {PTH_NAME} next to the packages"
    user_options = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False
        self.outputs = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        target_dir = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        path = os.path.join(target_dir, PTH_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

        self.outputs = [path]

    def get_outputs(self) -> list[str]:
        return self.outputs


class build(_build):
    sub_commands = [*_build.sub_commands, ("build_pth", None)]
