"""Sweeps that survive (engine/sweep.py): failure isolation and the summary under the basic, joblib and
submitit launchers, each job's share of the CPU threads, the preemption flag.

The end-to-end tests run tiny demo sweeps (1 epoch of 2 steps) in subprocesses; measured on 2 busy
CPU cores: basic ~25 s, joblib ~20 s, submitit ~30 s.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine import sweep

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["experiment=demo", "optim.epochs=1", "optim.warmup_epochs=0", "eval_every=1", "max_train_steps=2",
         "logger=none", "progress=false"]
NE_MSG = "method.ne must be a positive int, got 0"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Data and cache shared by the sweeps of this module (the digits are decoded once)."""
    return tmp_path_factory.mktemp("sweep_shared")


def multirun(args, out: Path, shared: Path, timeout=600):
    env = dict(os.environ, VTAB_ROOT=str(shared / "data"), LILY_CACHE=str(shared / "cache"), HYDRA_FULL_ERROR="0",
               WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    env.pop(sweep.LEDGER_ENV, None)
    env.pop(sweep.BATCH_ENV, None)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SHORT, *args, f"paths.output_dir={out}"]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)


def results(out: Path) -> dict:
    """ne -> results.json of every run of the sweep."""
    found = {}
    for p in (out / "runs").glob("*/*/*/*/results.json"):
        res = json.loads(p.read_text())
        found[res["identity"]["method"]["ne"] if "identity" in res else p.parent.name] = res
    return found


def ledger_records(out: Path) -> list[dict]:
    ledgers = sorted((out / "runs" / ".sweeps").glob("*.jsonl"))
    assert ledgers, "no ledger written"
    return sweep.read_ledger(ledgers[-1])


def check_failed_sweep(proc, out: Path, finished_ne: set, failed_ne=0):
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-4000:]
    summary = proc.stdout[proc.stdout.index("sweep summary:"):]
    print(summary)  # shown with pytest -s: the summary a user sees
    n = len(finished_ne) + 1
    assert f"sweep summary: {n} jobs: {n - 1} finished, 0 skipped, 1 failed" in summary
    assert NE_MSG in summary and f"    overrides: method.ne={failed_ne}\n" in summary  # what sets the job apart
    res = results(out)
    assert {ne for ne, r in res.items() if r["status"] == "finished"} == finished_ne, res
    assert res[failed_ne]["status"] == "failed" and NE_MSG in res[failed_ne]["message"]
    assert f"  failed: {res[failed_ne]['run_dir']}" in summary
    ends = [r for r in ledger_records(out) if r["event"] == "end"]
    assert sorted(r["num"] for r in ends) == list(range(n))
    assert {r["status"] for r in ends} == {"finished", "failed"}
    return res, ends


# -- end to end -------------------------------------------------------------------------------
def test_basic_launcher_failed_job_is_isolated_summarized_and_exit_is_nonzero(tmp_path, shared):
    out = tmp_path / "out"
    proc = multirun(["method.ne=2,0,3"], out, shared)
    check_failed_sweep(proc, out, {2, 3})
    # a sweep whose runs are all finished (skipped now): exit 0
    done = multirun(["method.ne=2,3"], out, shared)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "2 jobs: 0 finished, 2 skipped, 0 failed" in done.stdout
    assert len(list((out / "runs" / ".sweeps").glob("*.jsonl"))) == 2  # one ledger per invocation


