"""Slow: the short offline demo (experiment=demo: the project's pretrained tiny ViT on scikit-learn's
digits, 10 classes) with each method of issue 15 part A, through train.py, seed 42, the same
epochs for all: each ends clearly above the frozen random head's accuracy (chance, ~10%)."""
import json

import pytest

from tests.test_train import run, run_dir_of

pytestmark = pytest.mark.slow

METHODS = ["bitfit", "vpt_shallow", "vpt_deep", "ssf", "fact_tt", "fact_tk", "repadapter", "convpass"]
SHORT = ["experiment=demo", "optim.epochs=3", "optim.warmup_epochs=1", "eval_every=3", "seed=42"]
MIN_ACC = 50.0   # 5x chance. Measured (3 epochs, seed 42, 2 CPU cores): bitfit 74.78, vpt_shallow 68.88,
#                 vpt_deep 70.39, ssf 79.42, fact_tt 76.04, fact_tk 88.08, repadapter 75.53, convpass 82.06


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_vit_a")


@pytest.mark.parametrize("name", METHODS)
def test_demo_learns(name, tmp):
    run([*SHORT, f"method={name}"], tmp)
    res = json.loads((run_dir_of(tmp, "digits", "vit_tiny", name, "*") / "results.json").read_text())
    print(f"{name}: final {res['final_acc']:.2f}% ({res['trainable_params']} params, {res['train_seconds']:.1f} s)")
    assert res["finished"] and res["final_acc"] >= MIN_ACC, res["history"]
