"""Tables from synthetic run directories: variants, selection per protocol, mean +- std over
seeds, group means with the incomplete mark, labels, and the files written."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.registry import TASKS
from results.labels import method_label
from results.runs import load_runs, short_hash, where
from results.tables import build_tables, main, to_latex, to_markdown

ROOT = Path(__file__).resolve().parents[1]
KVFFN = {"name": "lily", "targets": ["k", "v", "ffn"], "rank": {"k": 16, "v": 16, "ffn": 32}, "ne": 4, "scale": 1.0,
         "routing": "batch", "router_init": "paper", "lp_stride": 1, "dropout": 0.0, "ffn_act": "relu"}


def write_run(root, task, method_id="lily_kvffn", method=None, seed=42, protocol="paper", recipe="authors",
              backbone="vit_b16_in21k", epochs=100, eval_every=10, best=None, final=None, searched=("method.ne",
              "method.scale"), params=None, status="finished", experts=None, **method_values):
    """One run directory as engine/job.py writes it (the results.json contract)."""
    m = dict(method or KVFFN, **method_values)
    splits = {"paper": ("train800val200", "test"), "search": ("train800", "val200"), "final": ("train800val200", "test")}
    ident = {"task": {"name": task}, "backbone": {"name": backbone, "drop_path": 0.1}, "method": m,
             "optim": {"name": "adamw", "lr": 1e-3, "epochs": epochs, "warmup_epochs": 10},
             "protocol": {"name": protocol, "train_split": splits[protocol][0], "eval_split": splits[protocol][1]},
             "recipe": {"name": recipe}, "seed": seed, "precision": "fp32", "normalization": "none",
             "image_size": 224, "batch_size": 64, "eval_every": eval_every}
    rid = short_hash(ident) + "00"
    d = Path(root) / task / backbone / method_id / f"{protocol}-seed{seed}-{rid}"
    d.mkdir(parents=True)
    final = best if final is None else final
    r = {"status": status, "message": None if status == "finished" else "boom", "run_id": rid, "identity": ident,
         "searched": list(searched), "method_id": method_id, "task": task, "group": TASKS[task].group,
         "backbone": backbone, "seed": seed, "protocol": protocol, "recipe": recipe, "precision": "fp32",
         "normalization": "none", "epochs": epochs,
         "history": [] if best is None else [{"epoch": epochs, "split": splits[protocol][1], "acc": final}],
         "final_acc": final, "best_acc": best, "best_epoch": epochs, "train_split": splits[protocol][0],
         "eval_split": splits[protocol][1],
         "trainable_params": params if params is not None else 100_000 * (m["ne"] if isinstance(m.get("ne"), int) else 1), "head_params": 100}
    (d / "results.json").write_text(json.dumps(r))
    if experts is not None:
        (d / "experts.json").write_text(json.dumps(experts))
    return d


def grid(root, task, accs, **kw):
    """accs: {(ne, scale): [acc per seed 42, 43, ...]}"""
    for (ne, scale), seeds in accs.items():
        for i, acc in enumerate(seeds):
            write_run(root, task, ne=ne, scale=scale, seed=42 + i, best=acc, **kw)


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    # Variant A: Lily (kvffn), paper protocol, authors recipe, batch routing, a 2 x 2 grid, 2 seeds.
    grid(r, "dtd", {(2, 0.1): [70, 72], (2, 1.0): [74, 66], (4, 0.1): [69, 71], (4, 1.0): [73, 71]})
    grid(r, "caltech101", {(4, 1.0): [90, 92]})
    grid(r, "eurosat", {(4, 1.0): [58.0, 55.0, 58.0]})
    grid(r, "kitti", {(2, 0.1): [80, 82], (4, 1.0): [79, 79]})
    grid(r, "digits", {(4, 1.0): [95, 97]})
    write_run(r, "dtd", ne=4, scale=1.0, seed=44, status="failed")      # never used
    write_run(r, "kitti", ne=4, scale=1.0, seed=44, status="running")   # never used
    # Variant C: the same with per-sample routing: its own row.
    grid(r, "dtd", {(4, 1.0): [60, 62]}, routing="sample")
    # Variant B: the paper recipe, one seed: its own table.
    grid(r, "dtd", {(4, 1.0): [65]}, recipe="paper")
    return r


def by_label(table):
    return {row.label.text: row for row in table.rows}


def test_paper_tables_select_the_best_mean_over_seeds_and_never_merge_variants(runs):
    df = load_runs(runs)
    assert (df["status"] == "finished").sum() == 8 + 2 + 3 + 4 + 2 + 2 + 1
    tables = build_tables(df, "paper")
    titles = [t.title for t in tables]
    assert len(tables) == 3, titles                      # VTAB authors, VTAB paper recipe, demo
    vtab, other, demo = tables[0], tables[1], tables[2]
    assert "recipe authors" in vtab.caption and "recipe paper" in other.caption
    assert "best-of-test every 10 epochs" in vtab.caption and "seeds 42, 43, 44" in vtab.caption
    assert "demo" in demo.title
    rows = by_label(vtab)
    assert set(rows) == {"Lily (kvffn) [routing=batch]", "Lily (kvffn) [routing=sample]"}
    a = rows["Lily (kvffn) [routing=batch]"]
    # dtd: (2, 1.0) holds the single best run (74) but (4, 1.0) has the best mean (72).
    dtd = a.cells["dtd"]
    assert dict(dtd["grid"]) == {"method.ne": 4, "method.scale": 1.0}
    assert (dtd["mean"], dtd["n"]) == (72.0, 2) and dtd["std"] == pytest.approx(math.sqrt(2))
    e = a.cells["eurosat"]  # three seeds 58, 55, 58: mean 57, sample std sqrt(3)
    assert (e["mean"], e["n"]) == (57.0, 3) and e["std"] == pytest.approx(math.sqrt(3))
    k = a.cells["kitti"]
    assert dict(k["grid"]) == {"method.ne": 2, "method.scale": 0.1} and k["mean"] == 81.0 and k["n"] == 2
    assert "dmlab" not in a.cells and "digits" not in a.cells
    natural = (72 + 91) / 2
    assert a.summary["natural"] == (pytest.approx(natural), True, "2 of 7")
    assert a.summary["specialized"][:2] == (57.0, True) and a.summary["structured"][:2] == (81.0, True)
    vtab_avg, task_mean = a.summary["VTAB avg (mean of group means)"], a.summary["mean over tasks"]
    assert vtab_avg[:2] == (pytest.approx((natural + 57 + 81) / 3), True)
    assert task_mean[:2] == (pytest.approx((72 + 91 + 57 + 81) / 4), True)     # digits never enters
    assert a.params == pytest.approx((400_000 * 3 + 200_000) / 4 / 1e6)
    c = rows["Lily (kvffn) [routing=sample]"]
    assert set(c.cells) == {"dtd"} and c.cells["dtd"]["mean"] == 61.0
    b = other.rows[0]
    assert b.label.text == "Lily (kvffn)" and b.cells["dtd"]["n"] == 1 and b.cells["dtd"]["mean"] == 65
    assert demo.tasks == ["digits"] and demo.rows[0].cells["digits"]["mean"] == 96.0
    assert "VTAB avg (mean of group means)" not in demo.summary_cols


def test_markdown_cells_and_marks(runs):
    vtab = build_tables(load_runs(runs), "paper")[0]
    md = to_markdown(vtab)
    line = next(x for x in md.splitlines() if x.startswith("| Lily (kvffn) [routing=batch]"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    head = [c.strip() for c in md.splitlines()[4].strip("|").split("|")]
    row = dict(zip(head, cells))
    assert row["DTD"] == "72.0 ± 1.4" and row["Caltech101"] == "91.0 ± 1.4"
    assert row["EuroSAT"] == "57.0 ± 1.7 (n=3)" and row["DMLab"] == "–" and row["Cifar100"] == "–"
    assert row["Natural"] == "81.5*" and row["Structured"] == "81.0*"
    assert row["VTAB avg (mean of group means)"] == f"{(81.5 + 57 + 81) / 3:.1f}*"
    assert row["Params(M)"] == "0.350"
    assert "\\* Lily (kvffn) [routing=batch]: natural: mean over 2 of 7 tasks" in md
    assert "n = 2 seeds per cell unless marked (n=k)" in md
    tex = to_latex(vtab)
    assert "72.0 $\\pm$ 1.4" in tex and "\\begin{tabular}" in tex


def test_seeds_of_one_configuration_are_averaged_not_maximised(tmp_path):
    grid(tmp_path, "dtd", {(4, 1.0): [58.0, 55.0, 58.0]}, searched=())
    cell = build_tables(load_runs(tmp_path), "paper")[0].rows[0].cells["dtd"]
    assert cell["mean"] == 57.0 and cell["n"] == 3 and cell["grid"] == ()


def test_search_option_groups_unrecorded_sweeps_and_vim_labels(tmp_path):
    vim = {"name": "lily", "targets": ["in_proj", "delta"], "rank": {"in_proj": 8, "delta": 4},
           "ne": {"in_proj": 5, "delta": 1}, "routing": {"in_proj": "token", "delta": "uniform"}, "lp_stride": 1}
    for ne, acc in ((3, 60.0), (6, 62.0)):
        write_run(tmp_path, "dtd", "lily_vim", vim, backbone="vim_s", best=acc, searched=(),
                  ne={"in_proj": ne, "delta": 1})
    # Without --search the two N_e are two variants (two rows); with it, one row, best N_e.
    labels = {r.label.text for r in build_tables(load_runs(tmp_path), "paper")[0].rows}
    assert labels == {"Lily_3^{4,8}", "Lily_6^{4,8}"}  # N_e tells them apart
    t = build_tables(load_runs(tmp_path), "paper", search=["method.ne.in_proj"])[0]
    assert [r.label.text for r in t.rows] == ["Lily_{≤6}^{4,8}"] and t.rows[0].cells["dtd"]["mean"] == 62.0
    assert "Lily$_{\\leq 6}^{4,8}$" in to_latex(t)


def _method(name):
    cfg = OmegaConf.load(ROOT / "configs/method" / f"{name}.yaml")
    if "defaults" in cfg:
        base = OmegaConf.load(ROOT / "configs/method" / f"{cfg.defaults[0]}.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("method_id,label", [
    ("lily_kvffn", "Lily (kvffn)"), ("lily_qv", "Lily (qv)"), ("lily_qvffn", "Lily (qvffn)"), ("lily_ffn", "Lily (ffn)"),
    ("lily_kvffn_monoscale", "Lily-mono (kvffn)"), ("lily_ffn_monoscale", "Lily-mono (ffn)"),
    ("lily_vim", "Lily_5^{4,8}"), ("lily0_vim", "Lily_0^{4,4}"), ("deltafit", "DeltaFit_4"),
    ("deltafit8", "DeltaFit_8"), ("deltainfit", "DeltaInFit"), ("lora", "LoRA (r=32)"),
    ("lily2_kvffn", "Lily v2 (kvffn)"), ("adaptformer", "AdaptFormer"), ("linear", "Linear"), ("full", "Full")])
def test_labels_from_the_method_configs(method_id, label):
    method = _method(method_id)
    if method.get("lp_experts") == "${.ne}":
        method["lp_experts"] = method["ne"]  # resolved in a run's identity
    assert method_label({"method": method}, method_id=method_id).text == label


def test_cli_writes_markdown_csv_latex_and_lists_unused_runs(runs, tmp_path):
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--runs", str(runs),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| Lily (kvffn) [routing=batch] | –" in proc.stdout
    assert "22 finished, 1 failed, 1 running" in proc.stdout and "not used (failed)" in proc.stdout
    for name in ("table_paper.md", "table_paper.csv", "table_paper.tex", "cells_paper.csv"):
        assert (out / name).stat().st_size > 0
    import pandas as pd
    cells = pd.read_csv(out / "cells_paper.csv")
    dtd = cells[(cells.label == "Lily (kvffn) [routing=batch]") & (cells.task == "dtd")].iloc[0]
    assert dtd["mean"] == 72.0 and dtd["n_grid"] == 4 and len(dtd["run_dirs"].split(";")) == 2


def test_final_protocol_reports_the_stage1_choice_never_the_best_test(tmp_path):
    # stage 1 (val200): scale 0.1 wins; stage 2 ran both scales (e.g. two clean_protocol calls)
    for scale, val, test in ((0.1, 70.0, 60.0), (1.0, 65.0, 80.0)):
        write_run(tmp_path, "dtd", ne=4, scale=scale, protocol="search", best=val, final=val)
        write_run(tmp_path, "dtd", ne=4, scale=scale, protocol="final", best=test, final=test, searched=())
    (t,) = build_tables(load_runs(tmp_path), "final")
    cell = t.rows[0].cells["dtd"]
    assert cell["mean"] == 60.0 and cell["selected_by"] == "stage-1 val200 mean"
    assert "protocol final" in t.caption and "evaluated once" in t.caption
    (s,) = build_tables(load_runs(tmp_path), "search")
    assert s.rows[0].cells["dtd"]["mean"] == 70.0


def test_main_without_finished_runs_says_so(tmp_path):
    write_run(tmp_path, "dtd", status="failed")
    with pytest.raises(SystemExit, match="no finished run"):
        main(["--runs", str(tmp_path)])


def test_where_picks_one_search_space_of_several_sharing_runs(tmp_path):
    """Table 2: Lily_5, Lily_{≤6} ({3,6}) and Lily_{≤17} ({5,6,17}) share runs (one per N_e)."""
    vim = {"name": "lily", "targets": ["in_proj", "delta"], "rank": {"in_proj": 8, "delta": 4},
           "ne": {"in_proj": 5, "delta": 1}, "routing": {"in_proj": "token", "delta": "uniform"}, "lp_stride": 1}
    for ne, acc in ((3, 60.0), (5, 61.0), (6, 59.0), (17, 63.0)):
        write_run(tmp_path, "dtd", "lily_vim", vim, backbone="vim_s", best=acc, searched=("method.ne.in_proj",),
                  ne={"in_proj": ne, "delta": 1})
    runs = load_runs(tmp_path)
    for cond, label, acc in ((None, "Lily_{≤17}^{4,8}", 63.0), ("method.ne.in_proj=3,6", "Lily_{≤6}^{4,8}", 60.0),
                             ("method.ne.in_proj=5", "Lily_5^{4,8}", 61.0)):
        (t,) = build_tables(where(runs, [cond] if cond else []), "paper")
        assert [r.label.text for r in t.rows] == [label] and t.rows[0].cells["dtd"]["mean"] == acc
    with pytest.raises(ValueError, match="key=value"):
        where(runs, ["method.ne"])


# -- the data a cell saw; significance against a baseline (issue 17 items 3 and 5) ---------------
def _with_digest(d, digest):
    r = json.loads((d / "results.json").read_text())
    r["data_digest"] = digest
    (d / "results.json").write_text(json.dumps(r))


def test_a_cell_of_runs_on_different_data_copies_says_so(tmp_path):
    r = tmp_path / "runs"
    for seed, dg in ((42, "aaaa1111"), (43, "bbbb2222")):          # dtd: two copies in one cell
        _with_digest(write_run(r, "dtd", seed=seed, best=70.0), dg)
    for seed, dg in ((42, "cccc"), (43, None)):                      # caltech101: one seed recorded none
        _with_digest(write_run(r, "caltech101", seed=seed, best=80.0), dg)
    for seed in (42, 43):                                            # eurosat: older runs, nothing recorded
        write_run(r, "eurosat", seed=seed, best=90.0)
    (t,) = build_tables(load_runs(r), "paper")
    md = to_markdown(t)
    row = next(line for line in md.splitlines() if line.startswith("| Lily"))
    cells = row.split(" | ")
    assert "70.0 ± 0.0‡" in cells and "80.0 ± 0.0‡" in cells and "90.0 ± 0.0" in cells
    assert "dtd: its runs read different copies of the task: data_digest aaaa1111 (seed 42); data_digest bbbb2222 " \
           "(seed 43)" in md
    assert "caltech101: seed 43 recorded no data_digest, the others cccc" in md
    assert "eurosat" not in " ".join(f for f in t.footnotes)


def _preds_npz(d, pred, label):
    import numpy as np
    n = len(label)
    arrays = {"pred": np.asarray(pred, np.int32), "label": np.asarray(label, np.int32),
              "topk_index": np.asarray(pred, np.int32)[:, None], "topk_logit": np.zeros((n, 1), np.float16),
              "files": np.array([f"img{i:03d}.png" for i in range(n)]), "epoch": np.array(100),
              "split": np.array("test"), "accuracy": np.array(100.0 * float(np.mean(np.asarray(pred) == label)))}
    for which in ("final", "selected"):
        np.savez(d / f"predictions-{which}.npz", **arrays)


def test_baseline_marks_the_cells_not_significantly_different(tmp_path):
    import numpy as np
    r = tmp_path / "runs"
    label = np.arange(60) % 10
    wrong = (label + 1) % 10
    for seed in (42, 43):
        base = label.copy()
        base[:20] = wrong[:20]                                   # baseline wrong on 20 images
        close = base.copy()
        close[0] = label[0]                                      # one image better: p = 1
        for method_id, pred, extra in (("linear", base, {"linear": True}), ("close", close, {"close": True}),
                                       ("good", label, {})):
            acc = 100.0 * float(np.mean(pred == label))
            d = write_run(r, "dtd", method_id=method_id, seed=seed, best=acc, **extra)
            _preds_npz(d, pred, label)
    # a method without predictions (older run): named, not marked
    for seed in (42, 43):
        write_run(r, "dtd", method_id="old", seed=seed, best=50.0, old=True)
    (t,) = build_tables(load_runs(r), "paper")
    from results.tables import mark_significance
    mark_significance([t], "linear", level=0.05)
    marks = {row.method_id: row.cells["dtd"].get("marks") for row in t.rows}
    # good: 20 images favour it in both seeds -> sign test p = 2 / 2^20; close: 1 image -> p = 1
    assert marks == {"linear": "", "close": "†", "good": "", "old": ""}
    p = {row.method_id: row.cells["dtd"].get("p_vs_baseline") for row in t.rows}
    assert p["good"] == pytest.approx(2 / 2 ** 20) and p["close"] == pytest.approx(1.0)
    md = to_markdown(t)
    assert "† not significantly different from" in md and "at level 0.05" in md
    assert "not tested:" in md and "predictions-selected.npz" in md
    with pytest.raises(Exception, match="baseline 'nothing' is no row"):
        mark_significance([t], "nothing")
