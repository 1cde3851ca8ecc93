"""The environment self-check behind ``scripts/doctor.py`` (issue 17, item 6).

What a run on this machine would use and whether it works, section by section:

1. versions: python, torch (and its CUDA / cuDNN), timm, mamba-ssm, causal-conv1d, ...
2. device and precision: the device ``device=`` resolves to, the precision, and the TF32
   flags :func:`engine.step.configure_backend` sets for it (TF32 only exists on CUDA);
3. Vim's kernel path: ``backbone.kernels`` (of the configured backbone when it is Vim,
   else of ``configs/backbone/vim_s.yaml``), whether the compiled kernels import, and so
   which path a Vim run takes (``cuda`` or ``pytorch``), with the import errors;
4. kernels against the PyTorch path: :func:`compare_kernels` runs two implementations of
   the selective scan and of the causal conv1d on the same random tensors, forward and
   backward (every input's gradient for one random upstream gradient), and reports
   ``max |a - b| / max |b|`` per output against a tolerance. On a CUDA machine with the
   kernels it compares them with the PyTorch path; anywhere, it compares the PyTorch path
   with the plain sequential reference (``mamba_ops.selective_scan_ref``: fp32 autograd,
   one step at a time) and the conv with ``F.conv1d``, so the CPU part is a real check too;
5. one timed training step per backbone (random weights, a small batch, the configured
   method where it fits the backbone, else that family's default method);
6. data and weights: the data doctor (``data.doctor``) on the configured task folder under
   ``paths.data_root`` (skipped, with the reason, when it is absent or not importable), and
   whether the configured backbone's weights can be had (``models.weights_problem``).

Every check returns :class:`Check` rows (``ok`` | ``FAIL`` | ``skipped`` | ``info``); a
skipped row says why. Nothing here changes files except the data doctor's manifest, which
is not written (``write=False``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Kernel comparison tolerances, on max |a - b| / max |b| per tensor (fp32 inputs). The compiled
# kernels and the PyTorch path order their sums differently (and the kernel uses exp2 and a
# parallel scan), so they agree to rounding, not bit for bit; 1e-3 forward / 5e-3 backward is
# loose enough for that over Vim-S's length and strict enough to catch a wrong kernel (a wrong
# discretisation, a dropped D or z term, a mis-ordered conv tap are all O(1) relative errors).
TOL_FORWARD, TOL_BACKWARD = 1e-3, 5e-3
# Vim-S's shapes for one direction of one mixer: d_inner = 768, d_state = 16, L = 197 tokens
# (14 x 14 patches + the middle cls token), conv width 4.
VIM_SHAPES = dict(batch=2, dim=768, state=16, length=197, width=4)
# Small shapes for the CPU check against the sequential reference (a Python loop over L).
SMALL_SHAPES = dict(batch=2, dim=32, state=16, length=64, width=4)
STEP_BACKBONES = ("vit_b16_in21k", "vim_s")
DEFAULT_METHOD = {"vit": "lily_kvffn", "vim": "lily_vim"}
PACKAGES = ("torch", "timm", "mamba-ssm", "causal-conv1d", "triton", "numpy", "hydra-core", "omegaconf",
            "einops", "peft", "pandas", "scipy", "statsmodels")


@dataclass
class Check:
    section: str
    name: str
    status: str          # ok | FAIL | skipped | info
    detail: str = ""


# -- config ------------------------------------------------------------------------------------------
def compose(overrides=(), config_name: str = "train"):
    """The run config train.py would see for these overrides (Hydra's compose API)."""
    import os

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import open_dict

    os.environ.setdefault("LILY_ROOT", str(ROOT))
    import engine.run  # noqa: F401  (registers the resolvers the configs use)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except HydraException as e:
        raise UserError(f"config: {e}") from None
    with open_dict(cfg):
        choices = dict(cfg.hydra.runtime.choices)
        cfg.pop("hydra", None)
        cfg.method_id = choices.get("method")   # the method config's name, as train.py records it
    return cfg


# -- 1-3: versions, device, precision, kernel path ----------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> list[Check]:
    rows = [Check("versions", "python", "info", f"{platform.python_version()} ({sys.executable})"),
            Check("versions", "platform", "info", platform.platform())]
    for p in PACKAGES:
        v = torch.__version__ if p == "torch" else _version(p)
        rows.append(Check("versions", p, "info", v or "not installed"))
    rows.append(Check("versions", "torch CUDA build", "info", torch.version.cuda or "none (CPU build)"))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows.append(Check("versions", "cuDNN", "info", str(cudnn) if cudnn else "not available"))
    return rows


def device_and_precision(cfg) -> tuple[list[Check], torch.device]:
    from engine.setup import resolve_device
    from engine.step import check_precision, configure_backend
    rows = []
    device = resolve_device(str(cfg.device))
    cuda = torch.cuda.is_available()
    rows.append(Check("device", "CUDA available", "info", f"{cuda}" + (f", {torch.cuda.device_count()} device(s)"
                                                                          if cuda else "")))
    desc = str(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        desc += f": {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB"
    else:
        desc += f": {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    rows.append(Check("device", f"device={cfg.device}", "info", desc))
    precision = check_precision(str(cfg.precision))
    tf32 = bool(cfg.tf32)
    configure_backend(device, precision, tf32)
    rows.append(Check("precision", "precision", "info",
                      f"{precision}" + (" (bfloat16 autocast in the forward pass)" if precision == "bf16"
                                        else " (no autocast)")))
    if device.type == "cuda":
        rows.append(Check("precision", "tf32", "info",
                          f"config tf32={tf32}: torch.backends.cuda.matmul.allow_tf32="
                          f"{torch.backends.cuda.matmul.allow_tf32}, torch.backends.cudnn.allow_tf32="
                          f"{torch.backends.cudnn.allow_tf32}"
                          + ("" if torch.cuda.get_device_capability(device)[0] >= 8 else
                             " (this GPU has no TF32 units: fp32 throughout)")))
        if precision == "bf16":
            ok = torch.cuda.is_bf16_supported()
            rows.append(Check("precision", "bf16 supported", "ok" if ok else "FAIL", str(ok)))
    else:
        rows.append(Check("precision", "tf32", "info", f"config tf32={tf32}: TF32 does not exist on {device.type}; "
                                                        "fp32 matmuls are IEEE fp32"))
    rows.append(Check("precision", "float32 matmul precision", "info", torch.get_float32_matmul_precision()))
    return rows, device


def vim_kernel_mode(cfg) -> str:
    """backbone.kernels of the configured backbone when it is Vim, else of configs/backbone/vim_s.yaml."""
    from omegaconf import OmegaConf

    from models import mamba_ops
    if cfg.backbone.get("family") == "vim":
        kernels = cfg.backbone.get("kernels")
    else:
        kernels = OmegaConf.load(ROOT / "configs" / "backbone" / "vim_s.yaml").get("kernels")
    try:
        return mamba_ops.resolve_mode(kernels)
    except ValueError as e:
        raise UserError(f"backbone.kernels: {e}") from None


def kernel_path(cfg) -> tuple[list[Check], bool]:
    """Which path a Vim run takes; returns (rows, whether the compiled kernels can be compared)."""
    from models import mamba_ops
    mode = vim_kernel_mode(cfg)
    st = mamba_ops.kernel_status()
    rows = []
    for k, pkg in (("selective_scan", "mamba-ssm"), ("causal_conv1d", "causal-conv1d")):
        rows.append(Check("vim kernels", f"{k} ({pkg})", "info",
                          "imports" if st[k] else f"does not import: {st['errors'].get(k)}"))
    both, cuda = st["selective_scan"] and st["causal_conv1d"], torch.cuda.is_available()
    if mode == "pytorch":
        path, why = "pytorch", "backbone.kernels=pytorch (or VIM_KERNELS=pytorch)"
    elif both and cuda:
        path, why = "cuda", f"kernels={mode}, both kernels import and a CUDA device is present"
    else:
        missing = [k for k in ("selective_scan", "causal_conv1d") if not st[k]]
        why = (f"kernels={mode}, " + (f"{' and '.join(missing)} not installed" if missing else "no CUDA device"))
        path = "pytorch" if mode == "auto" else "none: a Vim run would stop with an error"
    status = "FAIL" if path.startswith("none") else "info"
    rows.append(Check("vim kernels", "path a Vim run takes", status, f"{path} ({why})"))
    return rows, bool(both and cuda)


# -- 4: kernels against a reference ------------------------------------------------------------------
def _scan_inputs(shapes: dict, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d, n, L = shapes["batch"], shapes["dim"], shapes["state"], shapes["length"]

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device)
    # as in a Vim mixer: A = -exp(A_log) < 0, delta through a softplus with a bias
    return {"u": r(b, d, L), "delta": r(b, d, L, scale=0.5, shift=-1.0),
            "A": -torch.exp(r(d, n, scale=0.5)), "B": r(b, n, L), "C": r(b, n, L), "D": r(d),
            "z": r(b, d, L), "delta_bias": r(d, scale=0.3, shift=-2.0)}


def _conv_inputs(shapes: dict, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    b, d, L, w = shapes["batch"], shapes["dim"], shapes["length"], shapes["width"]
    return {"x": torch.randn(b, d, L, generator=g).to(device), "weight": (torch.randn(d, w, generator=g) * 0.5).to(device),
            "bias": torch.randn(d, generator=g).to(device)}


def _run(fn: Callable, inputs: dict, kwargs: dict, gout_seed: int):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    g = torch.Generator().manual_seed(gout_seed)
    gout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), gout)
    return out.detach(), dict(zip(leaves, grads))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-30)


