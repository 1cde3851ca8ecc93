"""Slow: a short training run of every MambaPEFT method of tests/test_methods_vim_a.py (and a
composition) on scikit-learn's handwritten digits with a small random Vim: each learns, i.e.
its test accuracy ends clearly above the untrained model's (the frozen random head, ~10%)."""
import pytest
import torch
import torch.nn.functional as F

import lily
from tests.test_methods_vim_a import CONFIGS, COMPOSE_MERGEABLE, small_vim

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0           # (1797, 1, 8, 8)
    x = F.interpolate(x, size=32, mode="nearest").repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1000], perm[1000:]
    return x[tr], y[tr], x[te], y[te]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize("name", list(CONFIGS) + ["compose", "linear"])   # linear: the head alone, for reference
def test_method_learns_on_digits(name, digits):
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits
    model = small_vim()
    model.reset_classifier(10)
    before = accuracy(model, xte, yte)
    lily.adapt(model, {"compose": COMPOSE_MERGEABLE, "linear": {"name": "linear"}}.get(name) or CONFIGS[name])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        model.train()
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    after = accuracy(model, xte, yte)
    print(f"{name}: test accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.25 and after > 0.5, (before, after)
