"""What several test files share."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def count_params_script():
    """scripts/count_params.py as a module (its ``count(cfg)`` is what the command prints)."""
    spec = importlib.util.spec_from_file_location("count_params_script", ROOT / "scripts" / "count_params.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
