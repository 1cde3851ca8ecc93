"""The run directory's one owner (engine/run.py RunDir), the trainer as a loop, the pinned private
accesses of submitit and Hydra, and faults met with one clear message (fast, in-process parts;
the entry-point parts are in tests/test_faults.py)."""
import ast
import errno
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from engine import run as run_mod
from engine.run import CorruptRun, RunDir, load_predictions, readable

ROOT = Path(__file__).resolve().parents[1]

# The run directory's file names (substrings of any literal) and statuses (exact literals).
FILE_NAMES = ("identity.json", "results.json", "checkpoint.pt", "experts.json", "config.yaml", "predictions-",
              "wandb_id.txt")
STATUS_STRINGS = {"running", "finished", "interrupted", "failed"}
# Files of other helpers that still spell a name or a status; they are to move to engine.run's
# constants. This list may only shrink.
PENDING_ELSEWHERE = {"results/tables.py", "results/paired.py"}


def _literals(path: Path):
    """(line, text) of every string literal in code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def _code_files():
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[0] not in (".venv", "tests", ".git", "shared") and "site-packages" not in rel.parts:
            yield rel


def test_run_directory_names_and_statuses_are_spelled_in_engine_run_only():
    found = {}
    for rel in _code_files():
        for line, text in _literals(ROOT / rel):
            if text in STATUS_STRINGS or any(n in text for n in FILE_NAMES):
                found.setdefault(str(rel), []).append((line, text))
    assert "engine/run.py" in found  # the test sees the definitions
    others = {f: hits for f, hits in found.items() if f != "engine/run.py" and f not in PENDING_ELSEWHERE}
    assert not others, others


def test_private_accesses_each_live_in_one_place():
    needles = {"_usr_sig": [], "_return_value": [], "basic_sweeper": []}
    for rel in _code_files():
        text = (ROOT / rel).read_text()
        for needle in needles:
            if needle in text:
                needles[needle].append(str(rel))
    assert needles == {k: ["engine/sweep.py"] for k in needles}, needles


def _pin(name: str) -> str:
    m = re.search(rf"^{re.escape(name)}==([^\s#]+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert m, f"{name} is not pinned in requirements.txt"
    return m.group(1)


def test_pinned_submitit_and_hydra_still_behave_as_the_sweep_layer_reads_them():
    from importlib.metadata import version

    from hydra.core.utils import JobReturn, JobStatus

    from engine import sweep
    # the installed versions are the pinned ones
    assert version("submitit") == _pin("submitit") and version("hydra-core") == _pin("hydra-core")
    # submitit's job process listens to SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    assert sweep.submitit_usr_sig() == signal.SIGUSR2
    # a failed JobReturn: .return_value re-raises, the private field hands the exception over
    ret = JobReturn(status=JobStatus.FAILED)
    ret.return_value = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        _ = ret.return_value
    assert isinstance(sweep.job_return_value(ret), RuntimeError)
    # BasicSweeper's expansion: cartesian product, batches of max_batch_size
    batches = sweep.basic_sweeper_batches(["a=1,2", "b=x,y,z"], 4)
    assert [len(b) for b in batches] == [4, 2] and batches[0][0] == ["a=1", "b=x"]


def test_the_trainer_imports_nothing_from_the_sweep_layer():
    tree = ast.parse((ROOT / "engine" / "trainer.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("sweep" in (m or "") or m in ("engine.run", "engine.job") for m in modules), modules


# -- identity: directory names ------------------------------------------------------------------
def test_readable_name_uses_the_headline_values_a_method_has():
    base = {"recipe": {"name": "authors"}, "protocol": {"name": "paper"}, "seed": 42}
    lily = dict(base, method={"name": "lily_qvffn_tiny", "ne": 3, "scale": 1.0, "rank": 8})
    assert readable(lily) == "ne3-s1-authors-paper-seed42"          # Lily: unchanged
    assert readable(dict(base, method={"name": "lora", "rank": 32, "scale": 1.0})) == "s1-authors-paper-seed42"
    assert readable(dict(base, method={"name": "vpt", "rank": 8})) == "r8-authors-paper-seed42"
    assert readable(dict(base, method={"name": "bitfit"})) == "authors-paper-seed42"
    assert readable(dict(base, method=None)) == "authors-paper-seed42"


# -- atomic writes and file-system faults -------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_named_and_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    run_mod.write_json(rd.results_path, {"status": "old"})
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(UserError, match="no space left on the device while writing .*results.json"):
        run_mod.write_json(rd.results_path, {"status": "new"})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file
    assert json.loads(rd.results_path.read_text()) == {"status": "old"}


def test_output_path_that_is_a_file_or_read_only_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "out"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"{blocker} is a file, not a folder"):
        run_mod.check_output_dir(blocker / "sub")
    e = run_mod.os_error(OSError(errno.ENOTDIR, "Not a directory"), blocker / "runs" / "x.json")
    assert f"{blocker} is a file" in str(e)
    monkeypatch.setattr(run_mod.os, "access", lambda p, mode: False)  # root ignores chmod: simulate
    with pytest.raises(UserError, match="is not writable"):
        run_mod.check_output_dir(tmp_path / "new")
    assert "read-only" in str(run_mod.os_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "a"))


# -- checkpoint, overwrite, predictions ------------------------------------------------------------
def test_a_truncated_checkpoint_is_named_with_the_way_out(tmp_path):
    rd = RunDir(tmp_path)
    rd.checkpoint_path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptRun) as e:
        rd.load_checkpoint(torch.nn.Linear(2, 2))
    assert str(rd.checkpoint_path) in str(e.value) and "overwrite=true" in str(e.value)
    assert e.value.remedy == "overwrite"
    assert "weights_only" not in str(e.value)


def test_overwrite_removes_every_artefact_of_the_earlier_attempt(tmp_path):
    from omegaconf import OmegaConf
    rd = RunDir(tmp_path)
    old = ["results.json", "experts.json", "config.yaml", "checkpoint.pt", "eval-test-fp32.json",
           "eval-test-fp32.npz", "predictions-final.npz", "predictions-selected.npz", "wandb_id.txt"]
    for name in old:
        (tmp_path / name).write_text("{}")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "train.log").write_text("this invocation's log")
    run_mod.write_json(rd.identity_path, {"run_id": "abc", "identity": {}})
    c = rd.claim("abc", resume=True, overwrite=True)
    assert c.action == "new" and all((tmp_path / n).exists() for n in old)  # nothing deleted before begin
    results = rd.begin(c, {}, "abc", OmegaConf.create({"a": 1}), {"run_id": "abc"})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["config.yaml", "identity.json", "results.json", "train.log"], left
    assert results["status"] == rd.results()["status"] == run_mod.RUNNING


def _ev(n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    label = torch.randint(0, classes, (n,), generator=g)
    top = logits.topk(min(5, classes), dim=-1)
    pred = logits.argmax(-1)
    return {"pred": pred, "label": label, "topk_index": top.indices, "topk_logit": top.values,
            "acc": 100.0 * (pred == label).sum().item() / n}


def test_predictions_round_trip_in_the_agreed_format(tmp_path):
    rd = RunDir(tmp_path)
    ev = _ev()
    files = [f"images/test/{i:06d}.png" for i in range(6)]
    rd.save_predictions("final", ev, files, epoch=7, split="test")
    p = load_predictions(tmp_path)
    assert p["pred"].dtype == np.int32 and p["label"].dtype == np.int32 and p["topk_index"].dtype == np.int32
    assert p["topk_logit"].dtype == np.float16 and p["topk_index"].shape == (6, 3) and p["pred"].shape == (6,)
    assert list(p["files"]) == files and p["epoch"] == 7 and p["split"] == "test"
    assert isinstance(p["accuracy"], float) and p["accuracy"] == ev["acc"]
    assert p["accuracy"] == 100.0 * float((p["pred"] == p["label"]).mean())
    assert (p["topk_index"][:, 0] == p["pred"]).all()
    with pytest.raises(UserError, match="predictions-selected.npz"):
        load_predictions(tmp_path, "selected")
    run_mod.write_json(rd.results_path, {"select": "final"})  # a run that reports its final epoch
    assert load_predictions(tmp_path, "selected")["epoch"] == 7
    no_tmp = [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
    assert not no_tmp


def test_step_evaluate_returns_predictions_that_match_its_accuracy():
    from engine import step
    from data.folder import SplitData
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7))
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 7, (10,))
    data = SplitData(images, labels, None, "test", True, 0, "")
    ev = step.evaluate(model, data, batch_size=4, device="cpu", normalization="none", precision="fp32",
                       predictions=True)
    logits = model(images.float() / 255)
    assert torch.equal(ev["pred"], logits.argmax(-1)) and torch.equal(ev["label"], labels)
    assert ev["topk_index"].shape == (10, 5) and torch.allclose(ev["topk_logit"], logits.topk(5).values)
    assert ev["acc"] == 100.0 * (ev["pred"] == labels).sum().item() / 10


# -- images ------------------------------------------------------------------------------------------
def test_a_16_bit_png_is_scaled_to_8_bit_not_clipped(tmp_path):
    from PIL import Image

    from data.folder import Entry, decode_image
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    out = decode_image(Entry(tmp_path / "a.png", 0, "list:1"), 8, Image.Resampling.NEAREST)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert (out == expected[None]).all()
    assert (out == 255).mean() < 0.05  # convert("RGB") made most of these 255
    Image.fromarray(np.ones((4, 4), np.float32) * 3.5).save(tmp_path / "f.tiff")
    with pytest.raises(UserError, match=r"f\.tiff.*list:2.*mode F"):
        decode_image(Entry(tmp_path / "f.tiff", 0, "list:2"), 8, Image.Resampling.NEAREST)


# -- the sweep summary on a corrupt checkpoint ----------------------------------------------------
def test_sweep_summary_says_overwrite_for_a_corrupt_checkpoint_not_resume(tmp_path):
    from engine import sweep
    ledger = tmp_path / "ledger.jsonl"
    recs = [{"event": "end", "num": 0, "status": "finished", "run_dir": "a", "overrides": ["x=0"], "time": 1},
            {"event": "end", "num": 1, "status": "failed", "run_dir": "b", "overrides": ["x=1"], "time": 2,
             "message": "b/checkpoint.pt cannot be read", "remedy": "overwrite"},
            {"event": "end", "num": 2, "status": "interrupted", "run_dir": "c", "overrides": ["x=2"], "time": 3,
             "message": "stopped after epoch 1"}]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text, code = sweep.summarize(ledger)
    assert code == 1
    assert "    way out: re-run this job with overwrite=true" in text
    assert "resume the others" in text and "1 cannot be resumed (corrupt checkpoint): re-run those with overwrite=true" \
        in text


# -- the clean protocol checks its command line before stage 1 ------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--seeds", "abc"], "'abc' is not a seed"),
    (["--search", "method.zzz"], "--search method.zzz: no such key"),
    (["seed=4x"], "'4x' is not a seed"),
])
def test_clean_protocol_refuses_bad_options_before_stage_1(argv, needle, monkeypatch, capsys, tmp_path):
    from results import clean
    monkeypatch.setattr(clean, "run_stage", lambda *a, **k: pytest.fail("stage 1 started"))
    with pytest.raises(SystemExit) as e:
        clean.main(["experiment=demo", "method.ne=2,3", f"paths.output_dir={tmp_path}", *argv])
    assert e.value.code != 0 and needle in str(e.value.code)
    assert not (tmp_path / "runs").exists()


def test_shell_scripts_the_readme_runs_as_commands_are_executable():
    import os
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"(?<![\w/])(?:\./)?(scripts/[\w.-]+\.sh)\s+[a-z]", readme))
    assert "scripts/local_slurm.sh" in shown
    for rel in shown:
        path = ROOT / rel
        assert path.read_text().startswith("#!") and os.access(path, os.X_OK), rel
