"""A run's identity, its directory and the one object that owns that directory's files.

Identity: the resolved config minus everything that cannot change a result (paths, device,
progress bars, logging, thread count, resume flags...). Two configurations with the same
identity are the same experiment; the run directory is a pure function of it:

    <output_dir>/runs/<task>/<backbone>/<method>/<readable>-<hash10>

``<method>`` is the method config's name (``method=lily_kvffn``), ``<readable>`` a few
headline values (N_e, s, recipe, seed) and ``<hash10>`` the first 10 hex digits of the
SHA-256 of the canonical JSON of the identity.

:class:`RunDir` is the only code that knows the directory's files and status strings:
``identity.json`` (written first), ``config.yaml``, ``results.json`` (status: running |
interrupted | failed | finished), ``checkpoint.pt`` (its payload too), ``experts.json``,
``eval-*.json`` and ``predictions-*.npz`` (per-sample predictions), plus Hydra's
``train.log``. Every write is atomic (a temp file renamed into place, removed on failure)
and an OS error (disk full, read-only, a file where a folder should be) is a UserError
naming the path. Life cycle (:meth:`RunDir.claim`): a finished run is skipped; an
interrupted or failed one resumes from its checkpoint (``resume=true``, the default);
``resume=false`` refuses to touch a directory that holds an earlier attempt, and only
``overwrite=true`` deletes one (every artefact, evaluations and predictions included).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError

log = logging.getLogger(__name__)

# Top-level keys that never change a result.
NOT_IDENTITY = ("paths", "device", "progress", "logger", "num_workers", "resume", "overwrite", "stop_after_epoch",
                "threads", "method_id", "hydra", "experiment", "sweep", "data_on_device")
HASH_LEN = 10


def _weights_id(backbone: dict) -> Any:
    """A checkpoint is identified by its file name and size, not by where it lies."""
    ckpt = backbone.get("checkpoint")
    if not ckpt:
        return None
    p = Path(str(ckpt)).expanduser()
    return {"file": p.name, "bytes": p.stat().st_size if p.is_file() else None}


# A method config's meta keys that cannot change a result (lily.registry.META_KEYS minus `optim`,
# whose recipe values do change one and are also resolved into optim.* / backbone.*).
METHOD_NOT_IDENTITY = ("description", "source", "search")


def identity(cfg: DictConfig | dict) -> dict:
    """The result-relevant resolved config as a plain nested dict."""
    if isinstance(cfg, DictConfig):  # node by node: interpolations resolve against the whole config
        d = {k: (OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k])
             for k in cfg if k not in NOT_IDENTITY}
    else:
        d = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    if isinstance(d.get("backbone"), dict):
        d["backbone"] = dict(d["backbone"], checkpoint=_weights_id(d["backbone"]))
    if isinstance(d.get("method"), dict):  # free text and the search space never change a result
        d["method"] = {k: v for k, v in d["method"].items() if k not in METHOD_NOT_IDENTITY}
    return d


def _numbers_as_floats(obj):
    """1 and 1.0 are the same value to a run (method.scale=1 vs 1.0): hash them alike."""
    if isinstance(obj, dict):
        return {k: _numbers_as_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numbers_as_floats(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    return obj


def canonical(obj) -> str:
    return json.dumps(_numbers_as_floats(obj), sort_keys=True, separators=(",", ":"), default=str)


def run_id(ident: dict) -> str:
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:HASH_LEN]


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "+".join(f"{k}{_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# headline values of a method in the directory name, in this order: Lily's (ne, na, scale), or,
# for a method that has none of them, its rank
HEADLINE = (("ne", "ne"), ("lp_experts", "na"), ("scale", "s"))
HEADLINE_FALLBACK = (("rank", "r"),)


def readable(ident: dict) -> str:
    """A few headline values for humans: ne, scale (or rank), recipe, protocol, seed (the hash
    makes it unique). Values a method does not have are left out."""
    m = ident.get("method")
    m = m if isinstance(m, dict) else {}
    parts = []
    if m.get("name") not in (None, "full", "linear"):
        def scalar(key):
            v = m.get(key)
            return v is not None and not isinstance(v, (list, tuple))
        keys = [k for k in HEADLINE if scalar(k[0])] or [k for k in HEADLINE_FALLBACK if scalar(k[0])]
        parts += [f"{short}{_fmt(m[key])}" for key, short in keys]
    if isinstance(ident.get("recipe"), dict):
        parts.append(str(ident["recipe"].get("name")))
    if isinstance(ident.get("protocol"), dict):
        parts.append(str(ident["protocol"].get("name")))
    parts.append(f"seed{ident.get('seed')}")
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", "-".join(parts))


def relative_dir(cfg: DictConfig, method_id: str | None) -> str:
    ident = identity(cfg)

    def name(key, default):
        node = ident.get(key)
        return str(node.get("name", default)) if isinstance(node, dict) else default
    task, backbone = name("task", "task"), name("backbone", "backbone")
    method = method_id or name("method", "method")
    return f"{task}/{backbone}/{method}/{readable(ident)}-{run_id(ident)}"


def _hydra_method_choice(root) -> str | None:
    try:
        return root.hydra.runtime.choices.get("method")
    except Exception:  # noqa: BLE001 - outside Hydra (tests, scripts)
        return None


def _run_subdir_resolver(*, _root_) -> str:
    """``${run_subdir:}`` in configs/hydra/default.yaml: the run's directory below runs/."""
    return relative_dir(_root_, _hydra_method_choice(_root_))


