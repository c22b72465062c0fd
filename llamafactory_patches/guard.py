"""What the patches may assume about LLaMA-Factory: its version, and each private name they replace or override.

The patches are written against one LLaMA-Factory release (`TESTED_VERSION`). `apply()` refuses another one with a
`PatchError` that says how to get the tested one, unless ``VPT_LLAMAFACTORY_ANY_VERSION=1`` asks to try anyway.

Where LLaMA-Factory has a registry (templates, multimodal plugins, dataset converters, composite models) the
patches register; where it has none, they replace a private name (a module global that a function resolves when it
runs) or override a private method in a subclass. Each patch module lists those names as `Private` entries in
``PRIVATE``; `check_private` checks all of them before anything is changed (the name exists, is still the object
the patch subclasses or wraps, and has the expected parameters), so a release that moved one fails loudly, naming
it, and leaves LLaMA-Factory unpatched.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transformers_vpt.errors import VPTUserError

from .hook import SWITCH_ENV

logger = logging.getLogger(__name__)

TESTED_VERSION = "0.9.5"
"""The LLaMA-Factory release the patches are written and tested against (pinned in constraints.txt)."""
ANY_VERSION_ENV = "VPT_LLAMAFACTORY_ANY_VERSION"
"""``VPT_LLAMAFACTORY_ANY_VERSION=1``: apply the patches to another LLaMA-Factory release (the private names are
still checked)."""
_ON = ("1", "true", "yes", "on")


class PatchError(VPTUserError):
    """LLaMA-Factory is not what the patches were written for: another release, or a private name that moved."""


def installed_version() -> str:
    from llamafactory.extras.env import VERSION

    return VERSION


def check_version(version: str | None = None) -> None:
    """Refuse a LLaMA-Factory release other than `TESTED_VERSION`, unless `ANY_VERSION_ENV` is set."""
    version = installed_version() if version is None else version
    if version == TESTED_VERSION:
        return
    if os.environ.get(ANY_VERSION_ENV, "").strip().lower() in _ON:
        logger.warning(
            f"VPT: applying the LLaMA-Factory patches to llamafactory {version} ({ANY_VERSION_ENV}=1); they are "
            f"tested with {TESTED_VERSION} only"
        )
        return
    raise PatchError(
        f"the VPT patches are written for llamafactory {TESTED_VERSION}, found {version}: install the tested one "
        f"(pip install -c constraints.txt 'llamafactory=={TESTED_VERSION}'), or set {ANY_VERSION_ENV}=1 to try "
        f"{version} anyway, or {SWITCH_ENV}=0 to run LLaMA-Factory without VPT"
    )


@dataclass(frozen=True)
class Private:
    """A private LLaMA-Factory name a patch relies on: ``owner.name`` (a module global or a class attribute).

    Args:
        owner: The module or class that holds the name.
        name: The attribute.
        parameters: The parameter names its signature must have (a function, method or class), in order.
        expected: The object it must still be (what the patch subclasses or wraps): not replaced meanwhile.
        contains: Items it must contain (a list the patch edits in place).
        patch: What relies on it, for the error message.
    """

    owner: Any
    name: str
    parameters: tuple[str, ...] | None = None
    expected: Any = None
    contains: tuple[Any, ...] = ()
    patch: str = ""

    @property
    def qualname(self) -> str:
        owner = getattr(self.owner, "__module__", "") + "." if inspect.isclass(self.owner) else ""
        return f"{owner}{getattr(self.owner, '__qualname__', None) or self.owner.__name__}.{self.name}"

    def problem(self) -> str | None:
        """What is wrong with the name in this LLaMA-Factory (None when it is as expected)."""
        if not hasattr(self.owner, self.name):
            return f"{self.qualname} does not exist"
        value = getattr(self.owner, self.name)
        if self.expected is not None and value is not self.expected:
            return f"{self.qualname} is {value!r}, not {self.expected!r} (replaced by another patch?)"
        if self.parameters is not None:
            try:
                parameters = tuple(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                return f"{self.qualname} has no signature"
            if parameters != self.parameters:
                return f"{self.qualname} takes {parameters}, the patch expects {self.parameters}"
        missing = [item for item in self.contains if item not in value]
        if missing:
            return f"{self.qualname} lacks {[getattr(item, '__name__', item) for item in missing]}"
        return None


def check_private(names: Iterable[Private]) -> None:
    """Raise one `PatchError` listing every name that is not as the patches expect."""
    problems = [
        f"{problem} ({name.patch})" if name.patch else problem
        for name in names
        if (problem := name.problem()) is not None
    ]
    if problems:
        raise PatchError(
            f"llamafactory {installed_version()} differs from what the VPT patches expect (nothing was patched): "
            + "; ".join(problems)
            + f". Install llamafactory=={TESTED_VERSION}, or {SWITCH_ENV}=0 to run LLaMA-Factory without VPT"
        )
