"""Figures 3 and 4 from synthetic run directories, checked on the matplotlib objects."""
import subprocess
import sys
from pathlib import Path

import pytest

from results.figures import default_layers, fig3, fig4
from results.runs import load_runs
from tests.test_collect import KVFFN, write_run

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {"lily_ffn": ["ffn"], "lily_qv": ["q", "v"], "lily_qvffn": ["q", "v", "ffn"], "lily_kvffn": ["k", "v", "ffn"]}


def labelled_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


@pytest.fixture
def fig3_runs(tmp_path):
    for method_id, targets in PLACEMENTS.items():
        for task in ("svhn", "dmlab"):
            for ne in (2, 4, 6, 8):
                for scale in (0.1, 1.0):
                    for seed in (42, 43):
                        acc = 50 + ne + (5 if scale == 1.0 and ne == 4 else 0) + len(targets) + (seed - 42)
                        write_run(tmp_path, task, method_id, dict(KVFFN, targets=targets), ne=ne, scale=scale,
                                  seed=seed, best=acc)
    write_run(tmp_path, "svhn", "linear", {"name": "linear"}, best=40.0, searched=())  # no N_e: no line
    return tmp_path


def test_fig3_one_line_per_placement_per_task_with_the_selected_scale(fig3_runs):
    fig = fig3(load_runs(fig3_runs), "paper")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["SVHN", "DMLab"]
    for ax in axes:
        lines = labelled_lines(ax)
        assert sorted(line.get_label() for line in lines) == sorted(
            ["Lily (ffn)", "Lily (qv)", "Lily (qvffn)", "Lily (kvffn)"])
        for line in lines:
            assert list(line.get_xdata()) == [2, 4, 6, 8]
        qv = next(line for line in lines if line.get_label() == "Lily (qv)")
        # at each N_e the best mean over seeds of s: (50 + ne + 2) + 0.5, +5 at N_e 4 with s = 1
        assert list(qv.get_ydata()) == pytest.approx([54.5, 61.5, 58.5, 60.5])
    fig.savefig(fig3_runs / "fig3.png")


@pytest.fixture
def fig4_runs(tmp_path):
    vim = {"name": "lily", "targets": ["in_proj", "delta"], "rank": {"in_proj": 8, "delta": 4},
           "ne": {"in_proj": 5, "delta": 1}, "routing": {"in_proj": "token", "delta": "uniform"}, "lp_stride": 1}
    weights = {"in_proj": [[(layer + e) / 100 for e in range(5)] for layer in range(24)],
               "delta": [[1.0] for _ in range(24)]}
    experts = [{"epoch": 10, "split": "test", "weights": {"in_proj": [[0.2] * 5] * 24}},
               {"epoch": 30, "split": "test", "weights": weights}]
    for task in ("cifar", "eurosat", "kitti"):
        for seed, acc in ((42, 70.0), (43, 72.0)):
            write_run(tmp_path, task, "lily_vim", vim, backbone="vim_s", seed=seed, best=acc, epochs=30, eval_every=30,
                      searched=(), experts=experts)
    return tmp_path


def test_fig4_one_bar_group_per_chosen_layer_from_the_last_entry(fig4_runs):
    fig = fig4(load_runs(fig4_runs), "paper", method="lily_vim")
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["layer 2", "layer 13", "layer 22"]
        assert len(ax.patches) == 3 * 5                       # 3 layer groups x 5 experts
        heights = sorted(p.get_height() for p in ax.patches)
        assert heights[-1] == pytest.approx((22 + 4) / 100)   # the last experts.json entry
    assert "epoch 30" in fig.axes[0].get_title()
    fig = fig4(load_runs(fig4_runs), "paper", method="lily_vim", layers=[0, 23], kind="delta")
    assert all(len(ax.patches) == 2 for ax in fig.axes)


def test_default_layers_follow_the_depth():
    assert default_layers(24) == [2, 13, 22] and default_layers(12) == [1, 7, 11]


def test_plot_script_writes_both_figures(fig3_runs, fig4_runs, tmp_path):
    for fig, runs in (("fig3", fig3_runs), ("fig4", fig4_runs)):
        out = tmp_path / "figs"
        proc = subprocess.run([sys.executable, str(ROOT / "scripts/plot_results.py"), fig, "--runs", str(runs),
                               "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert (out / f"{fig}_{'ne' if fig == 'fig3' else 'experts'}_paper.png").stat().st_size > 0
