"""What a multirun shares: each job's share of the CPU threads, the failure summary, preemption.

Thread share (:func:`configure_threads`, called first thing by train.py's Hydra main)
    ``threads: <int>`` wins. Otherwise the job's share of the CPUs it may use:
    inside a Slurm job the CPUs Slurm gave it (``SLURM_CPUS_PER_TASK``), else the CPUs this
    process may run on (``sched_getaffinity``), divided by the number of jobs the launcher runs at
    once on this machine: joblib ``min(n_jobs, jobs in the batch)``; submitit_local all the jobs
    of the batch (it starts them all at once), capped by its ``cpus_per_task`` when set. The
    batch size comes from :class:`SweepSummary` (``LILY_SWEEP_BATCH``, set before any job starts).
    A single run, the basic launcher (one job at a time) and a Slurm job without
    ``--cpus-per-task`` outside a launcher keep torch's default. Sets ``torch.set_num_threads``,
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` (for child processes) and the
    inter-op pool where torch still allows it; logs the choice.

Failure summary (:class:`SweepSummary`, a Hydra callback registered in configs/hydra/default.yaml)
    ``on_multirun_start`` (main process) creates a ledger unique to this invocation,
    ``<sweep dir>/.sweeps/<date>-<time>-<pid>.jsonl``, and exports its path as
    ``LILY_SWEEP_LEDGER``: basic (same process), joblib (loky workers are spawned later from this
    environment), submitit local (its controller copies ``os.environ``) and Slurm (sbatch exports the
    submitting environment; a requeued job keeps it) jobs all inherit it. Every job appends a
    ``start`` line (``on_job_start``: overrides, run directory) and an ``end`` line
    (``on_job_end``: status, run_dir, message, overrides) under an exclusive ``lockf`` lock.
    ``on_multirun_end`` (main process) reads it, prints the summary and raises ``SystemExit(1)``
    when a job failed, was interrupted or never reported: Hydra's callback runner and its
    ``run_and_report`` catch ``Exception`` only, so ``python train.py -m ...`` exits 1. When the
    sweep itself dies first (e.g. submitit raises ``UncompletedJobError`` for a cancelled Slurm job,
    or Ctrl-C) an ``atexit`` hook prints the same summary (Hydra has already chosen exit code 1).
    A job whose task function raised (``JobStatus.FAILED``) is recorded as failed with the
    exception message and its return is turned into the same ``{"status": "failed", ...}`` dict
    train.py returns for a failure, so the sweeper does not abort the remaining batches.

Preemption and time limits under submitit (see the event order in :func:`install_preemption_handler`)
    ``preemption_requested()`` tells the trainer to write its checkpoint and stop ("interrupted");
    ``SweepSummary.on_job_end`` then lets submitit requeue the job, which resumes the run.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode

from engine.run import DONE, FAILED, FINISHED, INTERRUPTED, SKIPPED, RunDir

log = logging.getLogger(__name__)

LEDGER_ENV = "LILY_SWEEP_LEDGER"   # the ledger file of the running multirun
BATCH_ENV = "LILY_SWEEP_BATCH"     # jobs the launcher starts at once (the sweeper's first batch)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
NOT_REPORTED = "did not report"    # a ledger outcome: the job never wrote its end line
MESSAGE_CHARS = 2000               # cap on a message stored in the ledger
SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED", "RESIZING", "CONFIGURING")

_threads: dict[str, Any] = {}      # what configure_threads chose, for the ledger


# -- thread share ---------------------------------------------------------------------------
def available_cpus() -> tuple[int, str]:
    """The CPUs this job may use, and where that number comes from."""
    if os.environ.get("SLURM_JOB_ID"):
        for var in ("SLURM_CPUS_PER_TASK",):
            v = os.environ.get(var, "")
            if v.isdigit() and int(v) > 0:
                return int(v), f"{var}={v}"
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    return max(1, n), f"{n} CPUs"


def _hydra_config():
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside Hydra
        return None


def launcher_kind(hc) -> str:
    """basic | joblib | submitit_local | submitit_slurm | <other target> from a Hydra config."""
    launcher = hc.get("launcher") if hc is not None else None
    target = str((launcher or {}).get("_target_", ""))
    for suffix, kind in (("BasicLauncher", "basic"), ("JoblibLauncher", "joblib"),
                         ("submitit_launcher.LocalLauncher", "submitit_local"),
                         ("submitit_launcher.SlurmLauncher", "submitit_slurm")):
        if target.endswith(suffix):
            return kind
    return target or "basic"


def _batch_size() -> int | None:
    v = os.environ.get(BATCH_ENV, "")
    return int(v) if v.isdigit() and int(v) > 0 else None


def thread_share(cfg) -> tuple[int | None, str]:
    """(threads, why) for this job; threads None means: keep torch's default."""
    explicit = cfg.get("threads", "auto") if cfg is not None else "auto"
    if explicit not in (None, "auto"):
        if isinstance(explicit, int) and not isinstance(explicit, bool) and explicit >= 1:
            return explicit, f"threads={explicit}"
        return None, f"threads={explicit!r} is not a positive int (the run's preflight reports it)"
    cpus, source = available_cpus()
    hc = _hydra_config()
    multirun = hc is not None and hc.mode == RunMode.MULTIRUN
    kind = launcher_kind(hc) if multirun else "single run"
    batch = _batch_size()
    if kind == "joblib":
        n_jobs = hc.launcher.get("n_jobs") or 1
        if n_jobs < 0:  # joblib: -1 = all CPUs, -2 = all but one...
            n_jobs = max(1, cpus + 1 + n_jobs)
        at_once = min(n_jobs, batch) if batch else n_jobs
        _warn_crowded(at_once, cpus, "lower hydra.launcher.n_jobs")
        return max(1, cpus // at_once), f"{source} / {at_once} joblib jobs at once (n_jobs={n_jobs})"
    if kind == "submitit_local":
        at_once = batch or 1
        _warn_crowded(at_once, cpus, "set hydra.sweeper.max_batch_size or use hydra/launcher=joblib_cpu")
        share, why = max(1, cpus // at_once), f"{source} / {at_once} submitit_local jobs at once"
        per_task = hc.launcher.get("cpus_per_task")
        if per_task:
            share, why = min(int(per_task), share), f"{why}, cpus_per_task={per_task}"
        return share, why
    if source.startswith("SLURM"):
        return cpus, source
    return None, f"{kind}: torch default"


def _warn_crowded(at_once: int, cpus: int, fix: str) -> None:
    if at_once > cpus:
        log.warning("%d jobs run at once on %d CPUs: they share cores even with 1 thread each (%s)",
                    at_once, cpus, fix)


def configure_threads(cfg=None) -> int:
    """Set this job's torch/OpenMP/MKL thread count from its share of the CPUs; returns it."""
    import torch
    n, why = thread_share(cfg)
    if n is not None:
        torch.set_num_threads(n)
        for var in THREAD_ENV_VARS:
            os.environ[var] = str(n)
        try:  # only possible before the inter-op pool has run anything in this process
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass
    n_now = torch.get_num_threads()
    _threads.update(threads=n_now, why=why)
    log.info("threads: %d (%s)", n_now, why)
    return n_now


# -- private behaviour of submitit and Hydra: each access in one place ------------------------
# requirements.txt pins submitit==1.5.4 and hydra-core==1.3.8; tests/test_sweep.py fails when an
# installed version no longer behaves as these three functions expect.
def submitit_usr_sig():
    """The signal submitit's job process listens to for checkpoint-and-requeue (``_usr_sig``)."""
    from submitit.core.job_environment import JobEnvironment
    return JobEnvironment._usr_sig()  # noqa: SLF001 - the signal submitit itself installs its handler on


def job_return_value(job_return):
    """A Hydra JobReturn's value without re-raising a failed job's exception (``_return_value``)."""
    return job_return._return_value  # noqa: SLF001 - .return_value re-raises a FAILED job's exception


def basic_sweeper_batches(overrides: list[str], max_batch_size):
    """The batches of jobs Hydra's BasicSweeper expands ``overrides`` into (a private module)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), max_batch_size)


# -- preemption -----------------------------------------------------------------------------
_preempt = {"requested": False, "signum": None, "submitit_handler": None}


def preemption_requested() -> bool:
    """True once the preemption / time-limit signal arrived: checkpoint and stop ("interrupted")."""
    return bool(_preempt["requested"])


def _on_preemption_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _preempt["requested"], _preempt["signum"] = True, signum
    # no logging here: the handler may interrupt a logging call of this very thread
    os.write(2, f"engine.sweep: caught signal {signum} (preemption or time limit): the run checkpoints and "
                f"stops after this step; the job is then requeued\n".encode())


def install_preemption_handler() -> bool:
    """Under a submitit job, turn its requeue signal into a flag the trainer polls. Returns True if installed.

    submitit 1.5.4, the order of events (submitit/core/submission.py, core/job_environment.py,
    slurm/slurm.py):
    1. The job process (``python -m submitit.core._submit``) installs, before running the function:
       SIGTERM and SIGCONT -> ``bypass`` (only logged: a plain ``scancel`` is not caught, the job
       is SIGKILLed KillWait seconds later), and ``SIGUSR2`` (``SUBMITIT_PREEMPT_SIGNAL``, default
       USR2) -> ``checkpoint_and_try_requeue``. sbatch gets ``--signal=USR2@<signal_delay_s>``
       (hydra-submitit-launcher default 120 s), so Slurm sends USR2 to the job step that long
       before the time limit; on preemption Slurm sends SIGTERM (+ USR2 with
       ``PreemptParameters=send_user_signal``); by hand: ``scancel --signal=USR2 <jobid>_<task>``.
    2. Without this module, ``checkpoint_and_try_requeue`` runs at once in the main thread
       (between two Python bytecodes, wherever training is): timed out = wall time >=
       min(0.8 x timeout, timeout - 10 min); countdown = max_num_timeout left (minus one if timed
       out). The hydra launcher has ``checkpoint()``, returning ``DelayedSubmission(self, same
       args)`` (same overrides, so the same run directory), which is pickled over the job's
       submitted pickle; then ``scontrol requeue <jobid>`` and ``sys.exit(-1)``: a SystemExit
       that no ``except Exception`` stops, so no result pickle is written and the submitting
       process keeps waiting. If countdown < 0 ("timed-out too many times") it raises
       ``UncompletedJobError`` instead (the job ends, not requeued).
    3. Slurm kills what is left of the job (SIGTERM, SIGKILL after KillWait), keeps it PENDING
       (Reason=BeginTime, AuthInfo cred_expire seconds, default 120), then runs it again with the
       same array ids; submitit unpickles the DelayedSubmission and calls the launcher again.

    With this handler installed (by :meth:`SweepSummary.on_job_start`, inside the job process):
    step 2 only sets :func:`preemption_requested`. The trainer polls it (after each step or epoch),
    writes its checkpoint and ends the run "interrupted" (results.json); train.py returns; then
    :meth:`SweepSummary.on_job_end` records the job as requeued and calls submitit's handler
    (:func:`requeue_if_preempted`): pickle, ``scontrol requeue``, ``sys.exit(-1)``. The requeued
    job claims the same run directory and resumes from the checkpoint.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    try:
        sig = submitit_usr_sig()
        current = signal.getsignal(sig)
        if current is _on_preemption_signal:
            return True
        if not callable(current):  # submitit did not install its handler: nothing to chain to
            return False
        _preempt["submitit_handler"] = current
        signal.signal(sig, _on_preemption_signal)
    except (ImportError, ValueError, RuntimeError) as e:  # ValueError: not the main thread
        log.warning("preemption handler not installed: %s", e)
        return False
    log.info("preemption: %s checkpoints the run and requeues the job", signal.Signals(sig).name)
    return True


def requeue_if_preempted(status: str | None) -> None:
    """After an "interrupted" run whose job got the preemption signal: let submitit requeue it.

    Does not return when submitit requeues (SystemExit). Returns when there is nothing to requeue,
    or when submitit refuses (e.g. timed out more than max_num_timeout times: logged)."""
    handler = _preempt["submitit_handler"]
    if not _preempt["requested"] or handler is None or status != INTERRUPTED:
        return
    try:
        handler(_preempt["signum"], None)
    except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError: not requeued
        log.warning("job not requeued: %s", e)


# -- ledger ---------------------------------------------------------------------------------
def _append(path: Path, record: dict) -> None:
    """One JSON line, appended under an exclusive lock (safe across processes and NFS clients)."""
    import fcntl
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def read_ledger(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed job
            continue
    return records


def _expected_jobs(config) -> tuple[list[list[str]], int] | None:
    """The jobs of this multirun (job num -> overrides) and its first batch size, as Hydra's
    BasicSweeper will expand them; None for another sweeper or when it cannot tell."""
    try:
        from omegaconf import OmegaConf
        sweeper = config.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
        args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        batches = basic_sweeper_batches(args, sweeper.get("max_batch_size"))
        return [job for b in batches for job in b], len(batches[0])
    except Exception as e:  # noqa: BLE001 - the summary then lists the jobs that reported
        log.warning("sweep summary: cannot expand the sweep (%s: %s); jobs that never start will not be listed",
                    type(e).__name__, e)
        return None


def _job_fields(config) -> dict:
    hc = config.hydra
    num = hc.job.get("num")
    return {"num": -1 if num is None else int(num), "launcher": launcher_kind(hc),
            "job_id": str(hc.job.get("id")), "overrides": list(hc.overrides.task),
            "run_dir": str(hc.runtime.output_dir), "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.time()}


def _results_status(run_dir: str | None) -> tuple[str | None, str | None]:
    try:
        res = RunDir(run_dir).results() if run_dir else None
    except (OSError, ValueError):  # unreadable: reported as unknown, as before
        res = None
    return (res.get("status"), res.get("message")) if res else (None, None)


def _slurm_state(job_id: str) -> str | None:
    """The job's state in Slurm's accounting (e.g. "CANCELLED by 0", "TIMEOUT"), if it can be had."""
    import shutil
    import subprocess
    if not shutil.which("sacct"):
        return None
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[-1].strip() if lines else None


def summarize(ledger: str | Path, expected: list[list[str]] | None = None) -> tuple[str, int]:
    """(summary text, exit code) of a multirun from its ledger."""
    records = read_ledger(ledger) if Path(ledger).exists() else []
    jobs: dict[Any, dict] = {}
    for r in sorted(records, key=lambda r: r.get("time", 0)):
        key = r.get("num") if r.get("num", -1) >= 0 else tuple(r.get("overrides") or ())
        job = jobs.setdefault(key, {"overrides": r.get("overrides"), "run_dir": None, "end": None, "slurm": None})
        job["run_dir"] = r.get("run_dir") or job["run_dir"]
        if r.get("launcher") == "submitit_slurm":
            job["slurm"] = r.get("job_id")
        if r.get("event") == "end":
            job["end"] = r
        elif r.get("event") == "requeued":
            job["end"] = None
    for num, overrides in enumerate(expected or []):
        jobs.setdefault(num, {"overrides": overrides, "run_dir": None, "end": None, "slurm": None})
    rows = []  # one per job: status, run_dir, message, overrides, slurm (its state when it did not report)
    for key in sorted(jobs, key=lambda k: (isinstance(k, tuple), k)):
        job = jobs[key]
        row = {"status": None, "run_dir": job["run_dir"], "message": None, "overrides": job["overrides"] or [],
               "slurm": None, "remedy": None}
        if job["end"] is not None:
            e = job["end"]
            row.update(status=e.get("status") or FAILED, run_dir=e.get("run_dir") or job["run_dir"],
                       message=e.get("message"), remedy=e.get("remedy"))
        else:  # started (and maybe cancelled or killed), or never started
            status, message = _results_status(job["run_dir"])
            if status in DONE:
                row.update(status=status)
            else:
                row["slurm"] = _slurm_state(job["slurm"]) if job["slurm"] else None
                why = ("never started" if job["run_dir"] is None else
                       f"{RunDir(job['run_dir']).results_path.name}: {status}" if status else
                       f"no {RunDir(job['run_dir']).results_path.name}")
                if row["slurm"]:
                    why += f"; Slurm job {job['slurm']}: {row['slurm']}"
                row.update(status=NOT_REPORTED, message=why + (f": {message}" if message else ""))
        rows.append(row)
    counts = dict.fromkeys([FINISHED, SKIPPED, FAILED, INTERRUPTED, NOT_REPORTED], 0)
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"sweep summary: {len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()
                                                               if n or s in (FINISHED, SKIPPED, FAILED)),
             f"  ledger: {ledger}"]
    bad = [r for r in rows if r["status"] not in DONE]
    # show what tells the jobs apart: the overrides that not every job of the sweep shares
    shared = set.intersection(*[set(r["overrides"]) for r in rows]) if len(rows) > 1 else set()
    for r in bad:
        own = [o for o in r["overrides"] if o not in shared] or r["overrides"]
        lines.append(f"  {r['status']}: {r['run_dir'] or '(no run directory)'}")
        lines.append(f"    overrides: {' '.join(own) or '(none)'}")
        if r["message"]:
            first, *rest = str(r["message"]).strip().splitlines() or [""]
            lines.append(f"    {first}" + (f" [... {len(rest)} more lines in the job log]" if rest else ""))
        if r["remedy"] == "overwrite":
            lines.append("    way out: re-run this job with overwrite=true (its earlier attempt cannot be resumed)")
    live = [r for r in bad if (r["slurm"] or "").split(" ")[0] in SLURM_ALIVE]
    if live:
        lines.append(f"  {len(live)} of these jobs are still queued or running on Slurm (squeue): they may finish "
                     "on their own; re-run the command only once they have ended")
    stuck = [r for r in bad if r["remedy"] == "overwrite"]
    if bad:
        lines.append(f"sweep incomplete: {len(bad)} of {len(rows)} jobs did not finish; re-run the same command "
                     f"to resume {'the others' if stuck else 'them'} (finished runs are skipped)" +
                     (f"; {len(stuck)} cannot be resumed (corrupt checkpoint): re-run those with overwrite=true"
                      if stuck else ""))
    return "\n".join(lines), (1 if bad else 0)


class SweepSummary(Callback):
    """Hydra callback: a per-invocation ledger of job outcomes, a summary and a non-zero exit
    code when any job of a multirun failed or never reported (see the module docstring)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.ledger: str | None = None
        self.expected: list[list[str]] | None = None
        self._reported = False

    def _ledger_path(self) -> Path | None:
        p = os.environ.get(LEDGER_ENV) or self.ledger
        return Path(p) if p and self.enabled else None

    def on_multirun_start(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001 - an interpolation that only resolves inside a job
            sweep_dir = Path.cwd() / "multirun"
        ledger = sweep_dir / ".sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.touch()
        self.ledger = str(ledger.resolve())
        os.environ[LEDGER_ENV] = self.ledger
        # jobs started from another working directory (submitit, Slurm) must still import this repo
        root = str(Path(__file__).resolve().parents[1])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
        expanded = _expected_jobs(config)
        if expanded is not None:
            self.expected, batch = expanded
            os.environ[BATCH_ENV] = str(batch)
        atexit.register(self._report_at_exit)

    def on_job_start(self, config, **kwargs) -> None:
        path = self._ledger_path()
        if path is None or not _is_multirun(config):
            return
        install_preemption_handler()
        _append(path, dict(_job_fields(config), event="start"))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        path = self._ledger_path()
        if path is None or not _is_multirun(config):
            return
        from hydra.core.utils import JobStatus
        rec = _job_fields(config)
        if job_return.status == JobStatus.FAILED:
            e = job_return_value(job_return)
            message = f"{type(e).__name__}: {e}"
            log.error("job failed: %s", message, exc_info=(type(e), e, e.__traceback__))
            rec.update(status=FAILED, message=message[:MESSAGE_CHARS])
            # failure isolation: the sweeper would re-raise this and drop the remaining batches
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = {"status": FAILED, "run_dir": rec["run_dir"], "message": message,
                                       "final_acc": None}
        else:
            ret = job_return_value(job_return)
            if isinstance(ret, dict) and ret.get("status"):
                rec.update(status=ret["status"], run_dir=ret.get("run_dir") or rec["run_dir"],
                           message=(str(ret["message"])[:MESSAGE_CHARS] if ret.get("message") else None),
                           final_acc=ret.get("final_acc"), remedy=ret.get("remedy"))
            else:  # a task function without the status contract: trust its results.json
                status, message = _results_status(rec["run_dir"])
                rec.update(status=status or FINISHED, message=message)
        rec.update(threads=_threads.get("threads"))
        if rec["status"] == INTERRUPTED and preemption_requested() and _preempt["submitit_handler"]:
            _append(path, dict(rec, event="requeued"))
            requeue_if_preempted(rec["status"])  # SystemExit when submitit requeues the job
        _append(path, dict(rec, event="end"))

    def on_multirun_end(self, config, **kwargs) -> None:
        code = self.report()
        if code:
            raise SystemExit(code)  # not an Exception: Hydra lets it through, train.py exits non-zero

    def report(self) -> int:
        """Print the summary once; returns the exit code it calls for."""
        if self._reported or not self.ledger:
            return 0
        self._reported = True
        text, code = summarize(self.ledger, self.expected)
        print(text, flush=True)
        return code

    def _report_at_exit(self) -> None:
        if not self._reported:
            try:
                self.report()
            except Exception as e:  # noqa: BLE001 - never mask the original error
                print(f"sweep summary unavailable: {e}", file=sys.stderr)


def _is_multirun(config) -> bool:
    try:
        return config.hydra.mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no hydra node
        return False
