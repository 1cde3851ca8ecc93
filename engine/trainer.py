"""The training loop and the run directory.

A run directory holds: ``config.yaml`` (resolved), ``checkpoint.pt`` (trainable weights
+ optimizer/scheduler/RNG state, written atomically at every evaluation),
``results.json``, ``experts.json`` (per-layer expert weights at every evaluation), and
Hydra's ``train.log``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

import lily
from data import SplitData, batches, get_task, normalize
from engine.errors import UserError
from engine.setup import (autocast, build_model, load_task_split, method_config, precision_name,
                          resolve_device, seed_everything)
from engine.tracking import Tracker

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@torch.inference_mode()
def evaluate(model, data: SplitData, cfg, device, desc: str) -> dict:
    """Top-1 accuracy, throughput and the mean per-layer expert weights over ``data``."""
    model.eval()
    correct, seen, experts = 0, 0, {}
    start = time.perf_counter()
    for images, labels in batches(data, cfg.eval_batch_size, shuffle=False, drop_last=False, seed=0,
                                  progress_desc=desc if cfg.progress else None):
        x = normalize(images.to(device, non_blocking=True), cfg.normalization)
        with autocast(device, cfg.precision):
            logits = model(x)
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        seen += len(labels)
        for kind, w in lily.expert_weights(model).items():
            experts[kind] = experts.get(kind, 0) + w * len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"acc": 100.0 * correct / max(seen, 1), "images": seen, "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9),
            "experts": {k: (v / max(seen, 1)).tolist() for k, v in experts.items()}}


class Phase:
    """Train one model on one split, evaluating on another every ``eval_every`` epochs."""

    def __init__(self, cfg: DictConfig, run_dir: Path, name: str, train_split: str, eval_split: str,
                 eval_every: int, device, tracker: Tracker, step_offset: int = 0):
        self.cfg, self.run_dir, self.name, self.device, self.tracker = cfg, run_dir, name, device, tracker
        self.step_offset = step_offset  # W&B steps keep increasing across phases
        self.train_split, self.eval_split, self.eval_every = train_split, eval_split, eval_every
        self.ckpt_path = run_dir / (CHECKPOINT if name == "final" else f"checkpoint-{name}.pt")

    def run(self, num_classes: int, resume: bool) -> dict:
        cfg, o = self.cfg, self.cfg.optim
        seed_everything(cfg.seed)
        model, info = build_model(cfg, num_classes, self.device)  # first: a method/backbone mismatch stops early
        train_data = load_task_split(cfg, self.train_split)
        eval_data = load_task_split(cfg, self.eval_split)
        self.data = {d.split: {"images": len(d.labels), "decoded": d.decoded, "cache": d.cache_path}
                     for d in (train_data, eval_data)}
        lr = o.lr * cfg.batch_size / o.lr_base_batch if o.get("lr_base_batch") else o.lr
        optimizer = create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay,
                                        filter_bias_and_bn=o.no_decay_1d)
        scheduler = CosineLRScheduler(optimizer, t_initial=o.epochs, lr_min=o.min_lr, warmup_t=o.warmup_epochs,
                                      warmup_lr_init=o.warmup_lr, t_in_epochs=True)
        state = {"epoch": 0, "history": [], "experts": [], "train_seconds": 0.0, "train_images": 0,
                 "eval_seconds": 0.0, "eval_images": 0}
        if resume and self.ckpt_path.exists():
            payload = lily.read_trainable(self.ckpt_path)
            lily.load_trainable(model, payload)
            extra = payload["extra"]
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            torch.set_rng_state(extra["rng_cpu"])
            if self.device.type == "cuda" and extra.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(extra["rng_cuda"], self.device)
            state = {k: extra[k] for k in state}
            log.info("[%s] resumed from %s at epoch %d", self.name, self.ckpt_path, state["epoch"])
        elif resume:
            log.warning("[%s] resume=true but %s does not exist: starting from scratch", self.name, self.ckpt_path)

        n_train = len(train_data.labels)
        if n_train < cfg.batch_size:
            raise UserError(f"batch_size={cfg.batch_size} is larger than the {n_train} training images of "
                            f"{train_data.task.name}/{self.train_split} (drop_last=True leaves no step)")
        for epoch in range(state["epoch"], o.epochs):
            model.train()
            start, total_loss, n_seen = time.perf_counter(), 0.0, 0
            it = batches(train_data, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, epoch=epoch)
            bar = tqdm(it, total=len(it), desc=f"[{self.name}] epoch {epoch + 1}/{o.epochs}", leave=False,
                       disable=not cfg.progress, unit="batch")
            for step, (images, labels) in enumerate(bar):
                if cfg.max_train_steps is not None and step >= cfg.max_train_steps:
                    break
                x = normalize(images.to(self.device, non_blocking=True), cfg.normalization)
                y = labels.to(self.device, non_blocking=True)
                with autocast(self.device, cfg.precision):
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(y)
                n_seen += len(y)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            state["train_seconds"] += time.perf_counter() - start
            state["train_images"] += n_seen
            scheduler.step(epoch + 1)
            state["epoch"] = epoch + 1
            metrics = {f"{self.name}/train_loss": total_loss / max(n_seen, 1),
                       f"{self.name}/lr": optimizer.param_groups[0]["lr"], "epoch": epoch + 1}
            last = epoch + 1 == o.epochs
            if (self.eval_every and (epoch + 1) % self.eval_every == 0) or last:
                ev = evaluate(model, eval_data, cfg, self.device, f"[{self.name}] eval {self.eval_split}")
                state["eval_seconds"] += ev["seconds"]
                state["eval_images"] += ev["images"]
                state["history"].append({"epoch": epoch + 1, "split": self.eval_split, "acc": ev["acc"]})
                state["experts"].append({"epoch": epoch + 1, "split": self.eval_split, "weights": ev["experts"]})
                metrics[f"{self.name}/{self.eval_split}_acc"] = ev["acc"]
                for kind, rows in ev["experts"].items():
                    for layer, row in enumerate(rows):
                        metrics.update({f"experts/{kind}/layer{layer:02d}/e{e}": w for e, w in enumerate(row)})
                log.info("[%s] epoch %d/%d  %s acc %.2f%%  (loss %.4f, %.0f img/s eval)", self.name, epoch + 1,
                         o.epochs, self.eval_split, ev["acc"], metrics[f"{self.name}/train_loss"], ev["images_per_s"])
                self._checkpoint(model, optimizer, scheduler, state)
            self.tracker.log(metrics, step=self.step_offset + epoch + 1)
            if cfg.get("stop_after_epoch") is not None and epoch + 1 >= cfg.stop_after_epoch and not last:
                raise Interrupted(f"stop_after_epoch={cfg.stop_after_epoch}: stopped after epoch {epoch + 1} "
                                  f"(continue with resume=true)")
        accs = [h["acc"] for h in state["history"]]
        best = max(range(len(accs)), key=accs.__getitem__)
        return {"info": info, "data": self.data, "history": state["history"], "experts": state["experts"], "final_acc": accs[-1],
                "best_acc": accs[best], "best_epoch": state["history"][best]["epoch"],
                "train_seconds": state["train_seconds"], "eval_seconds": state["eval_seconds"],
                "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
                "eval_images_per_s": state["eval_images"] / max(state["eval_seconds"], 1e-9),
                "trainable_params": lily.count_parameters(model), "head_params": lily.head_parameters(model)}

    def _checkpoint(self, model, optimizer, scheduler, state):
        extra = dict(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        lily.save_trainable(model, self.ckpt_path, extra=extra)


class Interrupted(Exception):
    """The run stopped on purpose before its last epoch (stop_after_epoch)."""


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one configuration end to end and write its run directory; returns results."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task.name)
    device = resolve_device(cfg.device)
    method_id = cfg.get("method_id") or cfg.method.get("name")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results_path = run_dir / "results.json"
    if not cfg.resume and (run_dir / CHECKPOINT).exists():
        log.warning("%s holds an earlier run: starting over (use resume=true to continue it)", run_dir)
        for p in run_dir.glob("checkpoint*.pt"):
            p.unlink()
        results_path.unlink(missing_ok=True)
    if cfg.resume and results_path.exists() and json.loads(results_path.read_text()).get("finished"):
        log.info("%s is already finished: nothing to resume", run_dir)
        return json.loads(results_path.read_text())

    tracker = Tracker(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                      name=f"{task.name}/{cfg.backbone.name}/{method_id}", resume=bool(cfg.resume))
    started = time.time()
    p = cfg.protocol
    results = {"task": task.name, "group": task.group, "method": method_id, "method_config": method_config(cfg.method).to_dict(),
        "backbone": cfg.backbone.name, "seed": cfg.seed, "protocol": p.name, "device": str(device),
        "precision": precision_name(device, cfg.precision), "normalization": cfg.normalization,
        "image_size": cfg.image_size, "epochs": cfg.optim.epochs, "batch_size": cfg.batch_size}
    try:
        if p.get("select_split"):
            select = Phase(cfg, run_dir, "select", p.train_split, p.select_split, cfg.eval_every, device, tracker)
            sel = select.run(task.num_classes, resume=bool(cfg.resume))
            results.update(val_history=sel["history"], val_acc=sel["final_acc"], val_best_acc=sel["best_acc"],
                           select_data=sel["data"])
            del select
            final = Phase(cfg, run_dir, "final", "train800val200", p.eval_split, 0, device, tracker,
                          step_offset=cfg.optim.epochs)
        else:
            final = Phase(cfg, run_dir, "final", p.train_split, p.eval_split, cfg.eval_every, device, tracker)
        out = final.run(task.num_classes, resume=bool(cfg.resume))
    except Interrupted as e:
        log.warning(str(e))
        tracker.finish()
        return {"interrupted": True}
    info = out.pop("info")
    experts = out.pop("experts")
    results.update(out)
    results.update(weights=info.get("weights"), pre_logits=bool(info.get("pre_logits", False)),
                   kernels=info.get("kernels"), train_split=final.train_split, eval_split=final.eval_split,
                   total_seconds=time.time() - started, finished=True)
    write_json(run_dir / "experts.json", experts)
    write_json(results_path, results)
    tracker.finish()
    log.info("done: %s %s on %s: final %.2f%%, best %.2f%% (epoch %d); %d trainable params (+%d head); %s",
             method_id, cfg.backbone.name, task.name, results["final_acc"], results["best_acc"],
             results["best_epoch"], results["trainable_params"], results["head_params"], run_dir)
    return results

