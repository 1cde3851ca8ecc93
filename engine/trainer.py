"""The training loop and evaluation of one run (its directory and life cycle: engine/run.py).

A run trains on ``protocol.train_split`` and evaluates on ``protocol.eval_split`` every
``eval_every`` epochs (``protocol.evaluate: every``) or after the last epoch only
(``end``). It writes into its run directory: ``checkpoint.pt`` (trainable weights +
optimizer/scheduler/RNG state, atomically, after every epoch and when a preemption signal
arrives), ``results.json`` and ``experts.json`` (per-layer expert weights at every evaluation).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import lily
from engine import step
from common.errors import UserError
from engine.setup import build_model, load_task_split, seed_everything

DATA_ON_DEVICE_MAX = 4 << 30  # data_on_device=auto: a split stays on the GPU up to this many bytes

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class Interrupted(Exception):
    """The run stopped on purpose before its last epoch (stop_after_epoch, or a preemption signal)."""


def _preemption_requested() -> bool:
    try:
        from engine.sweep import preemption_requested
    except ImportError:
        return False
    return preemption_requested()


def evaluate(model, data, cfg, device, desc: str) -> dict:
    """Top-1 accuracy, throughput and the mean per-layer expert weights over ``data`` (engine/step.py)."""
    return step.evaluate(model, data, batch_size=cfg.eval_batch_size, device=device, normalization=cfg.normalization,
                         precision=cfg.precision, progress_desc=desc if cfg.progress else None)


def make_optimizer(model, cfg: DictConfig):
    """AdamW (timm) over the trainable parameters and the cosine schedule (timm), per the recipe."""
    o = cfg.optim
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


def train(cfg: DictConfig, run_dir: Path, tracker, resume: bool) -> dict:
    """Train one configuration; returns the results (without identity/status fields)."""
    o, p = cfg.optim, cfg.protocol
    device = torch.device(cfg.device_resolved)
    step.configure_backend(device, cfg.precision, cfg.tf32)
    seed_everything(cfg.seed)
    from data import get_task
    task = get_task(cfg.task.name)
    model, info = build_model(cfg, task.num_classes, device)
    train_data = load_task_split(cfg, p.train_split)
    eval_data = load_task_split(cfg, p.eval_split)
    data_info = {d.split: {"images": len(d.labels), "decoded": d.decoded, "cache": d.cache_path}
                 for d in (train_data, eval_data)}
    if cfg.get("data_on_device", "auto") not in (False, None):
        train_data, eval_data = (step.to_device(d, device, DATA_ON_DEVICE_MAX) for d in (train_data, eval_data))
    if len(train_data.labels) < cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the {len(train_data.labels)} training images of "
                        f"{task.name}/{p.train_split} (drop_last=True leaves no step)")
    optimizer, scheduler = make_optimizer(model, cfg)
    lag = int(cfg.recipe.scheduler_lag)
    ckpt_path = run_dir / CHECKPOINT
    state = {"epoch": 0, "step": 0, "lr": None, "loss_sum": 0.0, "images": 0, "history": [], "experts": [], "lrs": [],
             "train_seconds": 0.0, "train_images": 0, "eval_seconds": 0.0, "eval_images": 0}
    if resume and ckpt_path.exists():
        payload = lily.read_trainable(ckpt_path)
        lily.load_trainable(model, payload)
        extra = payload["extra"]
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng_cpu"])
        if device.type == "cuda" and extra.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(extra["rng_cuda"], device)
        state = {k: extra.get(k, v) for k, v in state.items()}
        log.info("resumed from %s at epoch %d", ckpt_path, state["epoch"])

    def checkpoint():
        extra = dict(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        lily.save_trainable(model, ckpt_path, extra=extra)

    for epoch in range(state["epoch"], o.epochs):
        if state["step"] == 0:
            state["lr"] = optimizer.param_groups[0]["lr"]
        lr_now = state["lr"]
        ep = step.train_epoch(model, optimizer, train_data, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                              device=device, normalization=cfg.normalization, precision=cfg.precision,
                              start_step=state["step"], max_steps=cfg.max_train_steps,
                              should_stop=_preemption_requested,
                              progress_desc=f"epoch {epoch + 1}/{o.epochs}" if cfg.progress else None)
        state["train_seconds"] += ep["seconds"]
        state["train_images"] += ep["images"]
        if not ep["completed"]:  # a preemption signal mid-epoch: save the position in the epoch and stop
            state.update(step=ep["next_step"], loss_sum=state["loss_sum"] + ep["loss_sum"],
                         images=state["images"] + ep["images"])
            checkpoint()
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
            ev = evaluate(model, eval_data, cfg, device, f"eval {p.eval_split}")
            state["eval_seconds"] += ev["seconds"]
            state["eval_images"] += ev["images"]
            state["history"].append({"epoch": epoch + 1, "split": p.eval_split, "acc": ev["acc"]})
            state["experts"].append({"epoch": epoch + 1, "split": p.eval_split, "weights": ev["experts"]})
            metrics[f"{p.eval_split}_acc"] = ev["acc"]
            for kind, rows in ev["experts"].items():
                for layer, row in enumerate(rows):
                    metrics.update({f"experts/{kind}/layer{layer:02d}/e{e}": w for e, w in enumerate(row)})
            log.info("epoch %d/%d  %s acc %.2f%%  (loss %.4f, lr %.2e, %.0f img/s eval)", epoch + 1, o.epochs,
                     p.eval_split, ev["acc"], train_loss, lr_now, ev["images_per_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  lr %.2e", epoch + 1, o.epochs, train_loss, lr_now)
        checkpoint()
        tracker.log(metrics, step=epoch + 1)
        if not last and (_preemption_requested() or
                         (cfg.get("stop_after_epoch") is not None and epoch + 1 >= cfg.stop_after_epoch)):
            raise Interrupted(f"stopped after epoch {epoch + 1} (checkpoint written; re-run the same command to continue)")
    accs = [h["acc"] for h in state["history"]]
    best = max(range(len(accs)), key=accs.__getitem__)
    return {"info": info, "data": data_info, "history": state["history"], "experts": state["experts"],
            "lrs": state["lrs"], "final_acc": accs[-1], "best_acc": accs[best],
            "best_epoch": state["history"][best]["epoch"],
            "acc": accs[best] if p.select == "best" else accs[-1],
            "train_seconds": state["train_seconds"], "eval_seconds": state["eval_seconds"],
            "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
            "eval_images_per_s": state["eval_images"] / max(state["eval_seconds"], 1e-9),
            "trainable_params": lily.count_parameters(model), "head_params": lily.head_parameters(model)}
