"""The clean protocol: selection on val200, the chosen experiment files, and (slow) the whole
command on the offline demo: stage 2 trains only the chosen configurations, a re-run trains nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from results.clean import CleanProtocolError, chosen_experiment, split_command_line, write_chosen
from results.runs import load_runs
from tests.test_collect import write_run

ROOT = Path(__file__).resolve().parents[1]


def test_chosen_experiment_pins_groups_values_and_includes_the_experiment():
    text = chosen_experiment(["experiment=demo", "task=dtd", "method=lily_kvffn", "method.ne=4", "method.scale=0.1",
                              "optim.epochs=1", "seed=43", "protocol=search", "sweep=ne_scale", "+extra.key=x"],
                             ["a note"])
    assert text.startswith("# @package _global_\n# a note\n")
    cfg = OmegaConf.create(text)
    assert list(cfg.defaults) == ["/experiment/demo", {"override /task": "dtd"}, {"override /method": "lily_kvffn"},
                                  "_self_"]
    assert cfg.method == {"ne": 4, "scale": 0.1} and cfg.optim.epochs == 1 and cfg.extra.key == "x"
    assert "seed" not in cfg and "protocol" not in cfg and "sweep" not in cfg
    assert cfg.hydra.sweeper.params is None


def test_command_line_split_and_protocol_refused():
    train, hydra = split_command_line(["task=dtd,eurosat", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                                       "method.ne=2,4"])
    assert train == ["task=dtd,eurosat", "method.ne=2,4"] and hydra == ["hydra/launcher=joblib",
                                                                        "hydra.launcher.n_jobs=4"]
    with pytest.raises(CleanProtocolError, match="protocol is set by this script"):
        split_command_line(["protocol=paper"])


def test_selection_uses_the_val_mean_over_seeds_and_rewrites_nothing_unchanged(tmp_path):
    jobs = {}
    # dtd: s=0.1 has the single best seed (75) but s=1.0 the best mean (72 vs 70)
    for scale, accs in ((0.1, (75.0, 65.0)), (1.0, (72.0, 72.0))):
        for seed, acc in zip((42, 43), accs):
            d = write_run(tmp_path / "runs", "dtd", protocol="search", ne=4, scale=scale, seed=seed, best=acc,
                          final=acc)
            jobs[str(d.resolve())] = ["task=dtd", "method=lily_kvffn", f"method.scale={scale}", "method.ne=4",
                                      f"seed={seed}", "protocol=search"]
    d = write_run(tmp_path / "runs", "eurosat", protocol="search", ne=2, scale=0.1, best=90.0)
    jobs[str(d.resolve())] = ["task=eurosat", "method=lily_kvffn", "method.scale=0.1", "method.ne=2",
                              "protocol=search"]
    runs = load_runs(tmp_path / "runs", run_dirs=jobs)
    chosen_root = tmp_path / "chosen"
    sel = write_chosen(runs, jobs, chosen_root).set_index("task")
    assert sel.at["dtd", "grid"] == {"method.ne": 4, "method.scale": 1.0} and sel.at["dtd", "val_mean"] == 72.0
    assert sel.at["dtd", "n"] == 2 and sel.at["dtd", "n_grid"] == 2
    assert sorted(sel["experiment"]) == ["lily_kvffn/dtd", "lily_kvffn/eurosat"]
    f = chosen_root / "experiment/lily_kvffn/dtd.yaml"
    cfg = OmegaConf.create(f.read_text())
    assert cfg.method == {"scale": 1.0, "ne": 4} and {"override /task": "dtd"} in cfg.defaults
    assert "mean val200 accuracy 72.00 ± 0.00 over 2 seed(s), best of 2 grid point(s)" in f.read_text()
    mtime = f.stat().st_mtime_ns
    write_chosen(runs, jobs, chosen_root)
    assert f.stat().st_mtime_ns == mtime


def _results(out: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").rglob("results.json")}


@pytest.mark.slow
def test_clean_protocol_on_the_demo_trains_only_the_choice_and_resumes_for_free(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, VTAB_ROOT=str(tmp_path / "data"), LILY_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "scripts/clean_protocol.py"), "experiment=demo", "optim.epochs=1",
           "optim.warmup_epochs=0", "eval_every=1", "max_train_steps=2", "logger=none", "progress=false",
           f"paths.output_dir={out}", "method.scale=0.1,1.0", "--seeds", "42,43"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = load_runs(out / "runs")
    assert (runs["status"] == "finished").all()
    search, final = runs[runs["protocol"] == "search"], runs[runs["protocol"] == "final"]
    assert len(search) == 2                                   # the grid: 2 scales, 1 seed
    assert len(final) == 1 * 2                                # 1 task x 2 seeds, the chosen scale only
    chosen = search.loc[search["final_acc"].idxmax()]["identity"]["method"]["scale"]
    assert {i["method"]["scale"] for i in final["identity"]} == {chosen}
    assert sorted(final["seed"]) == [42, 43]
    assert "| Lily (qvffn) |" in first.stdout and "protocol final" in first.stdout
    assert (out / "tables/table_final.md").is_file() and (out / "tables/table_search.md").is_file()

    before = _results(out)
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _results(out) == before                            # no new run directory, nothing rewritten
    assert again.stdout.count("0 finished, 2 skipped") == 2   # both stages' sweep summaries

    # the chosen file runs directly with train.py and lands in the stage-2 run directory (skipped)
    direct = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config-dir", str(out / "chosen"),
                             "experiment=lily_qvffn_tiny/digits", "protocol=final", "seed=42"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "skipped" in direct.stdout + direct.stderr and _results(out) == before
