"""engine/step.py: the training epoch and evaluation give exactly what the straightforward
loop gives (same order, same seeds), resume mid-epoch exactly, and never read a value back
from the device inside the loop."""
import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import lily
from data import SplitData, batches, get_task, normalize
from engine import step
from common.errors import UserError

N, CLASSES, SIZE, BATCH = 44, 5, 16, 8  # 5 steps an epoch (drop_last), 4 images left over


def make_model(seed=0, routing="batch"):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                              num_classes=CLASSES, drop_path_rate=0.1)  # drop-path: randomness inside steps
    cfg = lily.MethodConfig(name="lily", targets=["k", "v", "ffn"], rank={"k": 4, "v": 4, "ffn": 8}, ne=2,
                            routing=routing)
    return lily.adapt(model, cfg)


def make_data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return SplitData(images, labels, get_task("digits"), "train800", True, 0, "")


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_params(a, b):
    pa, pb = trainable(a), trainable(b)
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def reference_epoch(model, optimizer, data, seed, epoch, normalization):
    """The straightforward loop (the trainer before engine/step.py): loss.item() every step."""
    model.train()
    total, seen = 0.0, 0
    for images, labels in batches(data, BATCH, shuffle=True, drop_last=True, seed=seed, epoch=epoch):
        loss = F.cross_entropy(model(normalize(images, normalization)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        seen += len(labels)
    return total, seen


def run_epoch(model, optimizer, data, epoch, normalization="imagenet", **kw):
    return step.train_epoch(model, optimizer, data, batch_size=BATCH, seed=42, epoch=epoch, device="cpu",
                            normalization=normalization, precision="fp32", **kw)


@pytest.mark.parametrize("normalization", ["imagenet", "none"])
def test_train_epoch_is_bit_identical_to_the_reference_loop(normalization):
    data = make_data()
    ref, ours = make_model(), make_model()
    opt_ref, opt_ours = make_optimizer(ref), make_optimizer(ours)
    for epoch in range(2):
        torch.manual_seed(100 + epoch)
        total, seen = reference_epoch(ref, opt_ref, data, 42, epoch, normalization)
        torch.manual_seed(100 + epoch)
        out = run_epoch(ours, opt_ours, data, epoch, normalization)
        assert out["loss_sum"] == total and out["images"] == seen == 5 * BATCH
        assert out["steps_done"] == 5 and out["next_step"] == 5 and out["completed"]
        assert out["loss"] == total / seen and out["seconds"] > 0 and out["images_per_s"] > 0
        assert_same_params(ref, ours)
    assert not all(torch.equal(a, b) for a, b in zip(trainable(ours).values(), trainable(make_model()).values()))


def test_resume_mid_epoch_reproduces_an_uninterrupted_epoch():
    data = make_data()
    whole = make_model()
    opt = make_optimizer(whole)
    torch.manual_seed(7)
    full = run_epoch(whole, opt, data, epoch=1)

    # the same epoch stopped after 3 steps (as a preemption handler would), checkpointed...
    first = make_model()
    opt_first = make_optimizer(first)
    torch.manual_seed(7)
    calls = []
    part = run_epoch(first, opt_first, data, epoch=1, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert part["steps_done"] == 3 and part["next_step"] == 3 and not part["completed"] and part["images"] == 3 * BATCH
    ckpt = {"params": trainable(first), "optimizer": copy.deepcopy(opt_first.state_dict()), "rng": torch.get_rng_state()}
    torch.manual_seed(12345)  # whatever happens in between

    # ...and resumed in a fresh process-like state from step 3
    resumed = make_model()  # the same frozen backbone (pretrained weights), trainables from the checkpoint
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            if n in ckpt["params"]:
                p.zero_().copy_(ckpt["params"][n])
    opt_resumed = make_optimizer(resumed)
    opt_resumed.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    rest = run_epoch(resumed, opt_resumed, data, epoch=1, start_step=part["next_step"])
    assert rest["steps_done"] == 2 and rest["next_step"] == 5 and rest["completed"]
    assert_same_params(whole, resumed)
    assert part["loss_sum"] + rest["loss_sum"] == pytest.approx(full["loss_sum"], rel=1e-12)


def test_max_steps_caps_the_epoch_and_should_stop_is_asked_before_each_step():
    data = make_data()
    model = make_model()
    out = run_epoch(model, make_optimizer(model), data, epoch=0, max_steps=2)
    assert out["steps_done"] == 2 and out["completed"] and out["images"] == 2 * BATCH
    out = run_epoch(model, make_optimizer(model), data, epoch=0, max_steps=2, start_step=1, should_stop=lambda: True)
    assert out["steps_done"] == 0 and out["next_step"] == 1 and not out["completed"] and out["images"] == 0
    asked = []
    out = run_epoch(model, make_optimizer(model), data, epoch=0, should_stop=lambda: asked.append(1) or False)
    assert out["steps_done"] == 5 and out["completed"] and len(asked) == 5  # once before each step
    out = run_epoch(model, make_optimizer(model), data, epoch=0, start_step=5)
    assert out["steps_done"] == 0 and out["completed"] and out["images"] == 0
    with pytest.raises(UserError, match="larger than"):
        step.train_epoch(model, make_optimizer(model), make_data(n=4), batch_size=BATCH, seed=0, epoch=0,
                         device="cpu", normalization="none", precision="fp32")


def test_bf16_epoch_runs_on_cpu():
    data = make_data()
    model = make_model()
    out = step.train_epoch(model, make_optimizer(model), data, batch_size=BATCH, seed=0, epoch=0, device="cpu",
                           normalization="none", precision="bf16", max_steps=2)
    assert out["steps_done"] == 2 and torch.isfinite(torch.tensor(out["loss"]))


@pytest.mark.parametrize("routing", ["batch", "sample"])
def test_evaluate_matches_a_simple_reference(routing):
    data = make_data(n=40)  # batches of 16, 16 and 8
    model = make_model(routing=routing)
    run_epoch(model, make_optimizer(model), make_data(seed=3), epoch=0)  # non-trivial experts and head
    model.eval()
    correct, experts = 0, {}
    with torch.no_grad():
        for images, labels in batches(data, 16, shuffle=False, drop_last=False, seed=0):
            correct += (model(normalize(images, "imagenet")).argmax(-1) == labels).sum().item()
            for kind, w in lily.expert_weights(model).items():
                experts[kind] = experts.get(kind, 0) + w * len(labels)
    model.train()
    ev = step.evaluate(model, data, batch_size=16, device="cpu", normalization="imagenet", precision="fp32")
    assert model.training  # mode restored
    assert ev["acc"] == 100.0 * correct / 40 and ev["images"] == 40 and ev["images_per_s"] > 0
    assert set(ev["experts"]) == {"k", "v", "ffn"} == set(experts)
    for kind, rows in ev["experts"].items():
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)
        assert torch.allclose(torch.tensor(rows), experts[kind] / 40)
        assert torch.allclose(torch.tensor(rows).sum(-1), torch.ones(2))


def test_evaluate_without_lily_has_no_experts():
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=CLASSES)
    lily.adapt(model, lily.MethodConfig(name="linear"))
    ev = step.evaluate(model, make_data(n=10), batch_size=4, device="cpu", normalization="none", precision="fp32")
    assert ev["experts"] == {} and ev["images"] == 10 and 0 <= ev["acc"] <= 100


# ---------------------------------------------------------------------------------------
# no read-back inside the loop
# ---------------------------------------------------------------------------------------
READ_BACKS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _count_read_backs(monkeypatch, events):
    """Record every read-back-like Tensor call with its caller's module, except torch.optim's
    (its step counters are host tensors by design: reading them never waits for a device)."""
    for name in READ_BACKS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith("torch.optim"):
                events.append((_name, caller))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_no_read_back_inside_the_training_loop(monkeypatch):
    data = make_data(n=10 * BATCH)
    model = make_model()
    opt = make_optimizer(model)
    events = []
    model.register_forward_pre_hook(lambda *_: events.append(("forward", "")))
    _count_read_backs(monkeypatch, events)
    for steps in (2, 6):
        events.clear()
        out = run_epoch(model, opt, data, epoch=0, max_steps=steps)
        forwards = [i for i, e in enumerate(events) if e[0] == "forward"]
        reads = [e for e in events if e[0] != "forward"]
        assert len(forwards) == out["steps_done"] == steps
        assert reads == [("item", "engine.step")], reads  # one, the loss sum
        assert events.index(reads[0]) > forwards[-1]  # after the loop


def test_evaluate_reads_back_once_besides_expert_weights(monkeypatch):
    model = make_model()
    events = []
    _count_read_backs(monkeypatch, events)
    seen = []
    for n in (16, 48):  # 2 and 6 batches
        events.clear()
        step.evaluate(model, make_data(n=n), batch_size=8, device="cpu", normalization="none", precision="fp32")
        seen.append(list(events))  # lily.expert_weights(cpu=False) reads nothing back per batch
    # the correct count once, then the expert averages once per kind, at the end
    assert seen[0] == seen[1] == [("item", "engine.step")] + [("cpu", "engine.step"), ("tolist", "engine.step")] * 3, seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_implicit_cuda_sync_per_step():
    device = torch.device("cuda")
    data = step.to_device(make_data(n=10 * BATCH), device, max_bytes=1 << 30)
    assert data.images.is_cuda
    model = make_model().to(device)
    opt = make_optimizer(model)
    counts = []
    for steps in (2, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step.train_epoch(model, opt, data, batch_size=BATCH, seed=0, epoch=0, device=device,
                                 normalization="imagenet", precision="fp32", max_steps=steps)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["imagenet", "inception", "none"])
def test_feeder_inputs_are_bit_identical_to_normalize(mode):
    data = make_data(n=12)
    feeder = step._Feeder(data, torch.device("cpu"), mode)
    idx = torch.tensor([5, 0, 11])
    x, y = feeder.index(idx)
    assert torch.equal(x, normalize(data.images[idx], mode)) and torch.equal(y, data.labels[idx])
    x, y = feeder.slice(2, 7)
    assert torch.equal(x, normalize(data.images[2:7], mode)) and torch.equal(y, data.labels[2:7])
    with pytest.raises(UserError, match="normalization"):
        step._Feeder(data, torch.device("cpu"), "bogus")


def test_to_device_moves_once_when_it_fits():
    data = make_data(n=12)
    assert step.to_device(data, "cpu", max_bytes=1 << 40) is data  # CPU: never a copy
    nbytes = data.images.nbytes + data.labels.nbytes
    assert step.to_device(data, "meta", max_bytes=nbytes - 1) is data  # too large: stays on the host
    moved = step.to_device(data, "meta", max_bytes=nbytes)
    assert isinstance(moved, SplitData) and moved.images.is_meta and moved.labels.is_meta
    assert moved.task is data.task and moved.split == data.split and not data.images.is_meta
    assert step.to_device(moved, "meta", max_bytes=0) is moved  # already there


def test_precision_and_backend():
    assert isinstance(step.precision_context("cpu", "bf16"), torch.autocast)
    with step.precision_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    for bad in ("fp16", "auto", "FP32"):
        with pytest.raises(UserError, match="precision"):
            step.precision_context("cpu", bad)
        with pytest.raises(UserError, match="precision"):
            step.configure_backend("cpu", bad)
    step.configure_backend("cpu", "fp32", tf32=True)  # nothing to set on a CPU
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:  # the flags are process-wide and can be set without a GPU; both flag APIs stay readable
        step.configure_backend("cuda", "fp32", tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        step.configure_backend("cuda", "fp32", tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    model = torch.nn.Linear(2, 2)
    assert step.maybe_compile(model, False) is model
