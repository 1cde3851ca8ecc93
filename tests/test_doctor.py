"""The environment self-check (engine/selfcheck.py, scripts/doctor.py): the kernel comparison with
the PyTorch path standing in for the compiled kernels (and failing for perturbed ones), the CPU
part of the whole check, the skipped parts named with their reasons."""
from functools import partial

import pytest
import torch

from common.errors import UserError
from engine import selfcheck
from models import mamba_ops

TINY = dict(batch=2, dim=8, state=4, length=12, width=4)
torch_scan = partial(mamba_ops.selective_scan, mode="pytorch")
torch_conv = partial(mamba_ops.causal_conv1d, mode="pytorch")


def by_name(rows):
    return {r.name: r for r in rows}


def test_pytorch_path_standing_in_for_the_kernels_agrees_forward_and_backward():
    rows = selfcheck.compare_kernels(torch_scan, torch_conv, mamba_ops.selective_scan_ref,
                                     selfcheck.conv1d_reference, shapes=TINY)
    names = [r.name for r in rows]
    assert names == ["selective_scan forward", *(f"selective_scan grad {k}" for k in
                                                  ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                     "causal_conv1d forward", "causal_conv1d grad x", "causal_conv1d grad weight",
                     "causal_conv1d grad bias"]
    assert all(r.status == "ok" for r in rows), [r for r in rows if r.status != "ok"]
    assert all("tolerance" in r.detail for r in rows)


def test_a_wrong_kernel_fails_and_says_where():
    def scan_no_gate(**kw):          # forgets the SiLU(z) gate: a wrong forward
        return torch_scan(**{**kw, "z": None}) + 0 * kw["z"]

    def scan_bad_grad(**kw):         # right forward, gradient of u scaled by 1.1
        u = kw["u"]
        return torch_scan(**{**kw, "u": u.detach() + 1.1 * (u - u.detach())})

    def conv_shifted(x, weight, bias=None, activation="silu"):   # taps in the wrong order
        return torch_conv(x, weight.flip(-1), bias, activation=activation)

    rows = by_name(selfcheck.compare_kernels(scan_no_gate, conv_shifted, mamba_ops.selective_scan_ref,
                                             selfcheck.conv1d_reference, shapes=TINY))
    assert rows["selective_scan forward"].status == "FAIL" and rows["causal_conv1d forward"].status == "FAIL"
    rows = by_name(selfcheck.compare_kernels(scan_bad_grad, torch_conv, mamba_ops.selective_scan_ref,
                                             selfcheck.conv1d_reference, shapes=TINY))
    assert rows["selective_scan forward"].status == "ok"
    assert rows["selective_scan grad u"].status == "FAIL"
    assert "/ max|ref| = 1.00e-01" in rows["selective_scan grad u"].detail     # |1.1 g - g| / |g| = 0.1
    assert rows["selective_scan grad delta"].status == "ok" and rows["causal_conv1d grad x"].status == "ok"


def test_a_kernel_that_raises_is_a_failed_check():
    def boom(**kw):
        raise RuntimeError("no kernel image is available for execution on the device")
    rows = by_name(selfcheck.compare_kernels(boom, torch_conv, torch_scan, selfcheck.conv1d_reference, shapes=TINY))
    assert rows["selective_scan"].status == "FAIL" and "no kernel image" in rows["selective_scan"].detail


def test_without_kernels_the_cuda_comparison_is_skipped_with_the_reason():
    rows = selfcheck.kernel_checks(False, shapes_small=TINY)
    skipped = [r for r in rows if r.status == "skipped"]
    assert len(skipped) == 1 and ("not installed" in skipped[0].detail or "no CUDA device" in skipped[0].detail)
    assert all(r.status == "ok" for r in rows if r.status != "skipped")


_st = mamba_ops.kernel_status()
_KERNELS = _st["selective_scan"] and _st["causal_conv1d"] and torch.cuda.is_available()


@pytest.mark.skipif(not _KERNELS, reason="mamba-ssm / causal-conv1d kernels not installed or no CUDA device: "
                                         "nothing compiled to compare with the PyTorch path")
def test_compiled_kernels_agree_with_the_pytorch_path():
    rows = selfcheck.kernel_checks(True, shapes_small=TINY)
    assert all(r.status == "ok" for r in rows), [r for r in rows if r.status != "ok"]


def test_kernel_path_cuda_requested_on_a_machine_without_kernels_is_a_failure():
    cfg = selfcheck.compose(["backbone=vim_s", "backbone.kernels=pytorch"])
    rows, _ = selfcheck.kernel_path(cfg)
    assert rows[-1].detail.startswith("pytorch (backbone.kernels=pytorch")
    if not _KERNELS:
        rows, can = selfcheck.kernel_path(selfcheck.compose(["backbone=vim_s", "backbone.kernels=cuda"]))
        assert not can and rows[-1].status == "FAIL" and "a Vim run would stop" in rows[-1].detail


def test_weights_and_config_errors():
    cfg = selfcheck.compose(["backbone=vim_s", "backbone.checkpoint=/nowhere/vim.pth"])
    (row,) = selfcheck.weights_check(cfg)
    assert row.status == "FAIL" and "/nowhere/vim.pth" in row.detail
    (row,) = selfcheck.weights_check(selfcheck.compose(["backbone=vim_s", "backbone.pretrained=false"]))
    assert row.status == "info"
    with pytest.raises(UserError, match="config"):
        selfcheck.compose(["backbone=no_such_backbone"])


def test_cpu_part_runs_end_to_end(tmp_path, capsys):
    from scripts.doctor import main
    rc = main(["experiment=demo", f"paths.data_root={tmp_path}", "--steps", "vit_tiny", "--no-kernels"])
    out = capsys.readouterr().out
    for section in ("versions:", "device:", "precision:", "vim kernels:", "training step:", "data:", "weights:"):
        assert section in out
    assert "torch: " + torch.__version__ in out and "path a Vim run takes:" in out
    assert "vit_tiny on cpu:" in out and "ms/step" in out and "method lily_qvffn_tiny" in out
    assert "no folder for task digits" in out                       # the data doctor is skipped, said why
    assert "[     ok] vit_tiny: " in out                              # the demo weights are in assets/
    assert rc == 0 and "0 failed" in out


@pytest.mark.slow
def test_data_doctor_on_the_demo_task(tmp_path):
    pytest.importorskip("data.doctor")
    from data import ensure_digits
    ensure_digits(tmp_path)
    cfg = selfcheck.compose(["experiment=demo", f"paths.data_root={tmp_path}"])
    (row,) = selfcheck.data_check(cfg)
    assert row.status == "ok", row.detail
    (tmp_path / "digits" / "test.txt").unlink()
    (row,) = selfcheck.data_check(cfg)
    assert row.status == "FAIL" and "test.txt" in row.detail


@pytest.mark.slow
def test_timed_step_of_the_paper_backbones():
    rows = [selfcheck.timed_step(["task=dtd"], b, torch.device("cpu"), batch=1, steps=1)
            for b in selfcheck.STEP_BACKBONES]
    assert all(r.status == "ok" for r in rows)
    assert "kernels pytorch" in rows[1].detail and "lily_vim" in rows[1].detail
