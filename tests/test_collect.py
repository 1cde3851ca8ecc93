"""The results table: selection per protocol and the two VTAB averages."""
import json

import pytest

from scripts.collect_results import load_runs, select, table


def write(root, task, cfg, protocol, best, final, val=None, params=1000):
    d = root / task / "vit" / "lily_qv" / cfg
    d.mkdir(parents=True)
    r = {"task": task, "backbone": "vit", "method": "lily_qv", "protocol": protocol, "best_acc": best,
         "final_acc": final, "trainable_params": params, "finished": True, "history": []}
    if val is not None:
        r["val_acc"] = val
    (d / "results.json").write_text(json.dumps(r))


def test_paper_selects_best_test_and_clean_selects_on_val(tmp_path):
    # dtd (natural), eurosat (specialized), kitti + dmlab (structured)
    write(tmp_path, "dtd", "a", "paper", 70, 68, params=1000)
    write(tmp_path, "dtd", "b", "paper", 72, 60, params=3000)
    for t, acc in (("eurosat", 90), ("kitti", 80), ("dmlab", 50)):
        write(tmp_path, t, "a", "paper", acc, acc)
    write(tmp_path, "dtd", "c", "clean", 0, 65, val=40)
    write(tmp_path, "dtd", "d", "clean", 0, 75, val=30)
    df = load_runs(tmp_path)
    paper = table(select(df, "paper")).iloc[0]
    assert paper["dtd"] == 72 and paper["Params(M)"] == pytest.approx((3000 + 3 * 1000) / 4 / 1e6, abs=0.01)
    assert paper["natural"] == 72 and paper["specialized"] == 90 and paper["structured"] == 65
    assert paper["VTAB avg (mean of group means)"] == pytest.approx((72 + 90 + 65) / 3, abs=0.01)
    assert paper["mean over tasks"] == pytest.approx((72 + 90 + 80 + 50) / 4, abs=0.01)
    clean = table(select(df, "clean")).iloc[0]
    assert clean["dtd"] == 65  # chosen by val_acc (40 > 30), reports its final test accuracy
