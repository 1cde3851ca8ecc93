"""Every number traceable: run identity, config hygiene, data identity, preflight, recipes, precision."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import lily
from engine.cli import ROOT
from common.errors import UserError
from engine.run import identity, readable, relative_dir, run_id

from tests.test_train import run, run_dir_of


def cfg_of(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return cfg


# -- run identity ---------------------------------------------------------------------------
def test_identity_ignores_paths_device_logger_and_covers_everything_else():
    base = cfg_of("experiment=demo")
    same = cfg_of("experiment=demo", "paths.output_dir=/elsewhere", "paths.data_root=/x", "device=cpu",
                  "logger=none", "num_workers=3", "progress=false", "resume=false", "threads=1")
    assert run_id(identity(base)) == run_id(identity(same))
    for change in ("seed=1", "optim.epochs=7", "eval_every=3", "method.ne=2", "method.scale=0.1", "recipe=paper",
                   "precision=bf16", "normalization=imagenet", "protocol=search", "eval_batch_size=128",
                   "backbone.drop_path_rate=0.2", "method.routing=sample"):
        other = cfg_of("experiment=demo", change)
        assert run_id(identity(other)) != run_id(identity(base)), change
    # the same value written as an int or a float is the same configuration
    assert run_id(identity(cfg_of("experiment=demo", "method.scale=1"))) == run_id(identity(base))
    assert run_id(identity(cfg_of("experiment=demo", "optim.lr=0.003"))) == run_id(identity(base))
    # readable and unique: task/backbone/method/<headline>-<hash>
    rel = relative_dir(base, "lily_qvffn_tiny")
    assert rel.startswith("digits/vit_tiny/lily_qvffn_tiny/ne3-s1-authors-paper-seed42-")
    assert rel.endswith(run_id(identity(base))) and readable(identity(base)) in rel


def test_weights_are_identified_by_file_name_and_size_not_location(tmp_path):
    src = ROOT / "assets" / "vit_tiny.safetensors"
    copy = tmp_path / "vit_tiny.safetensors"
    copy.write_bytes(src.read_bytes())
    a = cfg_of("experiment=demo")
    b = cfg_of("experiment=demo", f"backbone.checkpoint={copy}")
    assert run_id(identity(a)) == run_id(identity(b))
    copy.write_bytes(src.read_bytes()[:-10])
    assert run_id(identity(cfg_of("experiment=demo", f"backbone.checkpoint={copy}"))) != run_id(identity(a))


SHORT = ["optim.epochs=2", "optim.warmup_epochs=0", "eval_every=1", "max_train_steps=2"]


def test_two_configs_never_share_a_directory_and_a_rerun_trains_nothing(tmp_path):
    # experiment=demo pins eval_every=5 (here overridden to the same short schedule), method lily_qvffn_tiny;
    # the same task/backbone/method chosen by hand differs only in what the experiment file pins (eval_every)
    run(["experiment=demo", *SHORT, "eval_every=2"], tmp_path)
    run(["task=digits", "backbone=vit_tiny", "method=lily_qvffn_tiny", *SHORT], tmp_path)
    dirs = sorted((tmp_path / "out" / "runs" / "digits" / "vit_tiny" / "lily_qvffn_tiny").iterdir())
    assert len(dirs) == 2
    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert all(r["status"] == "finished" for r in results)
    assert {r["identity"]["eval_every"] for r in results} == {1, 2}
    assert len({r["run_id"] for r in results}) == 2 and all(d.name.endswith(r["run_id"]) for d, r in zip(dirs, results))
    mtimes = [(d / "checkpoint.pt").stat().st_mtime_ns for d in dirs]
    again = run(["experiment=demo", *SHORT, "eval_every=2", "resume=true"], tmp_path)
    assert "skipped" in again.stdout + again.stderr
    assert [(d / "checkpoint.pt").stat().st_mtime_ns for d in dirs] == mtimes
    # only overwrite=true runs a finished configuration again
    run(["experiment=demo", *SHORT, "eval_every=2", "overwrite=true"], tmp_path)
    changed = [(d / "checkpoint.pt").stat().st_mtime_ns != m for d, m in zip(dirs, mtimes)]
    assert sorted(changed) == [False, True]


def test_interrupted_run_resumes_by_rerunning_the_same_command(tmp_path):
    args = ["experiment=demo", "optim.epochs=3", "optim.warmup_epochs=0", "eval_every=1", "max_train_steps=3"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run(args, tmp_path / "a")
    run(args + ["stop_after_epoch=1"], tmp_path / "b")
    rd = run_dir_of(tmp_path / "b")
    assert json.loads((rd / "results.json").read_text())["status"] == "interrupted"
    # resume=false refuses to touch the earlier attempt (overwrite=true would delete it)
    refused = run(args + ["resume=false"], tmp_path / "b", check=False)
    assert refused.returncode == 2 and "overwrite=true" in refused.stderr and "Traceback" not in refused.stderr
    resumed = run(args, tmp_path / "b")  # stop_after_epoch is not part of the identity: same directory
    assert run_dir_of(tmp_path / "b") == rd and "resumed from" in (rd / "train.log").read_text()
    ra = json.loads((run_dir_of(tmp_path / "a") / "results.json").read_text())
    rb = json.loads((rd / "results.json").read_text())
    assert rb["status"] == "finished" and rb["resumed"] == "interrupted" and rb["attempts"] == 2, resumed.stderr[-500:]
    assert ra["history"] == rb["history"] and ra["lrs"] == rb["lrs"]


# -- config hygiene -------------------------------------------------------------------------
def _method(*overrides):
    return OmegaConf.to_container(cfg_of(*overrides).method, resolve=True)


@pytest.mark.parametrize("method", ["lora", "adaptformer", "lily_kvffn", "linear"])
def test_experiment_does_not_leak_method_values(method):
    assert _method("experiment=demo", f"method={method}") == _method(f"method={method}")


def test_a_mapping_key_for_a_target_the_method_lacks_is_an_error_naming_it():
    from engine.preflight import check_method
    cfg = cfg_of("method=lily_kvffn", "backbone=vit_tiny", "+method.rank.q=8")
    problems = check_method(cfg)
    assert len(problems) == 1 and "['q']" in problems[0] and "rank" in problems[0], problems


# -- data identity --------------------------------------------------------------------------
def _make_task(root: Path, value: int, n: int = 6):
    from PIL import Image
    d = root / "dtd" / "images"
    d.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (value, value, value)).save(d / f"{i}.png")
    lines = "".join(f"images/{i}.png {i % 3}\n" for i in range(n))
    for split in ("train800", "val200", "train800val200", "test"):
        (root / "dtd" / f"{split}.txt").write_text(lines)


def test_cache_is_keyed_by_data_root_and_image_stats(tmp_path):
    from data import load_split
    _make_task(tmp_path / "white", 255)
    _make_task(tmp_path / "black", 0)
    cache = tmp_path / "cache"
    kw = dict(image_size=8, cache_dir=cache, progress=False)
    w = load_split(tmp_path / "white", "dtd", "train800", **kw)
    b = load_split(tmp_path / "black", "dtd", "train800", **kw)
    assert w.decoded == 6 and b.decoded == 6 and w.cache_path != b.cache_path
    assert int(w.images.min()) == 255 and int(b.images.max()) == 0
    assert load_split(tmp_path / "white", "dtd", "train800", **kw).decoded == 0  # a hit: one memory-map
    # an image rebuilt in place (same list file): that split decodes again, and sees the new pixels
    from PIL import Image
    img = tmp_path / "white" / "dtd" / "images" / "3.png"
    Image.new("RGB", (8, 8), (7, 7, 7)).save(img)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    again = load_split(tmp_path / "white", "dtd", "train800", **kw)
    assert again.decoded == 6 and int(again.images[3].max()) == 7
    # touching alone (no change of bytes) invalidates that split's entry too
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert load_split(tmp_path / "white", "dtd", "train800", **kw).decoded == 6


def test_another_root_with_the_same_lists_trains_on_its_own_pixels(tmp_path):
    """End to end: a black copy of the demo task is decoded again (it used to hit the other root's cache)."""
    from PIL import Image
    args = ["experiment=demo", "optim.epochs=1", "optim.warmup_epochs=0", "max_train_steps=1"]
    run(args, tmp_path)
    second = tmp_path / "second"  # its own outputs (the data root is not part of a run's identity), same cache
    import shutil
    shutil.copytree(tmp_path / "data", second / "data")
    for p in (second / "data" / "digits").rglob("*.png"):
        Image.new("L", (8, 8), 0).save(p)
    proc = run(args + [f"paths.cache_dir={tmp_path / 'cache'}"], second)
    rd = run_dir_of(second)
    res = json.loads((rd / "results.json").read_text())
    assert all(d["decoded"] > 0 for d in res["data"].values()), proc.stderr[-1000:]
    assert res["final_acc"] < 30  # a black task cannot be learned (the demo reaches > 75% in one epoch)


# -- preflight ------------------------------------------------------------------------------
def test_wrong_data_root_and_missing_weights_are_named_together(tmp_path):
    proc = run(["task=dtd", "method=lily_kvffn", "backbone=vit_tiny", f"paths.data_root={tmp_path}/nonexistent",
                f"backbone.checkpoint={tmp_path}/missing.safetensors"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 problems" in proc.stderr and "nonexistent" in proc.stderr and "missing.safetensors" in proc.stderr


@pytest.mark.parametrize("bad", ["batch_size=0", "optim.epochs=0", "optim.lr=-1", "optim.warmup_epochs=-2",
                                 "eval_batch_size=0", "method.ne=0", "method.rank=0", "optim.weight_decay=-1",
                                 "precision=fp16", "seed=-1"])
def test_each_bad_number_is_named(bad):
    from engine.preflight import preflight
    cfg = cfg_of("experiment=demo", bad)
    with pytest.raises(UserError) as e:
        preflight(cfg, data=False)
    assert bad.split("=")[0].split(".")[-1] in str(e.value), str(e.value)


def test_bad_number_exits_cleanly_through_the_entry_point(tmp_path):
    proc = run(["experiment=demo", "batch_size=0", "optim.lr=-1"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "batch_size=0" in proc.stderr and "optim.lr=-1" in proc.stderr


# -- recipes --------------------------------------------------------------------------------
def _lily_model(*overrides):
    from engine.setup import apply_method
    from models import build_backbone
    cfg = cfg_of("backbone=vit_b16_in21k", "backbone.pretrained=false", *overrides)
    torch.manual_seed(0)
    model, _ = build_backbone(cfg.backbone, 10)
    return apply_method(model, cfg), cfg


@pytest.mark.parametrize("ne,n_lps", [(2, 2), (4, 4), (6, 6), (8, 12)])
def test_authors_recipe_shares_each_lp_over_depth_over_ne_layers(ne, n_lps):
    with torch.device("meta"):
        model, _ = _lily_model("method=lily_kvffn", f"method.ne={ne}")
    for kind, adapters in lily.lily_adapters(model).items():
        lps = [a.lp for a in adapters]
        distinct = list(dict.fromkeys(id(lp) for lp in lps))
        assert len(distinct) == n_lps, kind
        stride = 12 // n_lps
        assert [distinct.index(id(lp)) for lp in lps] == [i // stride for i in range(12)], kind


def test_paper_recipe_one_lp_per_layer_and_router_normal_1():
    model, _ = _lily_model("method=lily_qv", "recipe=paper")
    for adapters in lily.lily_adapters(model).values():
        assert len({id(a.lp) for a in adapters}) == 12
        w = torch.cat([a.router.weight.flatten() for a in adapters])
        assert abs(w.mean().item() - 1.0) < 0.01 and abs(w.std().item() - 0.01) < 0.002


def test_authors_recipe_default_inits_and_decay_on_every_trainable_parameter():
    from engine.trainer import make_optimizer
    model, cfg = _lily_model("method=lily_kvffn")
    for adapters in lily.lily_adapters(model).values():
        w = adapters[0].router.weight
        bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default (kaiming-uniform a=sqrt(5)) init
        assert w.abs().max().item() <= bound and abs(w.mean().item()) < 0.1
    head = model.head
    bound = 1 / math.sqrt(head.in_features)
    assert head.weight.abs().max().item() <= bound and head.bias.abs().max().item() > 0  # not timm's zero bias
    assert head.weight.std().item() > 0.02  # not trunc_normal(0.02)
    optimizer, _ = make_optimizer(model, cfg)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.head.bias)] == pytest.approx(1e-4)
    assert all(decay[id(p)] == pytest.approx(1e-4) for p in model.parameters() if p.requires_grad)


def _released_rule(epoch, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup=10, total=100):
    """The lr epoch `epoch` trains at in the released code: scheduler.step(ep) after epoch ep."""
    def value(t):  # timm CosineLRScheduler(t_initial=100, warmup_t=10, warmup_prefix=False)
        if t < warmup:
            return warmup_lr + t * (lr - warmup_lr) / warmup
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))
    return warmup_lr if epoch == 0 else value(epoch - 1)


def test_learning_rate_of_every_epoch_follows_the_released_scheduler_stepping():
    from engine.trainer import make_optimizer, step_scheduler
    cfg = cfg_of("backbone=vit_tiny", "method=linear")
    with open_dict(cfg):
        cfg.optim.update(lr=1e-3, epochs=100, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5)
    model = torch.nn.Linear(3, 2)
    model.lily_config = None
    optimizer, scheduler = make_optimizer(model, cfg)
    lrs = []
    for epoch in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        step_scheduler(scheduler, epoch, lag=int(cfg.recipe.scheduler_lag))
    assert lrs[0] == lrs[1] == pytest.approx(1e-6)
    for e in range(100):
        assert lrs[e] == pytest.approx(_released_rule(e), rel=1e-9, abs=1e-15), e


# -- precision ------------------------------------------------------------------------------
def test_default_precision_is_fp32_and_bf16_swallows_a_small_adapter():
    assert cfg_of().precision == "fp32" and cfg_of("backbone=vim_s").precision == "fp32"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=128, depth=2, num_heads=4)
    lily.adapt(model, lily.MethodConfig(name="lily", targets=["v"], rank=8, ne=2, scale=0.01))
    for a in lily.lily_adapters(model)["v"]:  # a trained-looking adapter: HP experts of typical size
        torch.nn.init.normal_(a.bank.experts, std=0.02)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(4, 17, 128)
    fracs = {}
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", torch.bfloat16))):
        with torch.no_grad(), ctx:
            with_adapter = qkv(x)[..., 256:]
            qkv.merged = True  # AdaptedLinear skips its adapters when merged: the frozen output alone
            frozen = qkv(x)[..., 256:]
            qkv.merged = False
        fracs[name] = (with_adapter == frozen).float().mean().item()
    # measured on this CPU (torch 2.15): fp32 0.0% of v outputs unchanged by the adapter, bf16 78.6%
    assert fracs["fp32"] < 0.01 and fracs["bf16"] > 0.5, fracs


def test_a_configuration_running_elsewhere_is_refused_not_joined(tmp_path):
    from engine.run import RunLock
    args = ["experiment=demo", "optim.epochs=1", "optim.warmup_epochs=0", "max_train_steps=1"]
    rd = tmp_path / "out" / "runs" / relative_dir(cfg_of(*args), "lily_qvffn_tiny")
    with RunLock(rd):  # another process holds this run directory
        proc = run(args, tmp_path, check=False)
        assert proc.returncode == 2 and "in use by pid" in proc.stderr and "Traceback" not in proc.stderr
        assert not (rd / "results.json").exists()
        with pytest.raises(UserError):
            RunLock(rd).__enter__()
    run(args, tmp_path)  # released: the same command now runs
    assert json.loads((rd / "results.json").read_text())["status"] == "finished"


def test_a_methods_search_space_and_free_text_are_not_part_of_the_identity():
    """Editing a method config's search grid or description must not re-train its finished runs."""
    from engine.run import identity, run_id
    base = {"task": {"name": "dtd"}, "method": {"name": "lora", "rank": 8, "optim": {"lr": 1e-3}}}
    meta = {"task": {"name": "dtd"}, "method": {"name": "lora", "rank": 8, "optim": {"lr": 1e-3},
                                                "search": {"method.rank": [1, 8]}, "description": "x", "source": "y"}}
    assert run_id(identity(base)) == run_id(identity(meta))
    other = {"task": {"name": "dtd"}, "method": {"name": "lora", "rank": 8, "optim": {"lr": 1e-2}}}
    assert run_id(identity(other)) != run_id(identity(base))   # a recipe value is result-relevant
