"""lvmae_fast: packed-sequence LV-MAE (long-video masked-embedding autoencoders)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """kernels/ and export/ sit at the repository top level (product layout); setup.py installs them as
    lvmae_fast.kernels / lvmae_fast.export. This finder gives the same names to a source checkout used
    without installing (PYTHONPATH=.), and only for those two names."""

    def __init__(self, root: Path):
        self.dirs = {f"{__name__}.{name}": root / name for name in ("kernels", "export")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


_root = Path(__file__).resolve().parent.parent
if (_root / "setup.py").is_file() and not any(isinstance(f, _CheckoutSubpackages) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutSubpackages(_root))

__all__ = ["LVMAE", "LVMAEConfig", "PackedBatch", "__version__"]
_LAZY = {"LVMAE": "model", "LVMAEConfig": "model", "PackedBatch": "packing"}


def __getattr__(name: str):
    # Imported on first use (PEP 562): `lvmae ...` reaches its Ctrl-C handling before torch loads, so an
    # interrupt during the seconds that takes is one line too, not a traceback.
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
