"""Optional dependencies: import on first use, and name the extra to install when one is missing."""
from __future__ import annotations

import importlib
import re
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "17.0.0rc1" -> (17, 0, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def require(module: str, extra: str, feature: str, minimum: str | None = None, why: str = "") -> ModuleType:
    """Import `module` for `feature`; `minimum`: the oldest version that does it right (`why`: what an
    older one gets wrong), since a package the user already has satisfies pip but not the feature."""
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"{feature} needs the '{module}' package, which is not installed: "
                                f"pip install 'lvmae_fast[{extra}]'") from err
    installed = getattr(imported, "__version__", "")
    if minimum and installed and _release(installed) < _release(minimum):
        raise MissingDependency(f"{feature} needs '{module}' >= {minimum}, found {installed}"
                                f"{f' ({why})' if why else ''}: pip install -U 'lvmae_fast[{extra}]'")
    return imported
