"""Paired tests against hand-computed values: McNemar (exact and continuity-corrected), the
image-level sign test over seeds, the paired bootstrap, the agreement of errors, the refusals;
scripts/compare_runs.py on made-up run directories; significance and data-digest marks in tables."""
import json
import math

import numpy as np
import pytest

from common.errors import UserError
from results import paired
from tests.test_collect import write_run


def C(*bits):
    return np.array(bits, bool)


# -- McNemar -------------------------------------------------------------------------------------
def test_mcnemar_exact_and_chi2_against_hand_values():
    # only A right on 5 images, only B right on 1, both right on 4
    a = C(1, 1, 1, 1, 1, 1, 1, 1, 1, 0)
    b = C(0, 0, 0, 0, 0, 1, 1, 1, 1, 1)
    m = paired.mcnemar(a, b)
    assert (m["n10"], m["n01"]) == (5, 1)
    assert m["p"] == pytest.approx(2 * (1 + 6) / 2 ** 6)                 # 2 P(X <= 1), X ~ Bin(6, 1/2)
    assert m["chi2"] == pytest.approx((abs(5 - 1) - 1) ** 2 / 6)          # 1.5
    assert m["p_chi2"] == pytest.approx(math.erfc(math.sqrt(1.5 / 2)))    # chi2(1) survival = erfc(sqrt(x/2))
    assert paired.mcnemar(b, a)["p"] == pytest.approx(14 / 64)             # symmetric in A and B
    assert paired.mcnemar(np.ones(10, bool), np.zeros(10, bool))["p"] == pytest.approx(2 / 2 ** 10)


def test_mcnemar_without_discordant_pairs_is_p_one():
    a = C(1, 0, 1, 0)
    m = paired.mcnemar(a, a.copy())
    assert (m["n10"], m["n01"], m["p"], m["p_chi2"]) == (0, 0, 1.0, 1.0)
    # equal discordant counts: p = 1 as well
    assert paired.mcnemar(C(1, 0, 1), C(0, 1, 1))["p"] == pytest.approx(1.0)


def test_combined_sign_test_keeps_the_image_as_the_unit():
    # 3 seeds, 6 images. Image 0: A right in all seeds, B in none (d=+3); image 1: d=+1;
    # image 2: d=-1; images 3-5: d=0. Pooled discordant counts: 3+2=5 for A... computed below.
    A = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 0]], bool)
    B = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], bool)
    c = paired.combined(A, B)
    # d = [3, 1, -1, 0, 0, 0]: 2 images favour A, 1 favours B -> p = 1
    assert (c["n_pos"], c["n_neg"], c["p"]) == (2, 1, 1.0)
    # pooled: only A right = 3 (image 0) + 1 (image 1, seed 0) = 4 ... and only B right = 1+1 = 2
    assert (c["n10_pooled"], c["n01_pooled"]) == (4, 2)
    assert c["p_pooled"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    # one seed: the combined test is McNemar's exact test
    a, b = np.ones(10, bool), np.zeros(10, bool)
    b[:3] = True
    assert paired.combined([a], [b])["p"] == pytest.approx(paired.mcnemar(a, b)["p"]) == pytest.approx(2 / 2 ** 7)


# -- agreement -----------------------------------------------------------------------------------
def test_agreement_of_errors_against_hand_values():
    a = C(1, 1, 1, 1, 1, 1, 1, 1, 0, 0)
    b = C(1, 1, 1, 1, 1, 0, 0, 0, 1, 0)
    g = paired.agreement(a, b)
    assert (g["both_right"], g["both_wrong"], g["only_a_wrong"], g["only_b_wrong"]) == (5, 1, 1, 3)
    assert g["jaccard_errors"] == pytest.approx(1 / 5)
    # p_o = 0.6, p_e = 0.8*0.6 + 0.2*0.4 = 0.56 -> kappa = 0.04 / 0.44
    assert g["kappa"] == pytest.approx(0.04 / 0.44)
    same = paired.agreement(a, a.copy(), np.arange(10), np.arange(10))
    assert same["kappa"] == 1.0 and same["jaccard_errors"] == 1.0 and same["same_prediction"] == 1.0
    perfect = paired.agreement(np.ones(4, bool), np.ones(4, bool))
    assert perfect["kappa"] == 1.0 and math.isnan(perfect["jaccard_errors"])   # no error to compare


# -- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_two_images_hand_distribution():
    # d = [100, 0] points: a replicate is 0, 50 or 100 with probability 1/4, 1/2, 1/4
    r = paired.bootstrap_ci(C(1, 1), C(0, 1), level=0.05, n_boot=20000, seed=1)
    assert r["diff"] == 50.0 and (r["low"], r["high"]) == (0.0, 100.0)
    assert r["se"] == pytest.approx(math.sqrt(1250), rel=0.03)              # sd = sqrt(1250)
    r = paired.bootstrap_ci(C(1, 1), C(0, 1), level=0.6, n_boot=20000, seed=1)
    assert (r["low"], r["high"]) == (50.0, 50.0)                            # quantiles 0.3 and 0.7


def test_bootstrap_matches_the_normal_interval_on_a_larger_set():
    n = 200
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:30] = True           # only A right: 30
    b[30:40] = True         # only B right: 10
    a[40:100] = b[40:100] = True
    r = paired.bootstrap_ci(a, b, n_boot=20000, seed=0)
    # d in {+100, -100, 0} w.p. .15, .05, .8: mean 10, var 2000 - 100 = 1900, se = sqrt(1900/200)
    se = math.sqrt(1900 / n)
    assert r["diff"] == pytest.approx(10.0)
    assert r["se"] == pytest.approx(se, rel=0.03)
    assert r["low"] == pytest.approx(10 - 1.96 * se, abs=0.6) and r["high"] == pytest.approx(10 + 1.96 * se, abs=0.6)
    assert paired.bootstrap_ci(a, b, n_boot=500, seed=3) == paired.bootstrap_ci(a, b, n_boot=500, seed=3)


