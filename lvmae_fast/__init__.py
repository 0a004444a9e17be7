"""lvmae_fast: packed-sequence LV-MAE (long-video masked-embedding autoencoders)."""
from __future__ import annotations

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

from .model import LVMAE, LVMAEConfig  # noqa: E402
from .packing import PackedBatch  # noqa: E402

__all__ = ["LVMAE", "LVMAEConfig", "PackedBatch", "__version__"]