def compare_kernels(scan: Callable, conv: Callable, ref_scan: Callable, ref_conv: Callable, *, device="cpu",
                    shapes: dict | None = None, seed: int = 0, tol_forward: float = TOL_FORWARD,
                    tol_backward: float = TOL_BACKWARD, label: str = "kernel vs pytorch") -> list[Check]:
    """Compare two implementations of the selective scan and of the causal conv1d.

    ``scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` and ``conv(x, weight, bias,
    activation)`` have the signatures of :func:`models.mamba_ops.selective_scan` and
    :func:`models.mamba_ops.causal_conv1d`; ``ref_*`` likewise. Both run on the same random
    fp32 tensors (Vim-like: A < 0, softplus delta with a bias, D and the z gate, SiLU after the
    conv) on ``device``; forward outputs and every input's gradient (for one random upstream
    gradient) are compared by ``max |a - b| / max |ref|``. One Check per tensor, FAIL above the
    tolerance.
    """
    shapes = dict(shapes or SMALL_SHAPES)
    rows = []
    cases = (("selective_scan", scan, ref_scan, _scan_inputs(shapes, device, seed), {"delta_softplus": True}),
             ("causal_conv1d", conv, ref_conv, _conv_inputs(shapes, device, seed), {"activation": "silu"}))
    for name, fn, ref, inputs, kw in cases:
        try:
            out_a, grads_a = _run(fn, inputs, kw, seed + 7)
            out_b, grads_b = _run(ref, inputs, kw, seed + 7)
        except Exception as e:  # noqa: BLE001 - a kernel that raises is a failed check, said as such
            rows.append(Check(f"kernels: {label}", name, "FAIL", f"raised {type(e).__name__}: {e}"))
            continue
        if out_a.shape != out_b.shape:
            rows.append(Check(f"kernels: {label}", f"{name} forward", "FAIL",
                              f"shape {tuple(out_a.shape)} vs {tuple(out_b.shape)}"))
            continue
        for what, a, b, tol in [("forward", out_a, out_b, tol_forward),
                                *((f"grad {k}", grads_a[k], grads_b[k], tol_backward) for k in inputs)]:
            diff, rel = _rel_err(a, b)
            ok = rel <= tol and rel == rel   # NaN fails
            rows.append(Check(f"kernels: {label}", f"{name} {what}", "ok" if ok else "FAIL",
                              f"max|diff| {diff:.2e}, / max|ref| = {rel:.2e} (tolerance {tol:.0e})"))
    return rows


