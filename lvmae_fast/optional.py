"""Optional dependencies: import on first use, and name the extra to install when one is missing."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"{feature} needs the '{module}' package, which is not installed: "
                                f"pip install 'lvmae_fast[{extra}]'") from err
