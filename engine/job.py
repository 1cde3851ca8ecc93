"""One job of train.py: claim the run directory, check, train, record the outcome.

``results.json`` always carries ``status``: ``running`` while training, then ``finished``,
``interrupted`` (stopped on purpose or by a preemption signal: re-run to continue) or
``failed`` (with ``message``). It also carries the run's ``identity`` and ``run_id``
(engine/run.py), ``searched`` (the keys the multirun swept) and ``method_id``.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import lily
from data import get_task
from common.errors import UserError
from engine.run import IDENTITY_FILE, RESULTS_FILE, RunLock, claim, identity, read_json, run_id, write_json

log = logging.getLogger(__name__)
USER_ERRORS = (UserError, lily.LilyConfigError, lily.MergeError)


def _summary(results: dict) -> dict:
    return {"status": results.get("status"), "run_dir": results.get("run_dir"), "message": results.get("message"),
            "final_acc": results.get("final_acc")}


def _base(cfg: DictConfig, run_dir: Path, method_id: str | None, searched: list[str]) -> dict:
    ident = identity(cfg)
    task = get_task(cfg.task.name)
    return {"status": "running", "message": None, "run_id": run_id(ident), "run_dir": str(run_dir),
            "identity": ident, "searched": searched, "method_id": method_id or cfg.method.get("name"),
            "method": method_id or cfg.method.get("name"), "task": task.name, "group": task.group,
            "backbone": cfg.backbone.name, "seed": cfg.seed, "protocol": cfg.protocol.name,
            "recipe": cfg.recipe.name, "precision": cfg.precision, "normalization": cfg.normalization,
            "image_size": cfg.image_size, "epochs": cfg.optim.epochs, "batch_size": cfg.batch_size,
            "train_split": cfg.protocol.train_split, "eval_split": cfg.protocol.eval_split,
            "selection": (f"best-of-{cfg.protocol.eval_split} every {cfg.eval_every} epochs"
                          if cfg.protocol.select == "best" else f"final {cfg.protocol.eval_split} accuracy"),
            "threads": torch.get_num_threads()}


def run_job(cfg: DictConfig, run_dir: str | Path, method_id: str | None = None, searched: list[str] | None = None,
            multirun: bool = False) -> dict:
    """Run one configuration in ``run_dir`` (see :func:`_run_job`) holding the directory's lock."""
    try:
        lock = RunLock(Path(run_dir)).__enter__()
    except USER_ERRORS as e:
        if not multirun:
            raise
        return {"status": "failed", "run_dir": str(run_dir), "message": str(e), "final_acc": None}
    try:
        return _run_job(cfg, run_dir, method_id, searched, multirun)
    finally:
        lock.__exit__(None, None, None)


def _run_job(cfg: DictConfig, run_dir: str | Path, method_id: str | None, searched: list[str] | None,
             multirun: bool) -> dict:
    """Run one configuration in ``run_dir``. Returns ``{"status", "run_dir", "message", "final_acc"}``.

    Single run: a user error is raised (the entry point prints it and exits 2). Multirun: any
    failure is recorded in results.json and returned, so the sweep goes on.
    """
    from engine.setup import resolve_device
    from engine.tracking import Tracker
    from engine.trainer import Interrupted, train

    run_dir = Path(run_dir)
    searched = sorted(searched or [])
    try:
        results = _base(cfg, run_dir, method_id, searched)
    except USER_ERRORS as e:
        if not multirun:
            raise
        return {"status": "failed", "run_dir": str(run_dir), "message": str(e), "final_acc": None}
    results_path = run_dir / RESULTS_FILE
    try:  # a directory of another configuration, or an earlier attempt with resume=false: touch nothing
        c = claim(run_dir, results["identity"], results["run_id"], bool(cfg.resume), bool(cfg.get("overwrite")))
    except USER_ERRORS as e:
        if not multirun:
            raise
        return {"status": "failed", "run_dir": str(run_dir), "message": str(e), "final_acc": None}
    tracker = None
    try:
        if c.action == "skip":
            log.info("%s is finished (final %.2f%%): skipped. Use overwrite=true to run it again.",
                     run_dir, c.previous.get("final_acc", float("nan")))
            return dict(_summary(c.previous), status="skipped", run_dir=str(run_dir))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        from engine.preflight import preflight
        preflight(cfg)
        with open_dict(cfg):
            cfg.device_resolved = str(resolve_device(cfg.device))
        results["device"] = cfg.device_resolved
        resumed_from = (c.previous or {}).get("status") if c.action == "resume" else None
        results["attempts"] = int((c.previous or {}).get("attempts", 0)) + 1
        write_json(results_path, results)
        tracker = Tracker(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          name=f"{results['task']}/{results['backbone']}/{results['method_id']}/{results['run_id']}",
                          resume=c.action == "resume")
        started = time.time()
        out = train(cfg, run_dir, tracker, resume=c.action == "resume")
        info, experts = out.pop("info"), out.pop("experts")
        results.update(out)
        results.update(weights=info.get("weights"), pre_logits=bool(info.get("pre_logits", False)),
                       head_init=info.get("head_init"), kernels=info.get("kernels"), resumed=resumed_from,
                       total_seconds=time.time() - started, status="finished", finished=True)
        write_json(run_dir / "experts.json", experts)
        write_json(results_path, results)
        log.info("done: %s %s on %s: final %.2f%%, best %.2f%% (epoch %d); %d trainable params (+%d head); %s",
                 results["method_id"], results["backbone"], results["task"], results["final_acc"],
                 results["best_acc"], results["best_epoch"], results["trainable_params"], results["head_params"],
                 run_dir)
        return _summary(results)
    except Interrupted as e:
        log.warning(str(e))
        results.update(status="interrupted", message=str(e))
        write_json(results_path, results)
        return _summary(results)
    except USER_ERRORS as e:
        results.update(status="failed", message=str(e))
        _record_failure(run_dir, results)
        if not multirun:
            raise
        log.error("failed: %s", e)
        return _summary(results)
    except KeyboardInterrupt:
        results.update(status="interrupted", message="KeyboardInterrupt")
        _record_failure(run_dir, results)
        raise
    except Exception as e:  # a crash: keep the traceback in the log, the sweep goes on
        results.update(status="failed", message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        _record_failure(run_dir, results)
        if not multirun:
            raise
        log.error("crashed: %s\n%s", e, results["traceback"])
        return _summary(results)
    finally:
        if tracker is not None:
            tracker.finish()


def _record_failure(run_dir: Path, results: dict) -> None:
    """Write a failed/interrupted status, never over a finished result nor into another run's directory."""
    path = run_dir / RESULTS_FILE
    previous = read_json(path) or {}
    stored = read_json(run_dir / IDENTITY_FILE) or {}
    if previous.get("status") == "finished" or (stored and stored.get("run_id") != results.get("run_id")):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