def conv1d_reference(x, weight, bias=None, activation="silu"):
    """The causal depthwise conv by F.conv1d with left padding (an independent formulation)."""
    dim, width = weight.shape[0], weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.reshape(dim, 1, width), bias, groups=dim)
    return F.silu(out) if activation else out


def kernel_checks(cuda_kernels: bool, shapes_small=None, shapes_vim=None) -> list[Check]:
    """The project's PyTorch path against the sequential reference (anywhere), and the compiled
    kernels against the PyTorch path (on CUDA with the kernels; skipped with the reason otherwise)."""
    from models import mamba_ops
    torch_scan = partial(mamba_ops.selective_scan, mode="pytorch")
    torch_conv = partial(mamba_ops.causal_conv1d, mode="pytorch")
    rows = compare_kernels(torch_scan, torch_conv, mamba_ops.selective_scan_ref, conv1d_reference,
                           shapes=shapes_small, label="pytorch path vs sequential reference (CPU)")
    if cuda_kernels:
        rows += compare_kernels(partial(mamba_ops.selective_scan, mode="cuda"),
                                partial(mamba_ops.causal_conv1d, mode="cuda"),
                                lambda **kw: torch_scan(**kw), lambda **kw: torch_conv(**kw), device="cuda",
                                shapes=shapes_vim or VIM_SHAPES, label="CUDA kernels vs pytorch path (Vim-S shapes)")
    else:
        st = mamba_ops.kernel_status()
        missing = [k for k in ("selective_scan", "causal_conv1d") if not st[k]]
        why = (f"{' and '.join(missing)} not installed (requirements-mamba.txt on a CUDA machine)" if missing
               else "no CUDA device")
        rows.append(Check("kernels: CUDA kernels vs pytorch path", "selective_scan, causal_conv1d", "skipped", why))
    return rows


