"""Load an ``experiments/*.py`` script as a module (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` executed as the module ``name`` (registered in
    ``sys.modules``, where dataclasses look their module up); ``experiments/`` goes on
    ``sys.path`` first, so that the scripts' imports of each other resolve."""
    if EXP not in sys.path:
        sys.path.insert(0, EXP)
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXP, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
