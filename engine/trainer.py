"""The training loop of one run: handed a model, its data, optimizer and schedule, it trains,
evaluates and reports through callbacks. It knows no file, no config file and no sweep.

A run trains on ``protocol.train_split`` and evaluates on ``protocol.eval_split`` every
``eval_every`` epochs (``protocol.evaluate: every``) or after the last epoch only (``end``).
After every epoch (and when ``should_stop`` answers True mid-epoch) it calls
``checkpoint(state)``; after every evaluation ``on_evaluation(ev, epoch, selected)``
(``selected``: this evaluation is now the one the protocol reports). The job
(engine/job.py) wires these to the run directory's owner (engine/run.py).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import lily
from engine import recipes, step

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The run stopped on purpose before its last epoch (stop_after_epoch, or ``should_stop``)."""


def fresh_state() -> dict:
    """What the loop carries across epochs (and a checkpoint across processes)."""
    return {"epoch": 0, "step": 0, "lr": None, "loss_sum": 0.0, "images": 0, "history": [], "experts": [], "lrs": [],
            "train_seconds": 0.0, "train_images": 0, "eval_seconds": 0.0, "eval_images": 0}


def evaluate(model, data, cfg, device, desc: str, predictions: bool = False) -> dict:
    """Top-1 accuracy, throughput and the mean per-layer expert weights over ``data`` (engine/step.py)."""
    return step.evaluate(model, data, batch_size=cfg.eval_batch_size, device=device, normalization=cfg.normalization,
                         precision=cfg.precision, progress_desc=desc if cfg.progress else None,
                         predictions=predictions)


def make_optimizer(model, cfg: DictConfig, steps_per_epoch: int | None = None):
    """AdamW (timm) over the trainable parameters and the cosine schedule (timm), per the recipe;
    ``optim.schedule: iteration_warmup_epoch_cosine`` (recipe=mambapeft): MambaPEFT's AdamW with its
    per-parameter decay rules and per-iteration warm-up (engine/recipes.py)."""
    o = cfg.optim
    if o.get("schedule") == "iteration_warmup_epoch_cosine":
        optimizer = recipes.make_adamw(model, o, cfg.method.get("name"))
        return optimizer, recipes.IterationSchedule(optimizer, o, max(1, int(steps_per_epoch or 1)))
    lr = o.lr * cfg.batch_size / o.lr_base_batch if o.get("lr_base_batch") else o.lr
    optimizer = create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay,
                                    filter_bias_and_bn=bool(o.no_decay_1d))
    scheduler = CosineLRScheduler(optimizer, t_initial=o.epochs, lr_min=o.min_lr, warmup_t=o.warmup_epochs,
                                  warmup_lr_init=o.warmup_lr, t_in_epochs=True)
    return optimizer, scheduler


def step_scheduler(scheduler, epoch: int, lag: int) -> None:
    """After (0-based) epoch ``epoch``. lag 1 (the released code): ``step(epoch)``, so epoch e >= 1
    trains at the schedule's value for e - 1; lag 0: ``step(epoch + 1)``, epoch e at value(e)."""
    scheduler.step(epoch + 1 - lag)


def _never() -> bool:
    return False