# -- 5: one timed training step per backbone ------------------------------------------------------
def _step_config(overrides, backbone: str):
    from data import get_task
    from engine.setup import apply_method
    from models import build_backbone
    from omegaconf import open_dict
    base = [o for o in overrides if not o.split("=")[0].lstrip("+~") in ("backbone", "optim")]
    cfg = compose([*base, f"backbone={backbone}"])
    with open_dict(cfg):
        cfg.backbone.pretrained = False
        cfg.backbone.checkpoint = None
    classes = get_task(cfg.task.name).num_classes
    with torch.device("meta"):  # does the configured method fit this backbone? (no memory, no weights)
        model, _ = build_backbone(cfg.backbone, classes)
        try:
            apply_method(model, cfg)
            return cfg, classes, None
        except UserError as e:
            note = str(e)
    method = DEFAULT_METHOD.get(cfg.backbone.family)
    cfg = compose([*[o for o in base if o.split("=")[0] != "method"], f"backbone={backbone}", f"method={method}"])
    with open_dict(cfg):
        cfg.backbone.pretrained = False
        cfg.backbone.checkpoint = None
    return cfg, classes, f"the configured method does not fit {backbone} ({note}); {method} used instead"


def timed_step(overrides, backbone: str, device, batch: int = 2, steps: int = 2) -> Check:
    """``steps`` training steps (forward, cross-entropy, backward, AdamW step) of ``backbone`` with random
    weights and the configured method (or the family's default when it does not fit) on a random
    batch; the time of the last step is reported (the first ones warm up)."""
    from engine.setup import build_model
    from engine.step import precision_context
    cfg, classes, note = _step_config(overrides, backbone)
    torch.manual_seed(0)
    model, info = build_model(cfg, classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    size = int(cfg.backbone.img_size)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    model.train()
    seconds = []
    for _ in range(max(1, steps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with precision_context(device, str(cfg.precision)):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    ok = bool(torch.isfinite(loss).item())
    method = cfg.get("method_id") or cfg.method.get("name")
    kern = f", kernels {info['kernels']}" if "kernels" in info else ""
    detail = (f"{seconds[-1] * 1000:.0f} ms/step (first step {seconds[0] * 1000:.0f} ms), batch {batch} x {size}x{size}, "
              f"{cfg.precision}, random weights, method {method} ({sum(p.numel() for p in params):,} trainable)"
              f"{kern}, loss {loss.item():.3f}" + (f"; {note}" if note else ""))
    return Check("training step", f"{backbone} on {device}", "ok" if ok else "FAIL", detail)


# -- 6: data and weights ------------------------------------------------------------------------------
def data_check(cfg, progress: bool = False) -> list[Check]:
    root = Path(str(cfg.paths.data_root)).expanduser().absolute()
    task = str(cfg.task.name)
    try:
        doctor = importlib.import_module("data.doctor")
    except ImportError as e:
        return [Check("data", f"doctor on {root}", "skipped", f"data.doctor is not importable ({e})")]
    if not (root / task).is_dir():
        from data import get_task
        aliases = getattr(get_task(task), "aliases", ())
        if not any((root / a).is_dir() for a in aliases):
            why = ("the demo task is written there by the first demo run" if task == "digits" else
                   "set paths.data_root= or VTAB_ROOT (scripts/prepare_vtab.py builds one)")
            return [Check("data", f"doctor on {root / task}", "skipped", f"no folder for task {task} ({why})")]
    try:
        res = doctor.run_doctor(root, [task], workers=1, progress=progress, write=False)
    except UserError as e:
        return [Check("data", f"doctor on {root}", "FAIL", str(e))]
    rows = []
    for r in res.reports:
        errs, warns = r.errors, r.warnings
        detail = (f"{len(errs)} error(s), {len(warns)} warning(s)" +
                  "".join(f"\n      error: {p}" for p in errs[:5]) + "".join(f"\n      warning: {p}" for p in warns[:3]))
        rows.append(Check("data", f"doctor on {r.folder}", "FAIL" if errs else "ok", detail))
    return rows


def weights_check(cfg) -> list[Check]:
    from models import weights_problem
    b = cfg.backbone
    if not b.get("pretrained", False):
        return [Check("weights", str(b.name), "info", "backbone.pretrained=false: random weights, nothing to load")]
    problem = weights_problem(b)
    where = b.get("checkpoint") or f"timm hub {b.get('hub_name')}"
    return [Check("weights", str(b.name), "FAIL" if problem else "ok", problem or f"{where} is available")]


# -- all of it ------------------------------------------------------------------------------------------
def run_selfcheck(overrides=(), *, step_backbones=None, step_batch: int = 2, kernels: bool = True,
                  data: bool = True, echo: Callable[[Check], None] | None = None) -> list[Check]:
    """Every section above for the config ``overrides`` compose to; ``echo`` is called with each
    row as soon as it is known (progress on a slow machine). ``step_backbones``: None = the
    configured backbone and the paper's two (STEP_BACKBONES)."""
    rows: list[Check] = []

    def add(new):
        for c in new if isinstance(new, list) else [new]:
            rows.append(c)
            if echo:
                echo(c)
    overrides = list(overrides)
    cfg = compose(overrides)
    add(Check("config", "composed", "info", f"task={cfg.task.name} backbone={cfg.backbone.name} "
                                            f"method={cfg.get('method_id')} overrides: {' '.join(overrides) or 'none'}"))
    add(versions())
    dev_rows, device = device_and_precision(cfg)
    add(dev_rows)
    kp_rows, cuda_kernels = kernel_path(cfg)
    add(kp_rows)
    if kernels:
        add(kernel_checks(cuda_kernels))
    else:
        add(Check("kernels", "comparison", "skipped", "--no-kernels"))
    if step_backbones is None:
        step_backbones = [str(cfg.backbone.name), *STEP_BACKBONES]
    if not step_backbones:
        add(Check("training step", "all backbones", "skipped", "none asked for (--no-steps)"))
    for b in dict.fromkeys(step_backbones):
        try:
            add(timed_step(overrides, b, device, batch=step_batch))
        except UserError as e:
            add(Check("training step", b, "FAIL", str(e)))
    if data:
        add(data_check(cfg))
    else:
        add(Check("data", "doctor", "skipped", "--no-data"))
    add(weights_check(cfg))
    return rows


def format_check(c: Check) -> str:
    return f"  [{c.status:>7}] {c.name}: {c.detail}"


def summary(rows: list[Check]) -> str:
    fails = [c for c in rows if c.status == "FAIL"]
    skipped = [c for c in rows if c.status == "skipped"]
    text = f"{len(rows)} checks: {sum(c.status == 'ok' for c in rows)} ok, {len(fails)} failed, {len(skipped)} skipped"
    if skipped:
        text += "\nskipped: " + "; ".join(f"{c.name} ({c.detail.splitlines()[0]})" for c in skipped)
    if fails:
        text += "\nfailed: " + "; ".join(f"{c.section} / {c.name}" for c in fails)
    return text
