"""A run's identity, its directory and its life cycle.

Identity: the resolved config minus everything that cannot change a result (paths, device,
progress bars, logging, thread count, resume flags...). Two configurations with the same
identity are the same experiment; the run directory is a pure function of it:

    <output_dir>/runs/<task>/<backbone>/<method>/<readable>-<hash10>

``<method>`` is the method config's name (``method=lily_kvffn``), ``<readable>`` a few
headline values (N_e, s, recipe, seed) and ``<hash10>`` the first 10 hex digits of the
SHA-256 of the canonical JSON of the identity. The directory holds ``identity.json``
(written first), ``config.yaml``, ``results.json`` (status: running | interrupted | failed
| finished), ``checkpoint.pt``, ``experts.json`` and Hydra's ``train.log``.

Life cycle (:func:`claim`): a finished run is skipped; an interrupted or failed one resumes
from its checkpoint (``resume=true``, the default); ``resume=false`` refuses to touch a
directory that holds an earlier attempt, and only ``overwrite=true`` deletes one.
"""
from __future__ import annotations

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
IDENTITY_FILE, RESULTS_FILE = "identity.json", "results.json"
HASH_LEN = 10


def _weights_id(backbone: dict) -> Any:
    """A checkpoint is identified by its file name and size, not by where it lies."""
    ckpt = backbone.get("checkpoint")
    if not ckpt:
        return None
    p = Path(str(ckpt)).expanduser()
    return {"file": p.name, "bytes": p.stat().st_size if p.is_file() else None}


def identity(cfg: DictConfig | dict) -> dict:
    """The result-relevant resolved config as a plain nested dict."""
    if isinstance(cfg, DictConfig):  # node by node: interpolations resolve against the whole config
        d = {k: (OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k])
             for k in cfg if k not in NOT_IDENTITY}
    else:
        d = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    if isinstance(d.get("backbone"), dict):
        d["backbone"] = dict(d["backbone"], checkpoint=_weights_id(d["backbone"]))
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


def readable(ident: dict) -> str:
    """A few headline values for humans: ne, scale, recipe, seed (the hash makes it unique)."""
    m = ident.get("method") or {}
    parts = []
    if m.get("name") not in (None, "full", "linear"):
        for key, short in (("ne", "ne"), ("lp_experts", "na"), ("scale", "s")):
            if m.get(key) is not None and not isinstance(m.get(key), (list,)):
                parts.append(f"{short}{_fmt(m[key])}")
    if isinstance(ident.get("recipe"), dict):
        parts.append(str(ident["recipe"].get("name")))
    if isinstance(ident.get("protocol"), dict):
        parts.append(str(ident["protocol"].get("name")))
    parts.append(f"seed{ident.get('seed')}")
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", "-".join(parts))


def relative_dir(cfg: DictConfig, method_id: str | None) -> str:
    ident = identity(cfg)
    task = (ident.get("task") or {}).get("name", "task")
    backbone = (ident.get("backbone") or {}).get("name", "backbone")
    method = method_id or (ident.get("method") or {}).get("name", "method")
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


# -- life cycle -----------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunLock:
    """An exclusive lock on a run directory for as long as one process works in it.

    ``fcntl.flock`` on ``<run_dir>/.lock``: released by the OS when the process dies (a
    cancelled Slurm job, a crash), so a stale lock never blocks a re-run; a second process
    on the same configuration at the same time is refused instead of writing into the run.
    """

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / ".lock", None

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    """What :func:`claim` decided for a run directory."""

    def __init__(self, action: str, previous: dict | None):
        self.action = action          # new | resume | skip
        self.previous = previous      # the earlier results.json, if any


def claim(run_dir: Path, ident: dict, rid: str, resume: bool, overwrite: bool) -> Claim:
    """Decide what to do with ``run_dir`` for this identity, before anything slow.

    - no earlier attempt: new;
    - the directory belongs to another identity: UserError (never reused);
    - finished: skip (unless overwrite=true);
    - interrupted / failed / running: resume (resume=true), or UserError (resume=false),
      or start over after deleting it (overwrite=true).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    stored = read_json(run_dir / IDENTITY_FILE)
    if stored is not None and stored.get("run_id") != rid:
        raise UserError(f"{run_dir} belongs to another configuration (run_id {stored.get('run_id')}, this one {rid}); "
                        "it is never reused. Move it away or choose another paths.output_dir.")
    previous = read_json(run_dir / RESULTS_FILE)
    earlier = previous is not None or any(run_dir.glob("checkpoint*.pt"))
    if earlier and overwrite:
        log.warning("overwrite=true: deleting the earlier attempt in %s (status %s)", run_dir,
                    (previous or {}).get("status", "unknown"))
        for p in list(run_dir.glob("checkpoint*.pt")) + [run_dir / RESULTS_FILE, run_dir / "experts.json"]:
            p.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "wandb", ignore_errors=True)
        earlier, previous = False, None
    write_json(run_dir / IDENTITY_FILE, {"run_id": rid, "identity": ident})
    if not earlier:
        return Claim("new", None)
    status = (previous or {}).get("status", "interrupted")
    if status == "finished":
        return Claim("skip", previous)
    if not resume:
        raise UserError(f"{run_dir} holds an earlier attempt of this configuration (status {status}); "
                        "continue it with resume=true (the default) or delete it with overwrite=true.")
    return Claim("resume", previous)