def train(model, optimizer, scheduler, train_data, eval_data, cfg: DictConfig, device, *, state: dict | None = None,
          should_stop: Callable[[], bool] = _never, checkpoint: Callable[[dict], None] | None = None,
          on_evaluation: Callable[[dict, int, bool], None] | None = None,
          log_metrics: Callable[[dict, int], None] | None = None) -> dict:
    """Train ``model`` from ``state`` (a resumed checkpoint's, or a fresh one) to ``optim.epochs``.

    ``cfg`` gives the loop's numbers (optim.epochs, batch sizes, eval_every, protocol, precision,
    normalization, seed, recipe.scheduler_lag, max_train_steps, stop_after_epoch, progress).
    Raises :class:`Interrupted` after a checkpoint when ``should_stop()`` or ``stop_after_epoch``
    ends the run early. Returns the results (accuracies, history, timings, parameter counts).
    """
    o, p = cfg.optim, cfg.protocol
    device = torch.device(device)
    state = {k: (state or {}).get(k, v) for k, v in fresh_state().items()}
    lag = int(cfg.recipe.scheduler_lag)
    save = checkpoint or (lambda s: None)
    best = max((h["acc"] for h in state["history"]), default=None)
    steps_per_epoch = len(train_data.labels) // cfg.batch_size
    if cfg.get("max_train_steps"):
        steps_per_epoch = min(steps_per_epoch, int(cfg.max_train_steps))
    for epoch in range(state["epoch"], o.epochs):
        if state["step"] == 0:
            state["lr"] = optimizer.param_groups[0]["lr"]
        lr_now = state["lr"]
        ep = step.train_epoch(model, optimizer, train_data, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                              device=device, normalization=cfg.normalization, precision=cfg.precision,
                              start_step=state["step"], max_steps=cfg.max_train_steps, should_stop=should_stop,
                              before_step=recipes.before_step(model, scheduler, o, epoch, steps_per_epoch),
                              progress_desc=f"epoch {epoch + 1}/{o.epochs}" if cfg.progress else None)
        state["train_seconds"] += ep["seconds"]
        state["train_images"] += ep["images"]
        if not ep["completed"]:  # a stop request mid-epoch: save the position in the epoch and stop
            state.update(step=ep["next_step"], loss_sum=state["loss_sum"] + ep["loss_sum"],
                         images=state["images"] + ep["images"])
            save(state)
            raise Interrupted(f"preempted in epoch {epoch + 1} after step {ep['next_step']} (checkpoint written; "
                              "running the same configuration again continues from there)")
        n_seen = state["images"] + ep["images"]
        train_loss = (state["loss_sum"] + ep["loss_sum"]) / max(n_seen, 1)
        state.update(step=0, loss_sum=0.0, images=0)
        state["lrs"].append(lr_now)
        step_scheduler(scheduler, epoch, lag)
        state["epoch"] = epoch + 1
        metrics = {"train_loss": train_loss, "lr": lr_now, "epoch": epoch + 1}
        last = epoch + 1 == o.epochs
        due = bool(cfg.eval_every) and (epoch + 1) % cfg.eval_every == 0 and p.evaluate == "every"
        if due or last:
            ev = evaluate(model, eval_data, cfg, device, f"eval {p.eval_split}", predictions=on_evaluation is not None)
            state["eval_seconds"] += ev["seconds"]
            state["eval_images"] += ev["images"]
            state["history"].append({"epoch": epoch + 1, "split": p.eval_split, "acc": ev["acc"]})
            state["experts"].append({"epoch": epoch + 1, "split": p.eval_split, "weights": ev["experts"]})
            # the reported evaluation: the first best (ties keep the earlier epoch) or the last one
            selected = (best is None or ev["acc"] > best) if p.select == "best" else last
            best = ev["acc"] if best is None else max(best, ev["acc"])
            if on_evaluation is not None:
                on_evaluation(ev, epoch + 1, selected)
            metrics[f"{p.eval_split}_acc"] = ev["acc"]
            for kind, rows in ev["experts"].items():
                for layer, row in enumerate(rows):
                    metrics.update({f"experts/{kind}/layer{layer:02d}/e{e}": w for e, w in enumerate(row)})
            log.info("epoch %d/%d  %s acc %.2f%%  (loss %.4f, lr %.2e, %.0f img/s eval)", epoch + 1, o.epochs,
                     p.eval_split, ev["acc"], train_loss, lr_now, ev["images_per_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  lr %.2e", epoch + 1, o.epochs, train_loss, lr_now)
        save(state)
        if log_metrics is not None:
            log_metrics(metrics, epoch + 1)
        if not last and (should_stop() or
                         (cfg.get("stop_after_epoch") is not None and epoch + 1 >= cfg.stop_after_epoch)):
            raise Interrupted(f"stopped after epoch {epoch + 1} (checkpoint written; re-run the same command to continue)")
    accs = [h["acc"] for h in state["history"]]
    best_i = max(range(len(accs)), key=accs.__getitem__)
    return {"history": state["history"], "experts": state["experts"],
            "lrs": state["lrs"], "final_acc": accs[-1], "best_acc": accs[best_i],
            "best_epoch": state["history"][best_i]["epoch"],
            "acc": accs[best_i] if p.select == "best" else accs[-1],
            "train_seconds": state["train_seconds"], "eval_seconds": state["eval_seconds"],
            "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
            "eval_images_per_s": state["eval_images"] / max(state["eval_seconds"], 1e-9),
            "trainable_params": lily.count_parameters(model), "head_params": lily.head_parameters(model)}
