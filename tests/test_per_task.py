"""Authors' per-task settings (``${by_task:...}``): recorded by a run as ``per_task`` keys, and a
method whose value differs per task stays ONE row of a table (with the per-task value per cell),
not one row per task. Field methods get their authors' names as row labels."""
import json

from omegaconf import OmegaConf

from common.resolvers import per_task_keys
from results.labels import field_label, method_label
from results.tables import build_tables
from results.runs import load_runs
from tests.test_collect import write_run

VPT = {"name": "vpt_deep", "prompt_length": 10, "dropout": 0.1, "deep": True}


def test_per_task_keys_follow_interpolations():
    raw = OmegaConf.to_container(OmegaConf.create({
        "task": {"name": "dtd"},
        "method": {"prompt_length": "${by_task:{dtd: 10, default: 5}}", "optim": {"lr": "${by_task:{dtd: 1e-2}}"}},
        "optim": {"lr": "${oc.select:method.optim.lr,1e-3}", "weight_decay": "${oc.select:method.optim.wd,1e-4}"},
        "paths": {"x": "${by_task:{dtd: a}}"}}), resolve=False)
    assert per_task_keys(raw, skip=("paths",)) == ["method.optim.lr", "method.prompt_length", "optim.lr"]
    assert per_task_keys({"method": {"ne": 4}, "optim": {"lr": "${oc.select:method.optim.lr,1e-3}"}}) == []


def test_one_row_for_a_method_whose_setting_is_chosen_per_task(tmp_path):
    root = tmp_path / "runs"
    for task, p, acc in (("dtd", 10, 60.0), ("svhn", 50, 80.0)):
        d = write_run(root, task, method_id="vpt_deep", method=dict(VPT, prompt_length=p), best=acc, searched=(),
                      params=9216 * p)
        r = json.loads((d / "results.json").read_text())
        r["per_task"] = ["method.prompt_length"]
        (d / "results.json").write_text(json.dumps(r))
    tables = build_tables(load_runs(root), protocol="paper")
    rows = [(row.label.text, sorted(row.cells)) for t in tables for row in t.rows]
    assert rows == [("VPT-deep", ["dtd", "svhn"])], rows


def test_a_hand_set_value_is_not_mixed_into_the_per_task_row(tmp_path):
    """method.prompt_length=50 given by hand on dtd is another configuration than the authors' table's
    dtd value: its own row, never a candidate of the per-task row's dtd cell."""
    root = tmp_path / "runs"
    for task, p, acc, per_task in (("dtd", 10, 60.0, True), ("svhn", 50, 80.0, True), ("dtd", 50, 99.0, False)):
        d = write_run(root, task, method_id="vpt_deep", method=dict(VPT, prompt_length=p), best=acc, searched=(),
                      params=9216 * p)
        r = json.loads((d / "results.json").read_text())
        r["per_task"] = ["method.prompt_length"] if per_task else []
        (d / "results.json").write_text(json.dumps(r))
    tables = build_tables(load_runs(root), protocol="paper")
    rows = sorted((sorted(row.cells), round(float(row.cells["dtd"]["mean"]), 1)) for t in tables for row in t.rows)
    assert rows == [(["dtd"], 99.0), (["dtd", "svhn"], 60.0)], rows


def test_field_labels():
    assert field_label({"name": "vim_lora", "target": "X", "dora": True}) == "DoRA on LoRAp(X)"
    assert field_label({"name": "vim_affix", "projection": False}) == "Affix-tuning (w/o proj)"
    assert field_label({"name": "hydralora", "rank": 8, "heads": 2}) == "HydraLoRA (r=8, K=2)"
    assert method_label({"method": {"name": "compose", "parts": []}}, method_id="vim_hybrid").text == "Hybrid"
    assert field_label({"name": "lily"}) is None
