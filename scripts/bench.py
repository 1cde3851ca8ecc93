"""Benchmark the training step, the evaluation and the data path on the current device.

For ViT-B/16 (timm ``vit_base_patch16_224``) and Vim-S (models/vim.py), random weights,
each method adapted by ``lily.adapt``, it measures with engine/step.py (the loop the
trainer runs): training images/s, evaluation images/s and the peak memory a training step
adds. The methods are every method of the field (configs/experiment/field_vit.yaml and
field_vim.yaml) whose config exists, each composed from configs/method/<name>.yaml with Hydra
as a run composes it (scripts/bench_models.py). Per backbone, one table gives each method's
training step time, evaluation throughput and step peak memory as ratios to LoRA (ViT-B/16:
configs/method/lora.yaml) and to LoRA(in_proj) (Vim-S: vim_lora_in_proj.yaml), all measured
in the same run. Then, side by side, the ratios

    lily/lora step time ratio          Lily kvffn vs LoRA (q, v, r 32), training step
    lily/linear step time ratio        Lily kvffn vs the linear probe, training step
    ours/replaced train speed ratio    ours vs the design we replace (scripts/bench_replaced.py:
    ours/replaced eval speed ratio       hand-written attention, experts one by one, fp32)
    cache/pil data epoch speed ratio   a data epoch from the decode-once cache vs PIL decoding
    token/sample Vim-S peak memory ratio   per-token vs per-sample routing on in_proj

("time" ratios: a / b of seconds per step, lower is better for a; "speed" ratios: a / b of
images per second, higher is better for a) and whether each target holds.

    python scripts/bench.py --quick                 # everything on a CPU in a few minutes (2-block models)
    python scripts/bench.py --device cuda           # full sizes (224 px, batch 64, eval 256, all blocks)
    python scripts/bench.py --methods lora,ssf,vpt_deep --vim-methods vim_lora_in_proj,vim_affix

Timing: warm-up steps first, then ``--repeats`` rounds in which every model runs
``--steps`` steps in turn (interleaved, so background load hits all alike); the median
round is reported.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_memory import cpu_step_peaks, cuda_step_peak  # noqa: E402
from bench_models import (BASELINE, adapted, build_backbone, field_methods, has_config,  # noqa: E402
                          make_optimizer, randomize_adapters, synthetic_split)
from bench_replaced import check_same_outputs, make_image_folder, pil_epoch, replace_design  # noqa: E402
from engine import step  # noqa: E402

DATA_ON_DEVICE_BYTES = 4 << 30  # data_on_device=auto in configs/train.yaml
# Targets (the issue): name -> threshold
LILY_OVER_LORA_MAX = 1.05
CACHE_OVER_PIL_MIN = 10.0
TOKEN_OVER_SAMPLE_MAX = 1.05
TRAIN_SPEEDUP_MIN = 1.5
EVAL_SPEEDUP_MIN = 2.0
RUN_SECONDS_MAX = 90.0
PAPER_SIZES = dict(image_size=224, batch_size=64, eval_batch_size=256)


@dataclass
class Entry:
    backbone: str
    method: str
    design: str          # ours | replaced
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_s: list = field(default_factory=list)  # seconds per training step, one per round
    eval_s: list = field(default_factory=list)   # seconds per evaluated image, one per round
    peak: int | None = None                       # bytes a training step adds
    train_data: object = None

    @property
    def name(self):
        return f"{self.backbone}/{self.method}/{self.design}/{self.precision}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--backbone", default="all", help="vit_b16 | vim_s | all")
    ap.add_argument("--methods", default="field",
                    help="ViT methods (method config names), comma-separated; default: the field "
                         "(configs/experiment/field_vit.yaml) with a config; lora is added (the ratios' baseline)")
    ap.add_argument("--vim-methods", default="field",
                    help="Vim methods, comma-separated; default: the field (field_vim.yaml) with a config, plus "
                         "lily_vim_sample; vim_lora_in_proj is added (the ratios' baseline)")
    ap.add_argument("--depth", type=int, default=None, help="blocks of both backbones (default: all; --quick 2)")
    ap.add_argument("--image-size", type=int, default=None, help="ViT input size (default 224; --quick 64)")
    ap.add_argument("--vim-image-size", type=int, default=None, help="Vim input size (default: --image-size; --quick 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default 64; --quick 8)")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch (default 256; --quick 16)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per round (default 10; --quick 2)")
    ap.add_argument("--eval-batches", type=int, default=None, help="evaluation batches per round (default 4; --quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, median reported (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default 3; --quick 1)")
    ap.add_argument("--data-images", type=int, default=None, help="JPEG files for the data epoch (default 512; --quick 96)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; --quick 1, robust when other jobs share the CPUs)")
    ap.add_argument("--precisions", default="fp32", help="precisions of our rows: fp32 (the default run) and/or bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile our models (engine.step.maybe_compile)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--quick", action="store_true", help="small sizes: everything on a CPU in a few minutes")
    args = ap.parse_args(argv)
    quick = dict(image_size=64, batch_size=8, eval_batch_size=16, steps=2, eval_batches=1, repeats=3, warmup=1,
                 data_images=96, vim_image_size=64, threads=1, depth=2)
    full = dict(image_size=224, batch_size=64, eval_batch_size=256, steps=10, eval_batches=4, repeats=5, warmup=3,
                data_images=512, vim_image_size=None, threads=None, depth=None)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.vim_image_size = args.vim_image_size or args.image_size
    args.backbones = ("vit_b16", "vim_s") if args.backbone == "all" else tuple(args.backbone.split(","))
    args.methods = _methods("vit_b16", args.methods)
    args.vim_methods = _methods("vim_s", args.vim_methods)
    args.precisions = [p for p in args.precisions.split(",") if p]
    for p in args.precisions:
        step.check_precision(p)
    return args


def _methods(backbone: str, text: str) -> list[str]:
    """The method labels to run on ``backbone``: the field (configs present) or the given list; the
    baseline of the ratios always; on Vim-S also Lily with per-sample routing (the memory ratio)."""
    if text == "field":
        chosen = [m for m in field_methods(backbone) if has_config(m)]
        if backbone == "vim_s" and "lily_vim" in chosen:
            chosen.append("lily_vim_sample")
    else:
        chosen = [m for m in text.split(",") if m]
    missing = [m for m in chosen if not has_config(m)]
    if missing:
        raise SystemExit(f"no method config for {', '.join(missing)} (configs/method/<name>.yaml)")
    base = BASELINE[backbone]
    return list(dict.fromkeys(([base] if has_config(base) else []) + chosen))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rounds(entries, run, warmup_run, repeats):
    """Warm every entry up, then ``repeats`` rounds of ``run(entry)`` (interleaved)."""
    for e in entries:
        warmup_run(e)
    for _ in range(repeats):
        for e in entries:
            run(e)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def bench_models(backbone, methods, args, device, out):
    size = args.image_size if backbone == "vit_b16" else args.vim_image_size
    torch.manual_seed(0)
    base = build_backbone(backbone, size, args.depth).to(device)
    entries = []
    for method in methods:
        try:
            adapted(base, backbone, method)
        except Exception as e:  # noqa: BLE001 - one method that cannot run here is reported, not fatal
            out.append(f"{backbone}/{method}: not measured, it does not build on this model "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        for precision in args.precisions:
            model = step.maybe_compile(adapted(base, backbone, method), args.compile)
            entries.append(Entry(backbone, method, "ours", precision, model, make_optimizer(model)))
    replaced_of = {"vit_b16": "lily_kvffn", "vim_s": "lily_vim"}[backbone]
    if replaced_of in {e.method for e in entries}:
        ours = next(e for e in entries if e.method == replaced_of and e.precision == "fp32") \
            if "fp32" in args.precisions else None
        model = adapted(base, backbone, replaced_of)
        patched = replace_design(model)
        probe = synthetic_split(2, size, seed=5).images.to(device)
        reference = getattr(ours.model, "_orig_mod", ours.model) if ours is not None \
            else adapted(base, backbone, replaced_of)
        randomize_adapters(reference)
        with torch.no_grad():
            params = dict(reference.named_parameters())
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(params[n])
        diff = check_same_outputs(reference, model, probe.float().div(255))
        out.append(f"{backbone}: replaced design ({patched['attention']} hand-written attentions, "
                   f"{patched['lily']} expert-loop Lily adapters) computes the same logits as ours "
                   f"(max |diff| {diff:.2e})")
        entries.append(Entry(backbone, replaced_of, "replaced", "fp32", model, make_optimizer(model)))

    train = step.to_device(synthetic_split(args.batch_size * args.steps, size, seed=1), device, DATA_ON_DEVICE_BYTES)
    evald = step.to_device(synthetic_split(args.eval_batch_size * args.eval_batches, size, seed=2), device,
                           DATA_ON_DEVICE_BYTES)
    epochs = itertools.count()

    def train_run(e, steps):
        o = step.train_epoch(e.model, e.optimizer, train, batch_size=args.batch_size, seed=0, epoch=next(epochs),
                             device=device, normalization="none", precision=e.precision, max_steps=steps)
        return o["seconds"] / o["steps_done"]

    def eval_run(e):
        o = step.evaluate(e.model, evald, batch_size=args.eval_batch_size, device=device, normalization="none",
                          precision=e.precision)
        return o["seconds"] / o["images"]

    rounds(entries, lambda e: e.train_s.append(train_run(e, args.steps)),
           lambda e: train_run(e, args.warmup), args.repeats)
    rounds(entries, lambda e: e.eval_s.append(eval_run(e)), eval_run, args.repeats)
    for e in entries:
        e.train_data = train
    return entries


def measure_memory(entries, args, device):
    """The step peak of every entry: in process on CUDA, in one fresh process per backbone on CPU."""
    if device.type == "cuda":
        for e in entries:
            e.peak = cuda_step_peak(e.model, e.optimizer, e.train_data, args.batch_size, device, e.precision)
    elif device.type == "cpu":
        for backbone in dict.fromkeys(e.backbone for e in entries):
            mine = [e for e in entries if e.backbone == backbone]
            size = args.image_size if backbone == "vit_b16" else args.vim_image_size
            peaks = cpu_step_peaks(backbone, [(e.method, e.design, e.precision) for e in mine], size,
                                   args.batch_size, args.threads, depth=args.depth)
            for e in mine:
                e.peak = peaks.get((e.method, e.design, e.precision))


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def bench_data(args, out):
    """Seconds per epoch: decode-once cache (load_split hit + batches + normalize) vs PIL."""
    from data import batches, get_task, load_split, normalize
    from data.loader import Batches

    logging.getLogger("data.folder").setLevel(logging.ERROR)  # "N images, expected 1000": intended here
    image_size, n = 224, args.data_images
    batch = min(64, n // 3)
    task = get_task("dtd")
    with tempfile.TemporaryDirectory(prefix="lily-bench-") as tmp:
        root, cache = os.path.join(tmp, "data"), os.path.join(tmp, "cache")
        make_image_folder(root, task.name, "train800val200", n, task.num_classes)
        t = time.perf_counter()
        first = load_split(root, task, "train800val200", image_size, cache, progress=False)
        first_decode = time.perf_counter() - t
        paths = [os.path.join(root, task.name, line.split()[0])
                 for line in open(os.path.join(root, task.name, "train800val200.txt"))]
        labels = first.labels
        # the replaced pipeline produces the same pixels: check one batch
        order = Batches(first, batch, True, True, seed=0, epoch=0).order()
        x_pil, _ = next(pil_epoch(paths, labels, order, batch, image_size))
        x_ours = normalize(first.images[order[:batch]], "none")
        if not torch.equal(x_pil, x_ours):
            raise AssertionError("PIL decoding and the cache disagree on the same images")
        epochs = itertools.count()

        def cached():
            t0 = time.perf_counter()
            d = load_split(root, task, "train800val200", image_size, cache, progress=False)
            assert d.cache_hit
            for x, y in batches(d, batch, shuffle=True, drop_last=True, seed=0, epoch=next(epochs)):
                normalize(x, "none")
            return time.perf_counter() - t0

        def pil():
            t0 = time.perf_counter()
            o = Batches(first, batch, True, True, seed=0, epoch=next(epochs)).order()
            for _ in pil_epoch(paths, labels, o, batch, image_size):
                pass
            return time.perf_counter() - t0

        times = {"cache": [], "pil": []}
        cached(), pil()  # warm-up (page cache)
        for _ in range(args.repeats):
            times["cache"].append(cached())
            times["pil"].append(pil())
    c, p = median(times["cache"]), median(times["pil"])
    out.append(f"data: {n} JPEG files (500x375) -> {image_size}px, batch {batch}: first decode into the cache "
               f"{first_decode:.2f} s; epoch from the cache {c * 1e3:.1f} ms, with PIL {p * 1e3:.1f} ms "
               f"({(n // batch) * batch} images)")
    return c, p, (n // batch) * batch


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def fmt_ratio(v):
    return f"{v:.3g}" if v is not None and math.isfinite(v) else "nan"


def verdict(ok: bool | None, value, how: str) -> str:
    if ok is None:
        return value
    return f"{'HOLDS' if ok else 'FAILS'} ({how})"


def trainable_m(model) -> float:
    model = getattr(model, "_orig_mod", model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")) / 1e6


def print_ratio_table(entries, backbone, base, t, ev, mem, device):
    """Every method of ``backbone`` against the baseline, measured in this run: step time / base's
    (lower is cheaper), eval throughput / base's (higher is faster), step peak memory / base's."""
    import pandas as pd
    name = BASELINE[backbone] + (" (LoRA)" if backbone == "vit_b16" else " (LoRA(in_proj))")
    mine = [e for e in entries if e.backbone == backbone and e.design == "ours" and e.precision == "fp32"]
    if not mine:
        return
    if base is None:
        print(f"{backbone}: ratios not measured: its baseline {name} was not measured (no config or it failed)\n")
        return
    rows = [{"method": e.method, "trainable (M)": trainable_m(e.model), "step time / base": t(e) / t(base),
             "eval throughput / base": ev(base) / ev(e), "step peak memory / base": mem(e) / mem(base)}
            for e in mine]
    print(f"{backbone} methods, ratios to {name}, fp32, all measured in this run on {device.type} "
          "(time: lower is cheaper; throughput: higher is faster; memory: the peak a training step adds):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    step.configure_backend(device, "fp32", tf32=True)
    gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}"
    print(f"device: {device} ({where}); torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" + ("; TF32 on" if gpu else ""))
    print(f"sizes: ViT-B/16 image {args.image_size}, Vim-S image {args.vim_image_size}; "
          f"{f'{args.depth} blocks' if args.depth else 'all blocks'}; train batch "
          f"{args.batch_size}, eval batch {args.eval_batch_size}; {args.steps} steps / {args.eval_batches} eval "
          f"batches per round, {args.repeats} rounds (median), {args.warmup} warm-up steps"
          f"{' (--quick)' if args.quick else ''}")
    notes, entries = [], []
    if "vit_b16" in args.backbones:
        entries += bench_models("vit_b16", args.methods, args, device, notes)
    if "vim_s" in args.backbones:
        entries += bench_models("vim_s", args.vim_methods, args, device, notes)
    cache_s, pil_s, _ = bench_data(args, notes)
    if not args.no_memory:
        measure_memory(entries, args, device)
    for line in notes:
        print(line)

    import pandas as pd
    rows = []
    for e in entries:
        size = args.image_size if e.backbone == "vit_b16" else args.vim_image_size
        rows.append({"backbone": e.backbone, "method": e.method, "design": e.design, "precision": e.precision,
                     "image": size, "batch": args.batch_size, "train ms/step": 1e3 * median(e.train_s),
                     "train img/s": args.batch_size / median(e.train_s), "eval img/s": 1 / median(e.eval_s),
                     "step peak MB": e.peak / 2**20 if e.peak is not None else float("nan")})
    pd.set_option("display.width", 200)
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print()

    def get(backbone, method, design="ours", precision="fp32"):
        return next((e for e in entries if (e.backbone, e.method, e.design, e.precision)
                     == (backbone, method, design, precision)), None)

    def ratio(a, b, f):
        return f(a) / f(b) if a is not None and b is not None else None

    t = lambda e: median(e.train_s)  # noqa: E731
    ev = lambda e: median(e.eval_s)  # noqa: E731
    mem = lambda e: e.peak if e.peak is not None else float("nan")  # noqa: E731
    for backbone in args.backbones:
        print_ratio_table(entries, backbone, get(backbone, BASELINE[backbone]), t, ev, mem, device)
    lily, lora, linear = (get("vit_b16", m) for m in ("lily_kvffn", "lora", "linear"))
    replaced = get("vit_b16", "lily_kvffn", "replaced")
    r = {
        "lily/lora step time": ratio(lily, lora, t),
        "lily/linear step time": ratio(lily, linear, t),
        "ours/replaced train speed": ratio(replaced, lily, t),
        "ours/replaced eval speed": ratio(replaced, lily, ev),
        "cache/pil data epoch speed": pil_s / cache_s,
        "token/sample Vim-S peak memory": ratio(get("vim_s", "lily_vim"), get("vim_s", "lily_vim_sample"), mem),
    }
    vim_replaced = get("vim_s", "lily_vim", "replaced")
    if vim_replaced is not None and vim_replaced.peak is not None:
        r["replaced/ours Vim-S token routing peak memory"] = ratio(vim_replaced, get("vim_s", "lily_vim"), mem)
    for what, v in r.items():
        a_b, rest = what.split(" ", 1)
        if v is not None and math.isfinite(v):  # not measured: no line
            print(f"{a_b} {rest} ratio: {fmt_ratio(v)}")

    paper = all(getattr(args, k) == v for k, v in PAPER_SIZES.items())
    no_gpu = "not measured (no GPU)"

    def gpu_target(value, ok):
        if not gpu:
            return no_gpu
        if value is None or not math.isfinite(value):
            return "not measured (a model it needs was not selected)"
        if not paper:
            return f"not measured (sizes differ from the paper's {PAPER_SIZES}; value here {value:.3g})"
        return verdict(ok(value), None, f"{value:.3g}")

    print()
    print("targets:")
    v = r["lily/lora step time"]
    print(f"  Lily kvffn step time <= {LILY_OVER_LORA_MAX} x LoRA's: "
          + (verdict(v <= LILY_OVER_LORA_MAX, None, f"{v:.3g}, on {device.type}") if v is not None
             else "not measured (needs lora and lily_kvffn)"))
    v = r["cache/pil data epoch speed"]
    print(f"  cached data epoch >= {CACHE_OVER_PIL_MIN:g} x faster than PIL decoding: "
          + verdict(v >= CACHE_OVER_PIL_MIN, None, f"{v:.3g}"))
    v = r["token/sample Vim-S peak memory"]
    print(f"  Vim-S token routing adds < {100 * (TOKEN_OVER_SAMPLE_MAX - 1):.0f}% to peak memory over sample: "
          + (verdict(v < TOKEN_OVER_SAMPLE_MAX, None, f"{v:.3g}, image {args.vim_image_size}, batch {args.batch_size}, "
                     f"on {device.type}") if v is not None and math.isfinite(v) else "not measured"))
    v = r["ours/replaced train speed"]
    print(f"  ours >= {TRAIN_SPEEDUP_MIN} x the replaced design per training step (GPU): "
          + gpu_target(v, lambda x: x >= TRAIN_SPEEDUP_MIN))
    v = r["ours/replaced eval speed"]
    print(f"  ours >= {EVAL_SPEEDUP_MIN} x the replaced design in evaluation (GPU): "
          + gpu_target(v, lambda x: x >= EVAL_SPEEDUP_MIN))
    run_s = None
    if lily is not None:
        steps, batch = 1000 // args.batch_size, args.batch_size
        run_s = 100 * steps * t(lily) + 10 * 10_000 * ev(lily)
    print(f"  100 epochs of a 1,000-image task + 10 evaluations of 10,000 images <= {RUN_SECONDS_MAX:g} s "
          f"(one H100; projected from the Lily kvffn throughput): " + gpu_target(run_s, lambda x: x <= RUN_SECONDS_MAX))
    return r


if __name__ == "__main__":
    main()