def test_identical_predictions_give_zero_difference_and_p_one():
    p = preds([0, 1, 2, 2], [0, 1, 1, 2])
    c = paired.compare([((42, p), (42, dict(p)))], task="t", n_boot=1000)
    assert c.diff == 0 and (c.boot["low"], c.boot["high"]) == (0.0, 0.0)
    assert c.per_seed[0]["p"] == 1.0 and c.combined["p"] == 1.0
    assert "identical predictions" in c.notes


# -- refusals ------------------------------------------------------------------------------------
def preds(pred, label, files=None, split="test", epoch=10):
    n = len(pred)
    files = files or [f"images/{i:04d}.png" for i in range(n)]
    pred, label = np.asarray(pred, np.int32), np.asarray(label, np.int32)
    return {"pred": pred, "label": label, "files": np.array(files), "split": split, "epoch": epoch,
            "topk_index": pred[:, None], "topk_logit": np.zeros((n, 1), np.float16),
            "accuracy": 100.0 * float(np.mean(pred == label))}


def test_different_image_lists_are_refused_naming_the_first_differing_file():
    a = preds([0, 1, 2], [0, 1, 2])
    b = preds([0, 1, 2], [0, 1, 2], files=["images/0000.png", "images/x.png", "images/0002.png"])
    with pytest.raises(UserError, match=r"image 1 is 'images/0001.png' in A .* and 'images/x.png' in B"):
        paired.compare([((42, a), (42, b))])
    with pytest.raises(UserError, match="'images/0002.png'"):
        paired.compare([((42, a), (42, preds([0, 1], [0, 1])))])
    with pytest.raises(UserError, match="split 'test' .* split 'val200'"):
        paired.compare([((42, a), (42, preds([0, 1, 2], [0, 1, 2], split="val200")))])
    with pytest.raises(UserError, match="different labels: 'images/0002.png'"):
        paired.compare([((42, a), (42, preds([0, 1, 2], [0, 1, 1])))])


# -- compare_runs on made-up run directories ---------------------------------------------------
def save(run_dir, p, which="final"):
    np.savez(run_dir / f"predictions-{which}.npz", **{k: np.asarray(v) for k, v in p.items()})


@pytest.fixture
def two_methods(tmp_path):
    """Two methods on task digits, seeds 42-44, 40 test images with fixed discordance."""
    root = tmp_path / "runs"
    label = np.arange(40) % 10
    dirs = {}
    for i, seed in enumerate((42, 43, 44)):
        pa, pb = label.copy(), label.copy()
        pa[:2 + i] = (label[:2 + i] + 1) % 10            # A wrong on the first 2, 3, 4 images
        pb[10:20] = (label[10:20] + 1) % 10              # B wrong on images 10-19 (every seed)
        for m, p in (("lily_qvffn_tiny", pa), ("linear", pb)):
            acc = 100.0 * float(np.mean(p == label))
            d = write_run(root, "digits", method_id=m, seed=seed, best=acc, linear=m == "linear")
            save(d, preds(p, label))
            r = json.loads((d / "results.json").read_text())
            r["data_digest"] = "d1" if not (m == "linear" and seed == 44) else "d2"
            (d / "results.json").write_text(json.dumps(r))
            dirs[m, seed] = d
    return root, dirs


def test_compare_runs_on_two_cells_over_three_seeds(two_methods, capsys):
    from scripts.compare_runs import main
    root, _ = two_methods
    table, comps = main(["--root", str(root), "--a", "method=lily_qvffn_tiny", "--b", "method=linear",
                         "--bootstrap", "2000"])
    out = capsys.readouterr().out
    (c,) = comps
    # seed 42: A 38/40, B 30/40; only A right 10, only B right 2
    assert c.acc_a == pytest.approx([95.0, 92.5, 90.0]) and c.acc_b == pytest.approx([75.0] * 3)
    assert [(m["n10"], m["n01"]) for m in c.per_seed] == [(10, 2), (10, 3), (10, 4)]
    assert c.per_seed[0]["p"] == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    # per image over seeds: images 10-19 favour A in every seed; images 0-1 B in every seed,
    # image 2 B in 2 seeds, image 3 B in 1 seed -> 10 vs 4
    assert (c.combined["n_pos"], c.combined["n_neg"]) == (10, 4)
    assert c.combined["p"] == pytest.approx(2 * sum(math.comb(14, k) for k in range(5)) / 2 ** 14)
    assert c.diff == pytest.approx(92.5 - 75.0)
    assert "| digits | 42 43 44 | 92.5 | 75.0 | 17.5 |" in out
    assert "different data copies" in table["notes"][0]


def test_compare_runs_on_two_run_directories_and_refusals(two_methods, capsys):
    from scripts.compare_runs import main
    root, dirs = two_methods
    table, (c,) = main([str(dirs["lily_qvffn_tiny", 42]), str(dirs["linear", 42]), "--bootstrap", "500"])
    assert c.seeds == [(42, 42)] and c.per_seed[0]["n10"] == 10
    with pytest.raises(UserError, match="no finished run matches B"):
        main(["--root", str(root), "--a", "method=linear", "--b", "method=nothing"])
    with pytest.raises(UserError, match="predictions-selected.npz not found"):
        main([str(dirs["lily_qvffn_tiny", 42]), str(dirs["linear", 42]), "--which", "selected"])