def test_joblib_launcher_failed_job_and_thread_share(tmp_path, shared):
    out = tmp_path / "out"
    proc = multirun(["method.ne=2,0,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], out, shared)
    res, ends = check_failed_sweep(proc, out, {2, 3})
    cpus, _ = sweep.available_cpus()
    share = max(1, cpus // 2)
    assert {r["threads"] for r in ends} == {share}
    assert res[2]["threads"] == res[3]["threads"] == share
    assert len({r["pid"] for r in ends} | {os.getpid()}) >= 3  # worker processes, not this one


def test_submitit_local_four_jobs_one_thread_each_and_failed_job(tmp_path, shared):
    """4 jobs started at once on this machine: each takes max(1, cpus // 4) threads (1 on 2 cores)."""
    out = tmp_path / "out"
    proc = multirun(["method.ne=2,0,3,4", "hydra/launcher=submitit_cpu"], out, shared)
    res, ends = check_failed_sweep(proc, out, {2, 3, 4})
    cpus, _ = sweep.available_cpus()
    share = max(1, cpus // 4)
    assert [r["threads"] for r in sorted(ends, key=lambda r: r["num"])] == [share] * 4
    assert all(res[ne]["threads"] == share for ne in (2, 3, 4))
    assert len({r["pid"] for r in ends}) == 4  # one process per job
    logs = "".join(p.read_text() for p in (out / "runs" / ".submitit").glob("*/*_log.out"))
    assert f"threads: {share} ({cpus} CPUs / 4 submitit_local jobs at once)" in logs


# -- thread share -----------------------------------------------------------------------------
def fake_hydra(monkeypatch, target, **launcher):
    from hydra.types import RunMode
    hc = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"_target_": target, **launcher}})
    monkeypatch.setattr(sweep, "_hydra_config", lambda: hc)


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.fixture
def sixteen_cpus(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", sweep.BATCH_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))


def test_thread_share_per_launcher(monkeypatch, sixteen_cpus):
    cfg = OmegaConf.create({"threads": "auto"})
    monkeypatch.setattr(sweep, "_hydra_config", lambda: None)
    assert sweep.thread_share(cfg)[0] is None                       # single run: torch's default
    assert sweep.thread_share(OmegaConf.create({"threads": 3}))[0] == 3
    assert sweep.thread_share(OmegaConf.create({"threads": "x"}))[0] is None  # preflight reports it
    fake_hydra(monkeypatch, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    assert sweep.thread_share(cfg)[0] is None                       # one job at a time
    fake_hydra(monkeypatch, JOBLIB, n_jobs=4)
    assert sweep.thread_share(cfg)[0] == 4
    fake_hydra(monkeypatch, JOBLIB, n_jobs=-1)                       # one worker per CPU
    assert sweep.thread_share(cfg)[0] == 1
    monkeypatch.setenv(sweep.BATCH_ENV, "2")                        # but only 2 jobs in the sweep
    assert sweep.thread_share(cfg)[0] == 8
    fake_hydra(monkeypatch, SUBMITIT_LOCAL, cpus_per_task=None)
    assert sweep.thread_share(cfg)[0] == 8
    monkeypatch.setenv(sweep.BATCH_ENV, "32")                       # more jobs than CPUs: 1 each
    assert sweep.thread_share(cfg)[0] == 1
    monkeypatch.setenv(sweep.BATCH_ENV, "4")
    fake_hydra(monkeypatch, SUBMITIT_LOCAL, cpus_per_task=2)        # cpus_per_task caps the share
    assert sweep.thread_share(cfg)[0] == 2
    fake_hydra(monkeypatch, SUBMITIT_SLURM, cpus_per_task=6)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert sweep.thread_share(cfg) == (6, "SLURM_CPUS_PER_TASK=6")
    fake_hydra(monkeypatch, JOBLIB, n_jobs=2)                        # joblib inside a Slurm allocation
    assert sweep.thread_share(cfg)[0] == 3


def test_configure_threads_sets_torch_and_env(monkeypatch, sixteen_cpus):
    import torch
    before = torch.get_num_threads()
    for var in sweep.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    fake_hydra(monkeypatch, JOBLIB, n_jobs=8)
    try:
        assert sweep.configure_threads(OmegaConf.create({"threads": "auto"})) == 2
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


# -- summary and ledger -----------------------------------------------------------------------
def job_config(tmp_path, num, overrides, run_dir):
    from hydra.types import RunMode
    return OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num, "id": f"j{num}"},
                                       "overrides": {"task": overrides}, "runtime": {"output_dir": str(run_dir)}}})


