"""MambaPEFT's recipe (engine/recipes.py, configs/recipe/mambapeft.yaml; ../shared/spec/baselines-vim.md
section 1): mmengine's param-wise decay rules, LinearLR per iteration then CosineAnnealingLR per
epoch (checked against mmengine's own recursive update rules, written out here), grad clipping,
and the composed config."""
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from engine import recipes

ROOT = Path(__file__).resolve().parents[1]
O = OmegaConf.create({"lr": 1e-3, "weight_decay": 1e-4, "epochs": 100, "warmup_epochs": 10,
                      "warmup_start_factor": 1e-3, "min_lr": 1e-5, "grad_clip": 5.0, "no_decay_1d": True,
                      "decay_rules": "method", "betas": [0.9, 0.999], "eps": 1e-8})
KW = dict(base_lr=1e-3, epochs=100, warmup_epochs=10, warmup_start_factor=1e-3, min_lr=1e-5)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)                  # weight 2-D, bias 1-D
        self.norm = nn.LayerNorm(4)
        self.A_log = nn.Parameter(torch.zeros(4, 2))
        self.A_log_extra = nn.Parameter(torch.zeros(4, 2))
        self.delta = nn.Parameter(torch.zeros(4))    # a flat tensor
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_decay_rules_one_d_tensors_and_custom_keys_longest_first():
    m = Toy()
    rules = {"A_log": 10.0, "A_log_extra": 0.0, "delta": 100.0}
    wd = {n: recipes.decay_for(n, p, 1e-4, rules) for n, p in m.named_parameters()}
    assert wd["proj.weight"] == 1e-4
    assert wd["proj.bias"] == wd["norm.weight"] == wd["norm.bias"] == 0.0     # bias/norm/flat decay_mult 0
    assert wd["A_log"] == pytest.approx(1e-3)                                 # custom key: wd * 10
    assert wd["A_log_extra"] == 0.0                                           # the longer key wins
    assert wd["delta"] == pytest.approx(1e-2)                                 # custom key beats the 1-D rule
    groups = recipes.param_groups(m, 1e-4, rules)
    names = sorted(n for g in groups for n in g["names"])
    assert "frozen" not in names and len(names) == 7                          # trainable only
    assert {g["weight_decay"]: sorted(g["names"]) for g in groups}[0.0] == [
        "A_log_extra", "norm.bias", "norm.weight", "proj.bias"]
    opt = recipes.make_adamw(m, O)                                           # no method: base rules only
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-3
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]


def test_method_decay_mult_reads_the_registry():
    assert recipes.method_decay_mult("vim_additional_scan") == {"scan_addition.A_log": 0.0,
                                                                "scan_addition.A_b_log": 0.0}
    assert recipes.method_decay_mult("lora") == {}


def mmengine_lrs(iters_per_epoch, epochs=100, warmup=10, start=1e-3, base=1e-3, eta_min=1e-5):
    """The lr of every iteration by mmengine's recursive rules: LinearLR (iter-based, total_iters =
    end - begin - 1) multiplies by 1 + (1 - f) / (T f + (t - 1)(1 - f)); CosineAnnealingLR (per epoch,
    from epoch `warmup`) uses the chained form eta_min + (lr - eta_min)(1 + cos(pi k / T)) /
    (1 + cos(pi (k - 1) / T))."""
    T = warmup * iters_per_epoch - 1
    lr, out = base * start, []
    for e in range(epochs):
        for i in range(iters_per_epoch):
            t = e * iters_per_epoch + i
            if e < warmup and t > 0:
                lr = lr * (1 + (1 - start) / (T * start + (t - 1) * (1 - start)))
            if e >= warmup and i == 0 and e > warmup:
                k, Tc = e - warmup, epochs - warmup
                lr = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * k / Tc)) / (1 + math.cos(math.pi * (k - 1) / Tc))
            out.append(lr)
    return out


def test_lr_schedule_equals_mmengines_linear_then_cosine():
    ipe = 31
    ref = mmengine_lrs(ipe)
    ours = [recipes.lr_at(e, i, ipe, **KW) for e in range(100) for i in range(ipe)]
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours[0] == pytest.approx(1e-6)                       # 1e-3 * lr at the first iteration
    assert ours[10 * ipe - 1] == pytest.approx(1e-3)            # the factor reaches 1 at the last warm-up step
    assert ours[10 * ipe] == pytest.approx(1e-3)                # the cosine starts at lr (epoch 10)
    assert len(set(ours[50 * ipe:51 * ipe])) == 1               # per epoch after warm-up
    assert len(set(ours[3 * ipe:4 * ipe])) == ipe               # per iteration during warm-up
    assert ours[55 * ipe] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert ours[-1] > 1e-5 and ours[-1] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)) / 2)