OmegaConf.register_new_resolver("run_subdir", _run_subdir_resolver, replace=True)




# -- the run directory's contract: its file names and statuses are spelled here only ----------
IDENTITY_FILE = "identity.json"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "checkpoint.pt"
EXPERTS_FILE = "experts.json"
LOCK_FILE = ".lock"
WANDB_DIR, WANDB_ID_FILE = "wandb", "wandb_id.txt"
EVAL_PREFIX = "eval-"                 # eval-<split>-<precision>[-merged][-<n>].json / .npz (eval.py)
PREDICTIONS_PREFIX = "predictions-"   # predictions-<final|selected>.npz (the trainer)
HYDRA_FILES = ("train.log", ".hydra")  # Hydra's, of the current invocation: never deleted by overwrite
EVAL_LOG_DIR = "eval"                 # eval.py's Hydra folder (configs/eval.yaml: hydra.run.dir)

RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted", "failed"
SKIPPED = "skipped"                   # a job's outcome (not a stored status): the run was finished already
STATUSES = (FINISHED, FAILED, INTERRUPTED, RUNNING)
DONE = (FINISHED, SKIPPED)            # outcomes that leave nothing to do
FINAL, SELECTED = "final", "selected"  # the predictions the trainer keeps
TOPK = 5                              # logits kept per image (k = min(TOPK, classes))


class CorruptRun(UserError):
    """An artefact of an earlier attempt cannot be read; the way out is ``overwrite=true``."""

    remedy = "overwrite"


