"""The top-level name ``kernels``: this folder hands it over to an installed package of that name.

Run from a checkout's root (``python -m pytest``, ``python -m lightning_rl ...``), the root is on ``sys.path`` and
this folder is importable as ``kernels``: the name of Hugging Face's kernels package, which transformers 5.25 and
newer require and import (``from kernels import CUDAProperties, ...``). The folder then hands the name over to the
installed package, so transformers gets what it imports; the library itself imports ``lightning_rl.kernels``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def installed_package_for_top_level_name(name: str, folder: Path) -> ModuleType | None:
    """Load the package ``name`` found on ``sys.path`` outside ``folder``'s parent into ``sys.modules[name]``.

    Returns:
        that package, or None where none is installed (``folder`` then keeps the name).
    """
    root = folder.resolve().parent
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.origin is None or spec.loader is None or Path(spec.origin).resolve().parent == folder:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement that loads this folder returns this module instead
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
