"""One job of train.py, start to end, in the order a reader follows it:

    config -> preflight (seconds; a refused run leaves no directory) -> claim the run directory
    -> build the model once, load the data -> train (engine/trainer.py, a loop) -> results.json

The run directory is owned by :class:`engine.run.RunDir`: this module never spells a file name
or a status. ``results.json`` carries ``status`` (running, then finished, interrupted or failed
with ``message``), the run's ``identity`` and ``run_id``, ``searched`` (the keys the multirun
swept), ``method_id`` and ``data_digest`` (the task copy the run read).
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import lily
from common.errors import UserError
from common.resolvers import per_task_keys
from data import get_task
from engine.run import FAILED, FINAL, NOT_IDENTITY, SELECTED, SKIPPED, RunDir, identity, run_id

log = logging.getLogger(__name__)
USER_ERRORS = (UserError, lily.LilyConfigError, lily.MergeError)


def _summary(results: dict) -> dict:
    """What a job returns (and the sweep ledger records)."""
    return {"status": results.get("status"), "run_dir": results.get("run_dir"), "message": results.get("message"),
            "final_acc": results.get("final_acc"), "remedy": results.get("remedy")}


def _base(cfg: DictConfig, task, run_dir: Path, method_id: str | None, searched: list[str]) -> dict:
    ident = identity(cfg)
    return {"message": None, "run_id": run_id(ident), "run_dir": str(run_dir),
            "identity": ident, "searched": searched, "method_id": method_id or cfg.method.get("name"),
            "per_task": per_task_keys(OmegaConf.to_container(cfg, resolve=False), skip=NOT_IDENTITY),
            "method": method_id or cfg.method.get("name"), "task": task.name, "group": task.group,
            "backbone": cfg.backbone.name, "seed": cfg.seed, "protocol": cfg.protocol.name,
            "recipe": cfg.recipe.name, "precision": cfg.precision, "normalization": cfg.normalization,
            "image_size": cfg.image_size, "epochs": cfg.optim.epochs, "batch_size": cfg.batch_size,
            "train_split": cfg.protocol.train_split, "eval_split": cfg.protocol.eval_split,
            "select": cfg.protocol.select,
            "selection": (f"best-of-{cfg.protocol.eval_split} every {cfg.eval_every} epochs"
                          if cfg.protocol.select == "best" else f"final {cfg.protocol.eval_split} accuracy"),
            "threads": torch.get_num_threads()}


def run_job(cfg: DictConfig, run_dir: str | Path, method_id: str | None = None, searched: list[str] | None = None,
            multirun: bool = False, should_stop=None) -> dict:
    """Run one configuration in ``run_dir``. Returns ``{"status", "run_dir", "message", "final_acc", "remedy"}``.

    A user error is raised once, where it is detected. A single run lets it through (the entry
    point prints it and exits 2); a multirun records it and returns, so the sweep goes on.
    ``should_stop``: polled by the trainer (the sweep layer's preemption flag).
    """
    rd = RunDir(run_dir)
    try:
        return _run_job(cfg, rd, method_id, sorted(searched or []), should_stop, multirun)
    except USER_ERRORS as e:
        if not multirun:
            raise
        log.error("failed: %s", e)
        return {"status": FAILED, "run_dir": str(rd.path), "message": str(e), "final_acc": None,
                "remedy": getattr(e, "remedy", None)}
    except Exception as e:  # a crash in a multirun: recorded (results.json, log), the sweep goes on
        if not multirun:
            raise
        log.error("crashed: %s\n%s", e, traceback.format_exc())
        return {"status": FAILED, "run_dir": str(rd.path), "message": f"{type(e).__name__}: {e}", "final_acc": None,
                "remedy": None}


def _run_job(cfg: DictConfig, rd: RunDir, method_id: str | None, searched: list[str], should_stop,
             multirun: bool) -> dict:
    from engine.preflight import preflight
    with rd.lock():  # another process on this configuration: refused before anything is touched
        fresh = rd.identity() is None  # no attempt before this one: a refused run leaves no directory
        task = get_task(cfg.task.name)
        results = _base(cfg, task, rd.path, method_id, searched)
        c = rd.claim(results["run_id"], bool(cfg.resume), bool(cfg.get("overwrite")))  # refusals change nothing
        if c.action == "skip":
            log.info("%s is finished (final %.2f%%): skipped. Use overwrite=true to run it again.",
                     rd.path, c.previous.get("final_acc", float("nan")))
            return dict(_summary(c.previous), status=SKIPPED, run_dir=str(rd.path))
        try:
            preflight(cfg, task=task)
        except USER_ERRORS as e:
            if multirun:  # the sweep's record of the refusal (its summary, the results layer's "not used")
                rd.refuse(results, str(e))
            elif fresh:  # a single run refused before it began: no directory is left behind
                rd.discard()
            raise
        return _train(cfg, task, rd, c, results, should_stop)


def _train(cfg: DictConfig, task, rd: RunDir, c, results: dict, should_stop) -> dict:
    from engine.setup import build_model, data_digest, load_task_split, resolve_device, seed_everything, split_files
    from engine.step import configure_backend, to_device
    from engine.tracking import Tracker
    from engine.trainer import Interrupted, make_optimizer, train

    p = cfg.protocol
    device = resolve_device(cfg.device)
    with open_dict(cfg):
        cfg.device_resolved = str(device)
    results.update(device=str(device), attempts=int((c.previous or {}).get("attempts", 0)) + 1,
                   resumed=(c.previous or {}).get("status") if c.action == "resume" else None)
    rd.begin(c, results["identity"], results["run_id"], cfg, results)
    tracker = None
    try:
        started = time.time()
        configure_backend(device, cfg.precision, cfg.tf32)
        seed_everything(cfg.seed)
        model, info = build_model(cfg, task.num_classes, device)  # the run's one model
        train_data, eval_data = (load_task_split(cfg, s, task) for s in (p.train_split, p.eval_split))
        files = split_files(cfg, p.eval_split, task)
        results.update(data={d.split: {"images": len(d.labels), "decoded": d.decoded, "cache": d.cache_path}
                             for d in (train_data, eval_data)}, data_digest=data_digest(cfg, task))
        if cfg.get("data_on_device", "auto") not in (False, None):
            train_data, eval_data = (to_device(d, device, DATA_ON_DEVICE_MAX) for d in (train_data, eval_data))
        optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=len(train_data.labels) // cfg.batch_size)
        state = None
        if c.action == "resume" and rd.has_checkpoint():
            state = rd.load_checkpoint(model, optimizer, scheduler, device)
            log.info("resumed from %s at epoch %d", rd.checkpoint_path, state.get("epoch", 0))
        tracker = Tracker(cfg.logger, rd, OmegaConf.to_container(cfg, resolve=True),
                          name=f"{results['task']}/{results['backbone']}/{results['method_id']}/{results['run_id']}",
                          resume=c.action == "resume")

        def on_evaluation(ev: dict, epoch: int, selected: bool) -> None:
            rd.save_predictions(FINAL, ev, files, epoch, p.eval_split)
            if selected and p.select == "best":
                rd.save_predictions(SELECTED, ev, files, epoch, p.eval_split)

        out = train(model, optimizer, scheduler, train_data, eval_data, cfg, device, state=state,
                    should_stop=should_stop or (lambda: False),
                    checkpoint=lambda s: rd.save_checkpoint(model, optimizer, scheduler, s, device),
                    on_evaluation=on_evaluation, log_metrics=tracker.log)
        experts = out.pop("experts")
        results.update(out)
        results.update(weights=info.get("weights"), pre_logits=bool(info.get("pre_logits", False)),
                       head_init=info.get("head_init"), kernels=info.get("kernels"),
                       total_seconds=time.time() - started)
        rd.finish(results, experts)
        log.info("done: %s %s on %s: final %.2f%%, best %.2f%% (epoch %d); %d trainable params (+%d head); %s",
                 results["method_id"], results["backbone"], results["task"], results["final_acc"],
                 results["best_acc"], results["best_epoch"], results["trainable_params"], results["head_params"],
                 rd.path)
        return _summary(results)
    except Interrupted as e:
        log.warning(str(e))
        return _summary(rd.interrupt(results, str(e)))
    except USER_ERRORS as e:
        rd.fail(results, str(e), remedy=getattr(e, "remedy", None))
        raise
    except KeyboardInterrupt:
        rd.interrupt(results, "KeyboardInterrupt")
        raise
    except Exception as e:  # a crash: the traceback goes to results.json and the log, then up
        rd.fail(results, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        if tracker is not None:
            tracker.finish()


DATA_ON_DEVICE_MAX = 4 << 30  # data_on_device=auto: a split stays on the GPU up to this many bytes
