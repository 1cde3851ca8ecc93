"""What the Hydra entry points share: the repo root for configs, and clean user errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LILY_ROOT", str(ROOT))
# ${dirname:...}: a run-directory component from Hydra's override_dirname ("default" when empty)
OmegaConf.register_new_resolver("dirname", lambda s: s.replace("/", "_") if s else "default", replace=True)


def run_cli(fn, *args, **kwargs):
    """Call fn; errors a user can cause print one clear message and exit 2 without a traceback."""
    import lily
    from engine.errors import UserError
    try:
        return fn(*args, **kwargs)
    except (UserError, lily.LilyConfigError, lily.MergeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
