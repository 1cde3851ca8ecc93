"""Sweeps on a real Slurm cluster (hydra/launcher=slurm through submitit): a cancelled job loses
nothing, a preempted job checkpoints, is requeued and resumes.

Needs a running cluster: ``bash scripts/local_slurm.sh start`` (a one-node cluster on this machine;
.ci/run starts it when it can). Marked ``slurm`` and ``slow`` (each test takes 1-2 minutes: Slurm
scheduling passes, KillWait, the requeue delay): run them with ``python -m pytest -q -m slurm``.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import sweep

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30"]
# ~1.3 s per epoch at 1 thread (15 steps of 64 images): long enough to act on a running job
LONG = ["experiment=demo", "optim.warmup_epochs=0", "logger=none", "progress=false"]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm client commands not found (sinfo, sbatch): run `bash scripts/local_slurm.sh start` as root")
    script = ["bash", str(ROOT / "scripts" / "local_slurm.sh")]
    if subprocess.run(script + ["status"], capture_output=True, text=True).returncode != 0:
        started = subprocess.run(script + ["start"], capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            pytest.skip(f"the Slurm cluster cannot start: {(started.stdout + started.stderr).strip()[-500:]}")


def env_for(tmp: Path) -> dict:
    env = dict(os.environ, VTAB_ROOT=str(tmp / "data"), LILY_CACHE=str(tmp / "cache"), HYDRA_FULL_ERROR="0",
               WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    for var in (sweep.LEDGER_ENV, sweep.BATCH_ENV, "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK"):
        env.pop(var, None)
    return env


def command(tmp: Path, args) -> list:
    return [sys.executable, str(ROOT / "train.py"), "-m", *LONG, *args, *SLURM, f"paths.output_dir={tmp / 'out'}"]


def wait_until(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the sweep ended before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ledger_start(tmp: Path, num: int) -> dict | None:
    """The ledger's first 'start' record of job ``num`` (its Slurm id and run directory)."""
    for ledger in sorted((tmp / "out" / "runs" / ".sweeps").glob("*.jsonl")):
        for r in sweep.read_ledger(ledger):
            if r.get("event") == "start" and r.get("num") == num:
                return r
    return None


def epochs_done(run_dir: Path) -> int:
    """Epochs logged so far in the run's train.log (all attempts)."""
    log = run_dir / "train.log"
    return len(re.findall(r"\bepoch \d+/\d+ ", log.read_text())) if log.exists() else 0


def array_drained(array_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", array_id, "-o", "%i %T"], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def test_cancelled_job_resumes_when_the_same_sweep_is_run_again(tmp_path, cluster):
    args = ["method.ne=2,3,4", "optim.epochs=20", "eval_every=20"]
    env = env_for(tmp_path)
    first = subprocess.Popen(command(tmp_path, args), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    start = wait_until(lambda: ledger_start(tmp_path, 0), 240, "job 0 to start", first)
    run_dir = Path(start["run_dir"])
    job_id = start["job_id"]                 # <array id>_<task id>: the sweep is ONE array job
    array_id = job_id.split("_")[0]
    assert re.fullmatch(r"\d+_0", job_id), job_id
    wait_until(lambda: (run_dir / "checkpoint.pt").exists(), 240, "job 0's first checkpoint", first)
    subprocess.run(["scancel", job_id], check=True)
    out, err = first.communicate(timeout=600)
    # submitit raises for the cancelled job: the sweep stops with exit 1 and the summary (atexit)
    assert first.returncode == 1, out[-3000:] + err[-3000:]
    assert "sweep summary: 3 jobs:" in out and f"did not report: {run_dir}" in out, out[-3000:]
    assert f"Slurm job {job_id}: CANCELLED" in out, out[-3000:]
    print(out[out.index("sweep summary:"):])  # shown with pytest -s
    wait_until(lambda: array_drained(array_id), 300, "the other array tasks to end")
    cancelled_at = epochs_done(run_dir)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"  # killed mid-run
    assert 1 <= cancelled_at < 20

    again = subprocess.run(command(tmp_path, args), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep summary: 3 jobs: 1 finished, 2 skipped, 0 failed" in again.stdout, again.stdout[-2000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*/*/*/*/results.json")]
    assert len(runs) == 3 and all(r["status"] == "finished" for r in runs), runs
    log = (run_dir / "train.log").read_text()
    resumed = re.findall(r"resumed from \S+ at epoch (\d+)", log)
    assert resumed and int(resumed[-1]) >= 1, log[-2000:]
    # the second submission trained only the missing epochs
    assert epochs_done(run_dir) - cancelled_at == 20 - int(resumed[-1])
    assert json.loads((run_dir / "results.json").read_text())["threads"] == 1  # SLURM_CPUS_PER_TASK


def test_preempted_job_checkpoints_is_requeued_and_resumes(tmp_path, cluster):
    """scancel --signal=USR2 is what Slurm sends signal_delay_s before a time limit (and on preemption
    with send_user_signal): the run stops "interrupted" after its checkpoint, SweepSummary.on_job_end
    lets submitit requeue the job (scontrol requeue), and the same sweep process collects its result."""
    args = ["method.ne=2,3", "optim.epochs=10", "eval_every=10"]
    proc = subprocess.Popen(command(tmp_path, args), cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start = wait_until(lambda: ledger_start(tmp_path, 0), 240, "job 0 to start", proc)
    run_dir = Path(start["run_dir"])
    wait_until(lambda: (run_dir / "checkpoint.pt").exists(), 240, "job 0's first checkpoint", proc)
    subprocess.run(["scancel", "--signal=USR2", start["job_id"]], check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "sweep summary: 2 jobs: 2 finished, 0 skipped, 0 failed" in out, out[-2000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["attempts"] == 2, res
    log = (run_dir / "train.log").read_text()
    # the trainer stops after the current step (mid-epoch checkpoint) or after the current epoch
    mid = re.findall(r"preempted in epoch (\d+) after step (\d+)", log)
    after = re.findall(r"stopped after epoch (\d+)", log)
    resumed = re.findall(r"resumed from \S+ at epoch (\d+)", log)
    assert (mid or after) and resumed, log[-3000:]
    completed = int(mid[-1][0]) - 1 if mid else int(after[-1])
    assert int(resumed[-1]) == completed, log[-3000:]
    assert epochs_done(run_dir) == 10  # every epoch logged once: none lost, none repeated
    records = [r for ledger in (tmp_path / "out" / "runs" / ".sweeps").glob("*.jsonl")
               for r in sweep.read_ledger(ledger) if r.get("num") == 0]
    assert [r["event"] for r in records] == ["start", "requeued", "start", "end"], records
    submitit_log = "".join(p.read_text() for p in (tmp_path / "out" / "runs" / ".submitit").glob(
        f"{start['job_id']}/{start['job_id']}_0_log.*"))
    assert "Requeued job" in submitit_log, submitit_log[-3000:]
