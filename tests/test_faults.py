"""Faults a user meets, through the real entry points: one clear message naming the file or value,
a non-zero exit, no traceback, and the state after checked (issue 14). Also: the predictions a run
saves equal a fresh evaluation of its checkpoint (issue 17).

Tiny runs (the demo task, 2 epochs of 1 step, evaluated on val200). The end-to-end test runs
train.py 4 times and eval.py 4 times: about 70 s of CPU (7 min wall on 2 cores shared with 8
jobs), so it is marked slow (.ci/run runs it); the others take seconds.
"""
import json
import re

import numpy as np
import pytest

from engine.run import RunDir, load_predictions
from tests.test_train import run, run_dir_of

TINY = ["experiment=demo", "optim.epochs=2", "optim.warmup_epochs=0", "eval_every=1", "max_train_steps=1",
        "protocol.eval_split=val200"]


def clean_failure(proc, *needles):
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    for n in needles:
        assert str(n) in proc.stderr, (n, proc.stderr[-2000:])


@pytest.mark.slow
def test_unfinished_run_eval_overwrite_corrupt_checkpoint_and_predictions(tmp_path):
    run(TINY + ["stop_after_epoch=1"], tmp_path)
    rd = RunDir(run_dir_of(tmp_path))
    assert rd.status() == "interrupted"

    # fault 3: eval.py on an unfinished run warns and records the run's status and checkpoint epoch
    ev = run([str(rd.path), "split=val200", "progress=false"], tmp_path, script="eval.py")
    assert "warning:" in ev.stderr and "not a finished run (status interrupted" in ev.stderr
    out = json.loads((rd.path / "eval-val200-fp32.json").read_text())
    assert out["run_status"] == "interrupted" and out["checkpoint_epoch"] == 1 and out["epochs"] == 2
    assert (rd.path / "eval-val200-fp32.npz").is_file()
    refused = run([str(rd.path), "split=val200", "require_finished=true"], tmp_path, script="eval.py", check=False)
    clean_failure(refused, "not a finished run", "require_finished")
    assert not (rd.path / "eval-val200-fp32-2.json").exists()

    # fault 7: overwrite=true removes every artefact of the earlier attempt, evaluations included
    run(TINY + ["stop_after_epoch=1", "overwrite=true"], tmp_path)
    assert not list(rd.path.glob("eval-*")), sorted(p.name for p in rd.path.iterdir())
    assert rd.status() == "interrupted" and rd.results()["attempts"] == 1

    # fault 4: a truncated checkpoint is named with the way out, on train and eval, every time
    rd.checkpoint_path.write_bytes(rd.checkpoint_path.read_bytes()[:1000])
    for _ in range(2):
        proc = run(TINY, tmp_path, check=False)
        clean_failure(proc, rd.checkpoint_path, "overwrite=true")
        assert rd.status() == "failed" and "overwrite=true" in rd.results()["message"]
    proc = run([str(rd.path), "split=val200"], tmp_path, script="eval.py", check=False)
    clean_failure(proc, rd.checkpoint_path, "overwrite=true")
    assert not list(rd.path.glob(".*.tmp")) and not list(rd.path.glob("*.tmp"))

    # the way out works; the run then saves its predictions
    run(TINY + ["overwrite=true"], tmp_path)
    res = rd.results()
    assert res["status"] == "finished" and re.fullmatch(r"[0-9a-f]{64}", res["data_digest"])  # the copy it read
    final = load_predictions(rd.path)
    assert final["epoch"] == 2 and final["split"] == "val200" and len(final["files"]) == 200
    assert final["accuracy"] == res["final_acc"] == 100.0 * float((final["pred"] == final["label"]).mean())
    selected = load_predictions(rd.path, "selected")
    assert selected["epoch"] == res["best_epoch"] and selected["accuracy"] == res["best_acc"]
    lines = (tmp_path / "data" / "digits" / "val200.txt").read_text().split("\n")
    assert list(final["files"]) == [line.split()[0] for line in lines if line.strip()]

    # issue 17: the saved predictions equal a fresh evaluation of the checkpoint
    run([str(rd.path), "split=val200", "progress=false"], tmp_path, script="eval.py")
    fresh = load_predictions(rd.path, "eval-val200-fp32")
    for key in ("pred", "label", "topk_index", "files"):
        assert np.array_equal(final[key], fresh[key]), key
    assert np.allclose(final["topk_logit"].astype(np.float32), fresh["topk_logit"].astype(np.float32), atol=1e-2)
    assert fresh["accuracy"] == final["accuracy"] and fresh["epoch"] == 2
    assert json.loads((rd.path / "eval-val200-fp32.json").read_text())["run_status"] == "finished"


def test_output_path_that_is_a_file_is_one_message(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    proc = run(TINY, tmp_path, check=False)  # run() points paths.output_dir at tmp_path/out
    clean_failure(proc, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_a_run_refused_by_preflight_leaves_no_directory(tmp_path):
    proc = run(TINY + ["method.ne=0"], tmp_path, check=False)
    clean_failure(proc, "method.ne")
    assert not list((tmp_path / "out" / "runs").glob("*")) if (tmp_path / "out" / "runs").exists() else True


def test_a_full_disk_during_training_is_named_recorded_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    import lily
    from hydra import compose, initialize_config_dir

    import engine.cli  # noqa: F401 - LILY_ROOT, the run_subdir resolver
    from common.errors import UserError
    from engine.cli import ROOT
    from engine.job import run_job
    from engine.run import relative_dir
    monkeypatch.setenv("VTAB_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LILY_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=TINY + ["logger=none", "progress=false", f"paths.output_dir={tmp_path}"])
    rd = RunDir(tmp_path / "runs" / relative_dir(cfg, "lily_qvffn_tiny"))

    def full(model, path, extra=None):
        with open(f"{path}.tmp", "wb") as f:  # lily writes a temp file, then the disk is full
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lily, "save_trainable", full)
    with pytest.raises(UserError, match="no space left on the device while writing .*checkpoint.pt"):
        run_job(cfg, rd.path, "lily_qvffn_tiny")
    assert rd.status() == "failed" and "no space left" in rd.results()["message"]
    assert not [p.name for p in rd.path.iterdir() if p.name.endswith(".tmp")]
    assert not rd.checkpoint_path.exists()
