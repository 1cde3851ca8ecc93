"""Evaluate a finished (or interrupted) run directory's checkpoint on a chosen split."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

import lily
from data import get_task
from common.errors import UserError
from engine.setup import build_model, load_task_split, resolve_device, seed_everything
from engine.step import configure_backend
from engine.run import write_json
from engine.trainer import CHECKPOINT, evaluate

log = logging.getLogger(__name__)


def eval_path(run_dir: Path, split: str, precision: str, merged: bool) -> Path:
    """``eval-<split>-<precision>[-merged].json`` in the run directory; an earlier file of the same
    name is kept and the new one numbered (``...-2.json``): no result is overwritten."""
    stem = f"eval-{split}-{precision}{'-merged' if merged else ''}"
    path, n = run_dir / f"{stem}.json", 2
    while path.exists():
        path, n = run_dir / f"{stem}-{n}.json", n + 1
    return path


def evaluate_run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    cfg_path, ckpt = run_dir / "config.yaml", run_dir / CHECKPOINT
    for p in (cfg_path, ckpt):
        if not p.exists():
            raise UserError(f"{p} not found: run_dir must be a run directory written by train.py "
                            f"(it holds config.yaml and {CHECKPOINT})")
    run_cfg = OmegaConf.load(cfg_path)
    with open_dict(run_cfg):
        run_cfg.update(device=cfg.device, precision=cfg.precision or run_cfg.precision,
                       eval_batch_size=cfg.eval_batch_size, progress=cfg.progress)
    device = resolve_device(cfg.device)
    configure_backend(device, run_cfg.precision, run_cfg.get("tf32", True))
    seed_everything(run_cfg.seed)
    task = get_task(run_cfg.task.name)
    model, _ = build_model(run_cfg, task.num_classes, device)
    lily.load_trainable(model, ckpt)
    if cfg.merge:
        lily.merge(model)
    data = load_task_split(run_cfg, cfg.split)
    ev = evaluate(model, data, run_cfg, device, f"eval {task.name}/{cfg.split}")
    out = {"run_dir": str(run_dir), "task": task.name, "split": cfg.split, "merged": bool(cfg.merge),
           "acc": ev["acc"], "images": ev["images"], "seconds": ev["seconds"], "images_per_s": ev["images_per_s"],
           "device": str(device), "precision": run_cfg.precision}
    results = run_dir / "results.json"
    if results.exists():
        out["run_final_acc"] = json.loads(results.read_text()).get("final_acc")
    path = eval_path(run_dir, cfg.split, out["precision"], bool(cfg.merge))
    write_json(path, out)
    print(f"{task.name}/{cfg.split}: acc {ev['acc']:.2f}% on {ev['images']} images, "
          f"{ev['images_per_s']:.0f} images/s{' (merged)' if cfg.merge else ''} -> {path}")
    return out
