"""Issue 15, part B: a short demo run of every method learns (slow: about 40 s per method on 2 cores).

``python train.py experiment=demo method=<name>`` for 3 epochs (seed 42) on the offline digits task
(10 balanced classes: a frozen backbone with a random head is at chance, about 10%). Measured
(3 epochs, seed 42, 2 CPU cores): adapter_houlsby 75.03, adapter_pfeiffer 78.54, moslora 77.67,
hydralora 77.92, dora 77.54, vera 70.77, peft_lily 79.17 (linear probe alone: 70.51; lora 80.18).
"""
import json

import pytest

from tests.test_train import run, run_dir_of

SHORT = ["experiment=demo", "optim.epochs=3", "optim.warmup_epochs=1", "eval_every=3"]
CHANCE = 10.0
MIN_ACC = 50.0   # clearly above the random head's chance level


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer", "moslora", "hydralora", "dora", "vera",
                                  "peft_lily"])
def test_demo_run_learns(name, tmp_path):
    run(SHORT + [f"method={name}"], tmp_path)
    res = json.loads((run_dir_of(tmp_path, "digits", "vit_tiny", name, "*") / "results.json").read_text())
    assert res["finished"] and res["method"] == name and res["trainable_params"] > 0
    assert res["final_acc"] >= MIN_ACC > CHANCE, res["history"]
