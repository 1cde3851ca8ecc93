"""What the Hydra entry points share: the repo root for configs, the run-directory resolver,
the swept keys of a multirun, and clean user errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LILY_ROOT", str(ROOT))

import engine.run  # noqa: E402,F401  (registers ${run_subdir:} for configs/hydra/default.yaml)


def record_swept_keys(argv: list[str]) -> None:
    """Export the config keys a command-line multirun sweeps (``method.ne=2,4``) as LILY_SWEPT_KEYS,
    so every job (joblib, submitit, Slurm: they inherit the environment) records them in results.json."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    with_value = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in with_value:
            skip = True  # its value is not an override
        elif not a.startswith("-"):
            args.append(a)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return
    keys = [o.key_or_group for o in overrides if o.is_sweep_override() and not o.is_hydra_override()]
    os.environ["LILY_SWEPT_KEYS"] = ",".join(keys)


def fail(message) -> None:
    """Print one clear message and exit 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class OutputGuard(Callback):
    """Hydra callback (configs/hydra/default.yaml): before Hydra creates a run's folder, an output
    path that is a file or is not writable is one clear message and exit 2, not Hydra's traceback."""

    @staticmethod
    def _check(config) -> None:
        from common.errors import UserError
        from engine.run import check_output_dir
        try:
            check_output_dir(config.paths.output_dir)
        except UserError as e:
            fail(e)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config)


def run_cli(fn, *args, **kwargs):
    """Call fn; errors a user can cause print one clear message and exit 2 without a traceback."""
    import lily
    from common.errors import UserError
    try:
        return fn(*args, **kwargs)
    except (UserError, lily.LilyConfigError, lily.MergeError) as e:
        fail(e)
