"""Check a run before anything slow: config numbers, data, method-on-backbone, weights.

Every check runs and every problem is collected, so one message lists them all (a user
with a wrong data root *and* missing weights learns both at once). Order of a run:
preflight (seconds) -> load weights -> decode images -> train.
"""
from __future__ import annotations

import logging
import numbers
from pathlib import Path

from omegaconf import DictConfig

from data import SPLITS, ensure_digits, get_task
from data.folder import INTERPOLATIONS, read_list, task_dir
from data.normalize import MODES
from common.errors import UserError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")
HEAD_INITS = ("default", "trunc_normal", "zeros")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_numbers(cfg: DictConfig) -> list[str]:
    """Every number of the config: type and range."""
    p: list[str] = []
    o = cfg.optim

    def need(ok: bool, key: str, value, what: str):
        if not ok:
            p.append(f"{key}={value!r}: must be {what}")

    for key, value in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size),
                       ("optim.epochs", o.epochs), ("image_size", cfg.image_size)):
        need(_is_int(value) and value >= 1, key, value, "a positive integer")
    for key, value in (("eval_every", cfg.eval_every), ("optim.warmup_epochs", o.warmup_epochs)):
        need(_is_int(value) and value >= 0, key, value, "an integer >= 0")
    need(_is_num(o.lr) and o.lr > 0, "optim.lr", o.lr, "a positive number")
    for key in ("weight_decay", "warmup_lr", "min_lr"):
        need(_is_num(o[key]) and o[key] >= 0, f"optim.{key}", o[key], "a number >= 0")
    if o.get("lr_base_batch") is not None:
        need(_is_num(o.lr_base_batch) and o.lr_base_batch > 0, "optim.lr_base_batch", o.lr_base_batch,
             "a positive number or null")
    need(_is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    for key in ("max_train_steps", "stop_after_epoch"):
        v = cfg.get(key)
        need(v is None or (_is_int(v) and v >= 1), key, v, "null or a positive integer")
    need(cfg.precision in PRECISIONS, "precision", cfg.precision, f"one of {PRECISIONS}")
    need(cfg.normalization in MODES, "normalization", cfg.normalization, f"one of {MODES}")
    need(cfg.interpolation in INTERPOLATIONS, "interpolation", cfg.interpolation, f"one of {tuple(INTERPOLATIONS)}")
    t = cfg.get("threads", "auto")
    need(t == "auto" or (_is_int(t) and t >= 1), "threads", t, "auto or a positive integer")
    r = cfg.recipe
    need(r.get("scheduler_lag") in (0, 1), "recipe.scheduler_lag", r.get("scheduler_lag"), "0 or 1")
    need(cfg.backbone.get("head_init", "default") in HEAD_INITS, "backbone.head_init",
         cfg.backbone.get("head_init"), f"one of {HEAD_INITS}")
    pr = cfg.protocol
    for key in ("train_split", "eval_split"):
        need(pr.get(key) in SPLITS, f"protocol.{key}", pr.get(key), f"one of {SPLITS}")
    need(pr.get("select") in ("best", "final"), "protocol.select", pr.get("select"), "best or final")
    return p


def check_method(cfg: DictConfig, task=None) -> list[str]:
    """The method config is valid, names only its own targets, and fits the backbone (meta device)."""
    from engine.setup import method_config
    try:
        mcfg = method_config(cfg.method)
    except UserError as e:
        return [str(e)]
    p = []
    targets = set(getattr(mcfg, "targets", None) or [])     # compose, full, linear: no targets
    for key in ("rank", "ne", "scale", "routing", "lp_stride", "dropout", "bias", "shared_router", "lp_experts"):
        value = getattr(mcfg, key, None)
        if isinstance(value, dict):
            extra = sorted(k for k in value if k not in targets and k != "default")
            if extra:
                p.append(f"method.{key} has entries for {extra}, which are not targets of this method "
                         f"(targets: {sorted(targets)}); remove them or add the targets")
    if p:
        return p
    from engine.setup import build_model
    try:
        build_model(cfg, (task or get_task(cfg.task.name)).num_classes, "meta")
    except UserError as e:
        p.append(str(e))
    return p


def check_data(cfg: DictConfig, task=None) -> list[str]:
    """Data root, task folder, the four list files (format, labels in range), files present."""
    task = task or get_task(cfg.task.name)
    root = Path(str(cfg.paths.data_root)).expanduser()
    p = []
    try:
        if task.name == "digits":
            ensure_digits(root)
        tdir = task_dir(root, task)
    except UserError as e:
        return [str(e)]
    for split in SPLITS:
        try:
            _, _, entries = read_list(tdir, task, split)
        except UserError as e:
            p.append(str(e))
            continue
        missing = [e for e in entries if not e.path.is_file()]
        if missing:
            p.append(f"{len(missing)} image file(s) listed in {split}.txt are missing, first '{missing[0].path}' "
                     f"({missing[0].where}); re-create the task with `python scripts/prepare_vtab.py`")
    return p


def check_weights(cfg: DictConfig) -> list[str]:
    from models import weights_problem
    problem = weights_problem(cfg.backbone)
    return [problem] if problem else []


def preflight(cfg: DictConfig, data: bool = True, task=None) -> None:
    """Raise one UserError listing every problem found, or return. ``task``: the run's resolved task."""
    task = task or get_task(cfg.task.name)  # an unknown task: its own message (every other check needs it)
    problems = (check_numbers(cfg) + check_method(cfg, task) + (check_data(cfg, task) if data else []) +
                check_weights(cfg))
    if problems:
        if len(problems) == 1:
            raise UserError(problems[0])
        raise UserError(f"{len(problems)} problems found before training:\n" +
                        "\n".join(f"  {i}. {m}" for i, m in enumerate(problems, 1)))