def test_iteration_schedule_and_before_step_clip_gradients():
    m = nn.Linear(3, 3)
    opt = torch.optim.AdamW([{"params": [m.weight]}, {"params": [m.bias], "lr_scale": 0.5}], lr=1.0)
    sched = recipes.IterationSchedule(opt, O, iters_per_epoch=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6) and opt.param_groups[1]["lr"] == pytest.approx(5e-7)
    fn = recipes.before_step(m, sched, O, epoch=2, iters_per_epoch=4)
    m.weight.grad = torch.full((3, 3), 10.0)
    m.bias.grad = torch.full((3,), 10.0)
    fn(3)
    assert opt.param_groups[0]["lr"] == pytest.approx(recipes.lr_at(2, 3, 4, **KW))
    norm = torch.cat([m.weight.grad.flatten(), m.bias.grad]).norm()
    assert norm == pytest.approx(5.0, rel=1e-5)                  # clipped to max-norm 5
    state = sched.state_dict()
    sched.step(0)
    sched.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(recipes.lr_at(2, 3, 4, **KW))
    # a recipe without clipping and a timm schedule needs nothing
    assert recipes.before_step(m, object(), OmegaConf.create({"grad_clip": None}), 0, 4) is None


def test_recipe_config_composes_mambapeft_training():
    from hydra import compose, initialize_config_dir
    import common  # noqa: F401  (resolvers)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=mambapeft", "backbone=vim_s", "method=vim_affix", "task=cifar"])
        plain = compose("train", overrides=["backbone=vim_s", "method=vim_affix", "task=cifar"])
        over = compose("train", overrides=["recipe=mambapeft", "backbone=vim_s", "method=vim_affix", "task=cifar",
                                           "batch_size=16", "optim.lr=0.01", "protocol=search"])
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.grad_clip, o.warmup_epochs, o.warmup_start_factor, o.min_lr, o.epochs) == (
        1e-3, 1e-4, 5.0, 10, 1e-3, 1e-5, 100)
    assert o.lr_base_batch is None and o.decay_rules == "method" and o.no_decay_1d
    assert (cfg.batch_size, cfg.normalization, cfg.recipe.name) == (32, "imagenet", "mambapeft")
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.backbone.head_init == "zeros"
    assert cfg.backbone.num_classes_override is None
    # the project's defaults are untouched without the recipe; command-line overrides win with it
    assert (plain.batch_size, plain.normalization, plain.recipe.name) == (64, "none", "authors")
    assert (over.batch_size, over.optim.lr, over.protocol.name) == (16, 0.01, "search")


def test_zero_head_init():
    from models import init_head
    m = nn.Module()
    m.head = nn.Linear(4, 3)
    init_head(m, "zeros")
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0


def test_the_trainer_runs_the_recipe_per_iteration():
    """The epoch loop calls the recipe's hook after backward and before the optimiser step: the lr
    each step trains at is lr_at(epoch, iteration), and gradients are clipped to grad_clip."""
    from engine import step
    from engine.trainer import make_optimizer

    class Data:  # the SplitData shape engine.step reads (images, labels)
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.images = torch.randint(0, 255, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
            self.labels = torch.randint(0, 3, (n,), generator=g)

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    cfg = OmegaConf.create({"optim": dict(O, schedule="iteration_warmup_epoch_cosine", grad_clip=1e-3),
                            "method": {"name": "linear"}})
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=4)
    assert isinstance(scheduler, recipes.IterationSchedule)
    seen = []
    real_step = optimizer.step

    def spy(*a, **k):
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
        seen.append((optimizer.param_groups[0]["lr"], float(norm)))
        return real_step(*a, **k)
    optimizer.step = spy
    data = Data(16)
    for epoch in (0, 1):
        hook = recipes.before_step(model, scheduler, cfg.optim, epoch, 4)
        step.train_epoch(model, optimizer, data, batch_size=4, seed=0, epoch=epoch, device="cpu",
                         normalization="none", precision="fp32", before_step=hook)
    want = [recipes.lr_at(e, i, 4, **KW) for e in (0, 1) for i in range(4)]
    assert [lr for lr, _ in seen] == pytest.approx(want)
    assert want[0] == pytest.approx(1e-6) and want[4] > want[3]
    assert max(n for _, n in seen) <= 1e-3 * (1 + 1e-4)