def test_summary_counts_jobs_that_never_reported(tmp_path, monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(sweep.LEDGER_ENV, str(ledger))
    cb = sweep.SweepSummary()
    runs = [tmp_path / f"run{i}" for i in range(4)]
    for r in runs:
        r.mkdir()
    # job 0 finished, job 1 skipped, job 2 was cancelled while running (no end line), job 3 never started
    for num, status in ((0, "finished"), (1, "skipped")):
        cfg = job_config(tmp_path, num, [f"a={num}"], runs[num])
        cb.on_job_start(cfg)
        ret = JobReturn(status=JobStatus.COMPLETED)
        ret.return_value = {"status": status, "run_dir": str(runs[num]), "message": None, "final_acc": 50.0}
        cb.on_job_end(cfg, ret)
    cb.on_job_start(job_config(tmp_path, 2, ["a=2"], runs[2]))
    (runs[2] / "results.json").write_text(json.dumps({"status": "running"}))
    text, code = sweep.summarize(ledger, expected=[["a=0"], ["a=1"], ["a=2"], ["a=3"]])
    assert code == 1
    assert text.startswith("sweep summary: 4 jobs: 1 finished, 1 skipped, 0 failed, 2 did not report")
    assert f"did not report: {runs[2]}\n    overrides: a=2\n    results.json: running" in text
    assert "did not report: (no run directory)\n    overrides: a=3\n    never started" in text
    # a cancelled job whose run had in fact finished counts as finished
    (runs[2] / "results.json").write_text(json.dumps({"status": "finished"}))
    text, code = sweep.summarize(ledger, expected=[["a=0"], ["a=1"], ["a=2"]])
    assert code == 0 and "3 jobs: 2 finished, 1 skipped, 0 failed" in text


def test_exception_escaping_the_task_is_recorded_and_isolated(tmp_path, monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(sweep.LEDGER_ENV, str(ledger))
    cfg = job_config(tmp_path, 0, ["a=1"], tmp_path / "run")
    ret = JobReturn(status=JobStatus.FAILED)
    ret.return_value = RuntimeError("boom")
    sweep.SweepSummary().on_job_end(cfg, ret)
    (rec,) = sweep.read_ledger(ledger)
    assert rec["status"] == "failed" and rec["message"] == "RuntimeError: boom" and rec["overrides"] == ["a=1"]
    # the sweeper sees a completed job (it would re-raise and drop the remaining batches otherwise)
    assert ret.status == JobStatus.COMPLETED and ret.return_value["status"] == "failed"
    text, code = sweep.summarize(ledger)
    assert code == 1 and "RuntimeError: boom" in text


def test_on_multirun_end_raises_systemexit_when_incomplete(tmp_path, monkeypatch, capsys):
    cb = sweep.SweepSummary()
    monkeypatch.setattr(sweep, "_expected_jobs", lambda config: ([["a=0"]], 1))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    cb.on_multirun_start(cfg)
    try:
        assert Path(os.environ[sweep.LEDGER_ENV]).parent == tmp_path / "sweep" / ".sweeps"
        assert os.environ[sweep.BATCH_ENV] == "1"
        with pytest.raises(SystemExit) as e:
            cb.on_multirun_end(cfg)
        assert e.value.code == 1 and "1 did not report" in capsys.readouterr().out
        cb._report_at_exit()  # the atexit hook does not print it twice
        assert capsys.readouterr().out == ""
    finally:
        os.environ.pop(sweep.LEDGER_ENV, None)
        os.environ.pop(sweep.BATCH_ENV, None)


def test_expected_jobs_follow_the_basic_sweeper():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                                  "max_batch_size": 2, "params": {"method.scale": "0.1,1"}},
                                      "overrides": {"task": ["method.ne=2,4", "seed=1"]}}})
    jobs, batch = sweep._expected_jobs(cfg)
    assert batch == 2 and len(jobs) == 4
    assert jobs[0] == ["method.scale=0.1", "method.ne=2", "seed=1"] and jobs[3][:2] == ["method.scale=1", "method.ne=4"]


# -- preemption -------------------------------------------------------------------------------
def test_preemption_signal_sets_the_flag_and_requeues_through_submitit(monkeypatch):
    from submitit.core.job_environment import JobEnvironment
    sig = JobEnvironment._usr_sig()
    calls = []
    old = signal.signal(sig, lambda signum, frame: calls.append(signum))  # stands for submitit's handler
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    try:
        assert sweep.install_preemption_handler()
        assert not sweep.preemption_requested()
        os.kill(os.getpid(), sig)
        assert sweep.preemption_requested() and calls == []  # only the flag: the trainer checkpoints first
        sweep.requeue_if_preempted("finished")                # a run that finished anyway: no requeue
        assert calls == []
        sweep.requeue_if_preempted("interrupted")
        assert calls == [sig]
    finally:
        signal.signal(sig, old)
        sweep._preempt.update(requested=False, signum=None, submitit_handler=None)


def test_no_preemption_handler_outside_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not sweep.install_preemption_handler()
