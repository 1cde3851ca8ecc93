"""Experiment tracking: Weights & Biases (offline unless logged in), or nothing."""
from __future__ import annotations

import logging
import netrc
import os
import uuid

from engine.run import atomic_write

log = logging.getLogger(__name__)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    """``log(metrics, step)`` and ``finish()``; a no-op for ``logger=none``."""

    def __init__(self, cfg_logger, run_dir, config: dict, name: str, resume: bool):
        """``run_dir``: the run's :class:`engine.run.RunDir` (wandb writes below it, its run id in it)."""
        self.run = None
        if cfg_logger.name == "none":
            return
        if cfg_logger.name != "wandb":
            from common.errors import UserError
            raise UserError(f"unknown logger '{cfg_logger.name}'; use logger=wandb or logger=none")
        import wandb

        mode = cfg_logger.get("mode") or os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        id_file = run_dir.wandb_id_path
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
        atomic_write(id_file, lambda tmp: tmp.write_text(run_id))
        self.run = wandb.init(project=cfg_logger.project, entity=cfg_logger.get("entity"), name=name,
                              dir=str(run_dir.path), config=config, mode=mode, id=run_id, resume="allow",
                              tags=list(cfg_logger.get("tags") or []), reinit="finish_previous")
        log.info("wandb: mode=%s run=%s (dir %s)", mode, run_id, run_dir.path)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
