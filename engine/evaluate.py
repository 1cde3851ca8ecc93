"""Evaluate a run directory's checkpoint on a chosen split (eval.py).

Writes ``eval-<split>-<precision>[-merged].json`` and the per-sample predictions of the same
stem (``.npz``) through the run directory's owner; an earlier evaluation is never overwritten.
A run that is not finished (interrupted, failed, still running) is evaluated with a warning,
and its status and the checkpoint's epoch are recorded in the JSON; ``require_finished=true``
refuses it instead.
"""
from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, open_dict

import lily
from common.errors import UserError
from data import get_task
from engine.run import FINISHED, RunDir
from engine.setup import build_model, load_task_split, resolve_device, seed_everything, split_files
from engine.step import configure_backend
from engine.trainer import evaluate

log = logging.getLogger(__name__)


def evaluate_run(cfg: DictConfig) -> dict:
    rd = RunDir(cfg.run_dir)
    run_cfg = rd.config()  # a UserError when this is not a run directory
    status = rd.status() or f"unknown (no {rd.results_path.name})"
    payload = rd.read_checkpoint()  # a CorruptRun naming the file, with the way out
    epoch = (payload.get("extra") or {}).get("epoch")
    epochs = run_cfg.optim.epochs
    if status != FINISHED:
        what = (f"{rd.path} is not a finished run (status {status}; its checkpoint is at epoch {epoch} of {epochs})")
        if cfg.get("require_finished"):
            raise UserError(f"{what}; finish it by re-running its train.py command, or drop require_finished=true")
        print(f"warning: {what}: evaluating it anyway (require_finished=true refuses)", file=sys.stderr, flush=True)
    with open_dict(run_cfg):
        run_cfg.update(device=cfg.device, precision=cfg.precision or run_cfg.precision,
                       eval_batch_size=cfg.eval_batch_size, progress=cfg.progress)
    device = resolve_device(cfg.device)
    configure_backend(device, run_cfg.precision, run_cfg.get("tf32", True))
    seed_everything(run_cfg.seed)
    task = get_task(run_cfg.task.name)
    model, _ = build_model(run_cfg, task.num_classes, device)
    rd.load_checkpoint(model)
    if cfg.merge:
        lily.merge(model)
    data = load_task_split(run_cfg, cfg.split, task)
    files = split_files(run_cfg, cfg.split, task)
    ev = evaluate(model, data, run_cfg, device, f"eval {task.name}/{cfg.split}", predictions=True)
    out = {"run_dir": str(rd.path), "task": task.name, "split": cfg.split, "merged": bool(cfg.merge),
           "acc": ev["acc"], "images": ev["images"], "seconds": ev["seconds"], "images_per_s": ev["images_per_s"],
           "device": str(device), "precision": run_cfg.precision, "run_status": status, "checkpoint_epoch": epoch,
           "epochs": epochs, "run_final_acc": (rd.results() or {}).get("final_acc")}
    stem = rd.eval_stem(cfg.split, out["precision"], bool(cfg.merge))
    path = rd.write_evaluation(stem, out, ev, files, epoch)
    print(f"{task.name}/{cfg.split}: acc {ev['acc']:.2f}% on {ev['images']} images, "
          f"{ev['images_per_s']:.0f} images/s{' (merged)' if cfg.merge else ''} -> {path}")
    return out