# -- file-system errors as one clear message --------------------------------------------------
def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder."""
    for p in [*reversed(Path(path).parents), Path(path)]:
        if p.exists() and not p.is_dir():
            return p
    return None


def os_error(e: OSError, path) -> UserError:
    """An OSError met writing ``path`` as a UserError that names the path and the way out."""
    path = Path(path)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device while writing {path}: free some space (or set "
                         "paths.output_dir to another disk), then re-run the same command")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {e.strerror} (the output folder is read-only or not yours); "
                         "set paths.output_dir to a writable folder")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        block = _file_in_the_way(path)
        return UserError(f"cannot write {path}: {block or 'a part of that path'} is a file, not a folder; "
                         "set paths.output_dir to a folder")
    return UserError(f"cannot write {path}: {e.strerror or e}")


def check_output_dir(path) -> None:
    """UserError unless ``path`` is, or can be created as, a writable folder (before Hydra makes it)."""
    path = Path(str(path)).expanduser().absolute()
    block = _file_in_the_way(path)
    if block is not None:
        raise UserError(f"output folder {path} cannot be created: {block} is a file, not a folder; "
                        "set paths.output_dir to a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable ({existing} is read-only or not yours); "
                        "set paths.output_dir to a writable folder")


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``path``; the temp file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            write(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise os_error(e, path) from None
    finally:
        for p in (tmp, tmp.with_name(tmp.name + ".tmp")):  # lily.save_trainable's own temp file too
            with contextlib.suppress(OSError):
                p.unlink()


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


class RunLock:
    """An exclusive lock on a run directory for as long as one process works in it.

    ``fcntl.flock`` on ``<run_dir>/.lock``: released by the OS when the process dies (a
    cancelled Slurm job, a crash), so a stale lock never blocks a re-run; a second process
    on the same configuration at the same time is refused instead of writing into the run.
    """

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / LOCK_FILE, None

    def __enter__(self):
        import fcntl
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by {holder} (the same configuration is running); "
                            "wait for it to end, or stop it, before running this configuration again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        return False


class Claim:
    """What :meth:`RunDir.claim` decided for a run directory (nothing is written yet)."""

    def __init__(self, action: str, previous: dict | None, clear: bool = False):
        self.action = action          # new | resume | skip
        self.previous = previous      # the earlier results.json, if any
        self.clear = clear            # overwrite=true: delete the earlier attempt when the run begins


class RunDir:
    """The one owner of a run directory: its paths, reads, atomic writes and status transitions
    (new -> running -> finished | interrupted | failed), the checkpoint payload, evaluations
    and per-sample predictions. Nothing else spells a file name of the directory."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths ------------------------------------------------------------------------------
    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def experts_path(self) -> Path:
        return self.path / EXPERTS_FILE

    @property
    def wandb_id_path(self) -> Path:
        return self.path / WANDB_ID_FILE

    def predictions_path(self, which: str) -> Path:
        """``predictions-<which>.npz``; an eval file's stem (``eval-...``) names its own ``.npz``."""
        return self.path / (f"{which}.npz" if which.startswith(EVAL_PREFIX) else f"{PREDICTIONS_PREFIX}{which}.npz")

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # -- reads ------------------------------------------------------------------------------
    def identity(self) -> dict | None:
        return read_json(self.identity_path)

    def results(self) -> dict | None:
        """results.json, or None when absent or unreadable."""
        return read_json(self.results_path)

    def read_results(self) -> dict:
        """results.json; OSError / ValueError when absent or unreadable (the results layer reports it)."""
        return json.loads(self.results_path.read_text())

    def status(self) -> str | None:
        return (self.results() or {}).get("status")

    def experts(self) -> list:
        return read_json(self.experts_path) or []

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def config(self) -> DictConfig:
        """The run's resolved config.yaml; a UserError when this is not a run directory."""
        for p in (self.config_path, self.checkpoint_path):
            if not p.is_file():
                raise UserError(f"{p} not found: {self.path} is not a run directory written by train.py (it holds "
                                f"{CONFIG_FILE} and {CHECKPOINT_FILE} once an epoch is done)")
        try:
            return OmegaConf.load(self.config_path)
        except Exception as e:  # noqa: BLE001 - a damaged yaml: named, with the way out
            raise CorruptRun(f"{self.config_path} cannot be read ({type(e).__name__}: {e}); "
                             "train the run again with overwrite=true") from None

    # -- life cycle -------------------------------------------------------------------------
    def artefacts(self) -> list[Path]:
        """Everything an attempt leaves here (not identity.json, the lock or Hydra's log)."""
        fixed = [self.results_path, self.experts_path, self.config_path, self.wandb_id_path, self.path / WANDB_DIR,
                 self.path / EVAL_LOG_DIR]
        globbed = [*self.path.glob("checkpoint*.pt"), *self.path.glob(f"{EVAL_PREFIX}*"),
                   *self.path.glob(f"{PREDICTIONS_PREFIX}*"), *self.path.glob(".*.tmp")]
        return [p for p in fixed if p.exists()] + sorted(globbed)

    def claim(self, rid: str, resume: bool, overwrite: bool) -> Claim:
        """Decide what to do with this directory for run ``rid``, before anything slow; writes nothing.

        - no earlier attempt: new;
        - the directory belongs to another identity: UserError (never reused);
        - finished: skip (unless overwrite=true);
        - interrupted / failed / running: resume (resume=true), or UserError (resume=false),
          or start over (overwrite=true: :meth:`begin` deletes every artefact of the earlier attempt).
        """
        stored = self.identity()
        if stored is not None and stored.get("run_id") != rid:
            raise UserError(f"{self.path} belongs to another configuration (run_id {stored.get('run_id')}, this one "
                            f"{rid}); it is never reused. Move it away or choose another paths.output_dir.")
        previous = self.results()
        earlier = previous is not None or bool(self.artefacts())
        if earlier and overwrite:
            return Claim("new", None, clear=True)
        if not earlier:
            return Claim("new", None)
        status = (previous or {}).get("status", INTERRUPTED)
        if status == FINISHED:
            return Claim("skip", previous)
        if not resume:
            raise UserError(f"{self.path} holds an earlier attempt of this configuration (status {status}); "
                            "continue it with resume=true (the default) or delete it with overwrite=true.")
        return Claim("resume", previous)

    def clear(self) -> list[Path]:
        """Delete every artefact of an earlier attempt (checkpoints, results, evaluations, predictions...)."""
        gone = self.artefacts()
        try:
            for p in gone:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError as e:
            raise os_error(e, p) from None
        return gone

    def discard(self, levels: int = 3) -> None:
        """Remove a directory this invocation made for a run that never began (preflight refused it),
        and its parents up to ``levels`` up while they are empty (<task>/<backbone>/<method>)."""
        shutil.rmtree(self.path, ignore_errors=True)
        parent = self.path.parent
        for _ in range(levels):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent

    def begin(self, claim: Claim, ident: dict, rid: str, cfg: DictConfig, results: dict) -> dict:
        """Start (or resume) the run: identity, config and a ``running`` results.json. Returns results."""
        if claim.clear:
            gone = self.clear()
            log.warning("overwrite=true: deleted the earlier attempt in %s (%d file(s): %s)", self.path, len(gone),
                        ", ".join(p.name for p in gone))
        write_json(self.identity_path, {"run_id": rid, "identity": ident})
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(self.config_path, lambda tmp: Path(tmp).write_text(text))
        results.update(status=RUNNING, message=None)
        write_json(self.results_path, results)
        return results

    def finish(self, results: dict, experts: list) -> dict:
        results.update(status=FINISHED, finished=True, message=None)
        write_json(self.experts_path, experts)
        write_json(self.results_path, results)
        return results

    def interrupt(self, results: dict, message: str) -> dict:
        results.update(status=INTERRUPTED, message=message)
        self._record(results)
        return results

    def fail(self, results: dict, message: str, **extra) -> dict:
        results.update(status=FAILED, message=message, **extra)
        self._record(results)
        return results

    def refuse(self, results: dict, message: str) -> dict:
        """A run refused before it began (preflight), recorded as failed with its identity, unless the
        directory holds another configuration or a finished result."""
        stored = self.identity()
        if stored is None and self.path.is_dir():
            try:
                write_json(self.identity_path, {"run_id": results["run_id"], "identity": results["identity"]})
            except UserError as e:
                log.error("the refusal could not be recorded: %s", e)
        return self.fail(results, message)

    def _record(self, results: dict) -> None:
        """Write a failed/interrupted status where it can be: never over a finished result, never into
        another run's directory, never into a directory that does not exist; an OS error is logged."""
        if not self.path.is_dir():
            return
        stored = self.identity() or {}
        if self.status() == FINISHED or (stored and stored.get("run_id") != results.get("run_id")):
            return
        try:
            write_json(self.results_path, results)
        except UserError as e:  # e.g. the disk is still full: the message already says what happened
            log.error("the run's status could not be recorded: %s", e)

    # -- checkpoint -------------------------------------------------------------------------
    def save_checkpoint(self, model, optimizer, scheduler, state: dict, device) -> None:
        """Trainable weights (lily's format) + optimizer, scheduler, RNG and the loop's ``state``."""
        import lily
        import torch
        device = torch.device(device)
        extra = dict(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        atomic_write(self.checkpoint_path, lambda tmp: lily.save_trainable(model, tmp, extra=extra))

    def read_checkpoint(self) -> dict:
        """The checkpoint payload; a :class:`CorruptRun` naming the file when it cannot be read."""
        import lily
        try:
            return lily.read_trainable(self.checkpoint_path)
        except FileNotFoundError:
            raise UserError(f"{self.checkpoint_path} not found") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, another format: all the same to a user
            raise CorruptRun(self._corrupt(f"cannot be read ({type(e).__name__}: {_first_line(e)})")) from None

    def _corrupt(self, what: str) -> str:
        return (f"{self.checkpoint_path} {what}: the earlier attempt cannot be continued; start this configuration "
                "over with overwrite=true (deletes the run's checkpoint, results and evaluations)")

    def checkpoint_epoch(self) -> int | None:
        return self.read_checkpoint().get("extra", {}).get("epoch")

    def load_checkpoint(self, model, optimizer=None, scheduler=None, device=None) -> dict:
        """Load the weights into ``model`` (and optimizer, scheduler, RNG when given); returns the loop's state."""
        import lily
        import torch
        payload = self.read_checkpoint()
        try:
            lily.load_trainable(model, payload)
            extra = dict(payload.get("extra") or {})
            opt, sched, rng_cpu, rng_cuda = (extra.pop(k, None) for k in ("optimizer", "scheduler", "rng_cpu",
                                                                             "rng_cuda"))
            if optimizer is not None:
                optimizer.load_state_dict(opt)
                scheduler.load_state_dict(sched)
                torch.set_rng_state(rng_cpu)
                if device is not None and torch.device(device).type == "cuda" and rng_cuda is not None:
                    torch.cuda.set_rng_state(rng_cuda, torch.device(device))
        except Exception as e:  # noqa: BLE001 - a payload that does not fit this run
            raise CorruptRun(self._corrupt(f"does not fit this run ({type(e).__name__}: {_first_line(e)})")) from None
        return extra

    # -- evaluations and predictions --------------------------------------------------------
    def eval_stem(self, split: str, precision: str, merged: bool) -> str:
        """``eval-<split>-<precision>[-merged]``, numbered (``-2``, ``-3``...) past earlier evaluations:
        no result is overwritten."""
        base = f"{EVAL_PREFIX}{split}-{precision}{'-merged' if merged else ''}"
        stem, n = base, 2
        while (self.path / f"{stem}.json").exists() or (self.path / f"{stem}.npz").exists():
            stem, n = f"{base}-{n}", n + 1
        return stem

    def write_evaluation(self, stem: str, out: dict, ev: dict | None = None, files=None, epoch=None) -> Path:
        """``<stem>.json`` (and, with ``ev`` holding predictions, ``<stem>.npz``); returns the json path."""
        if ev is not None:
            self.save_predictions(stem, ev, files, epoch, out["split"])
        path = self.path / f"{stem}.json"
        write_json(path, out)
        return path

    def save_predictions(self, which: str, ev: dict, files, epoch: int, split: str) -> Path:
        """Per-sample predictions of one evaluation (arrays: :func:`load_predictions`)."""
        import numpy as np
        pred = np.asarray(ev["pred"], dtype=np.int32)
        files = np.asarray([str(f) for f in files], dtype=str)
        if len(files) != len(pred):
            raise ValueError(f"{len(files)} file names for {len(pred)} predictions")
        arrays = {"pred": pred, "label": np.asarray(ev["label"], dtype=np.int32),
                  "topk_index": np.asarray(ev["topk_index"], dtype=np.int32),
                  "topk_logit": np.asarray(ev["topk_logit"], dtype=np.float16), "files": files,
                  "epoch": np.asarray(int(epoch)), "split": np.asarray(str(split)),
                  "accuracy": np.asarray(float(ev["acc"]))}
        path = self.predictions_path(which)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        atomic_write(path, write)
        return path

    def load_predictions(self, which: str = FINAL) -> dict:
        """The arrays of ``predictions-<which>.npz`` (or ``<eval stem>.npz``) as numpy, 0-d ones as python
        scalars. ``selected`` of a run that selects its final epoch is its final predictions."""
        import numpy as np
        path = self.predictions_path(which)
        if which == SELECTED and not path.is_file() and "final" in str((self.results() or {}).get("select", "")):
            path = self.predictions_path(FINAL)
        if not path.is_file():
            raise UserError(f"{path} not found: no '{which}' predictions in {self.path} (runs save "
                            f"{PREDICTIONS_PREFIX}{FINAL}.npz and {PREDICTIONS_PREFIX}{SELECTED}.npz; eval.py saves "
                            f"{EVAL_PREFIX}<split>-<precision>.npz)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
        except Exception as e:  # noqa: BLE001
            raise CorruptRun(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)}); "
                             "evaluate the run again") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def load_predictions(run_dir, which: str = FINAL) -> dict:
    """Per-sample predictions of a run: ``pred`` int32 (N,), ``label`` int32 (N,), ``topk_index``
    int32 (N, k), ``topk_logit`` float16 (N, k) with k = min(5, classes), ``files`` (N,) str in the
    list file's order, ``epoch`` int, ``split`` str, ``accuracy`` float (percent, as reported).
    ``which``: ``final`` (the last evaluation), ``selected`` (the one the protocol reports) or an
    eval.py stem (``eval-test-fp32``). A UserError naming the file when it is missing."""
    return RunDir(run_dir).load_predictions(which)


def find_run_dirs(root) -> list[Path]:
    """Every run directory under ``root`` that holds a results.json."""
    return sorted(p.parent for p in Path(root).rglob(RESULTS_FILE))
