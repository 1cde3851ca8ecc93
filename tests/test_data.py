"""Data layer: folder loader + decode-once cache, errors, normalize, batches, digits demo."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data import SPLITS, SplitData, batches, ensure_digits, get_task, load_split, normalize
from common.errors import UserError

S = 8  # decode size used throughout: tiny and fast


def make_task(root, name="digits", n=6, split="train800", labels=None, seed=0):
    """A folder-format task with n random RGB images of varied sizes in one split."""
    tdir = root / name
    (tdir / "images" / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = list(range(n)) if labels is None else labels
    lines = []
    for i, label in enumerate(labels):
        rel = f"images/{split}/{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)).save(tdir / rel)
        lines.append(f"{rel} {label}\n")
    (tdir / f"{split}.txt").write_text("".join(lines))
    return tdir


def load(root, cache, task="digits", split="train800", **kw):
    return load_split(root, task, split, S, cache, progress=False, **kw)


def test_decode_once_and_changed_list_invalidates(tmp_path):
    tdir = make_task(tmp_path / "root")
    first = load(tmp_path / "root", tmp_path / "cache")
    assert (first.cache_hit, first.decoded) == (False, 6)
    assert first.images.dtype == torch.uint8 and first.images.shape == (6, 3, S, S)
    assert first.labels.dtype == torch.int64 and first.labels.tolist() == list(range(6))
    # Pixels are a direct RGB resize with bicubic, stored CHW.
    with Image.open(tdir / "images/train800/000003.png") as im:
        ref = np.asarray(im.convert("RGB").resize((S, S), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(first.images[3].numpy(), ref)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # memory-mapping must not warn
        second = load(tmp_path / "root", tmp_path / "cache")
    assert (second.cache_hit, second.decoded, second.cache_path) == (True, 0, first.cache_path)
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)

    second.images[0] += 1  # copy-on-write: the cache file is never modified
    assert torch.equal(load(tmp_path / "root", tmp_path / "cache").images, first.images)

    lines = (tdir / "train800.txt").read_text().splitlines(keepends=True)
    (tdir / "train800.txt").write_text("".join(lines[:-1]))
    third = load(tmp_path / "root", tmp_path / "cache")
    assert (third.cache_hit, third.decoded, len(third.labels)) == (False, 5, 5)
    assert third.cache_path != first.cache_path
    assert torch.equal(third.images, first.images[:5])


def test_threads_same_result_and_interpolation_in_key(tmp_path):
    make_task(tmp_path / "root", n=9)
    serial = load(tmp_path / "root", tmp_path / "c0")
    threaded = load(tmp_path / "root", tmp_path / "c1", num_workers=2)
    assert torch.equal(serial.images, threaded.images)
    bilinear = load(tmp_path / "root", tmp_path / "c0", interpolation="bilinear")
    assert bilinear.decoded == 9 and bilinear.cache_path != serial.cache_path


def test_alias_resolves_and_size_mismatch_only_warns(tmp_path, caplog):
    make_task(tmp_path / "root", name="cifar", split="val200", labels=[0, 99, 5])
    with caplog.at_level(logging.WARNING):
        sd = load(tmp_path / "root", tmp_path / "cache", task="cifar100", split="val200")
    assert sd.task.name == "cifar" and sd.task.num_classes == 100 and len(sd) == 3
    assert "expected 200" in caplog.text
    assert get_task("oxford_pet").name == "oxford_iiit_pet"


def _missing_root(root):
    return root.parent / "nowhere"


def _no_task(root):
    return root, "dtd"


def _write_list(text):
    def edit(root):
        (root / "digits" / "train800.txt").write_text(text)
    return edit


def _corrupt_image(root):
    (root / "digits" / "images/train800/000002.png").write_bytes(b"not a png")


def _missing_image(root):
    (root / "digits" / "images/train800/000004.png").unlink()


@pytest.mark.parametrize("break_it, split, needles", [
    (_missing_root, "train800", ["nowhere", "paths.data_root=", "VTAB_ROOT", "prepare_vtab.py"]),
    (_no_task, "train800", ["dtd", "not found", "prepare_vtab.py"]),
    (None, "test", ["test.txt", "not found"]),
    (_write_list("images/train800/000000.png 1\nimages/train800/000001.png\n"), "train800",
     ["train800.txt:2", "malformed"]),
    (_write_list("images/train800/000000.png one\n"), "train800", ["train800.txt:1", "malformed"]),
    (_write_list("a.png 1\n\nb.png 10\n"), "train800", ["train800.txt:3", "label 10", "[0, 10)"]),
    (_write_list("a.png -1\n"), "train800", ["train800.txt:1", "label -1"]),
    (_write_list(""), "train800", ["train800.txt", "empty"]),
    (_missing_image, "train800", ["000004.png", "train800.txt:5", "missing"]),
    (_corrupt_image, "train800", ["000002.png", "train800.txt:3", "cannot read"]),
])
def test_user_errors_name_the_culprit(tmp_path, break_it, split, needles):
    root = tmp_path / "root"
    make_task(root)
    task = "digits"
    if break_it is not None:
        out = break_it(root)
        if isinstance(out, tuple):
            root, task = out
        elif out is not None:
            root = out
    with pytest.raises(UserError) as err:
        load(root, tmp_path / "cache", task=task, split=split)
    for needle in needles:
        assert needle in str(err.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*")), "no partial cache"


@pytest.mark.parametrize("kw", [dict(split="train"), dict(interpolation="cubic"), dict(task="nope")])
def test_bad_arguments_are_user_errors(tmp_path, kw):
    make_task(tmp_path / "root")
    with pytest.raises(UserError):
        load(tmp_path / "root", tmp_path / "cache", **kw)


def test_normalize_modes():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    v = 200
    x = torch.full((2, 3, 4, 4), v, dtype=torch.uint8)
    for mode, mean, std in [("imagenet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                            ("inception", (0.5,) * 3, (0.5,) * 3), ("none", (0.0,) * 3, (1.0,) * 3)]:
        y = normalize(x, mode)
        assert y.dtype == torch.float32 and y.shape == x.shape
        want = torch.tensor([(v / 255 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
        assert torch.allclose(y, want.expand_as(y), atol=1e-6)
        assert torch.allclose(normalize(x[0], mode), y[0])  # single CHW image too
    assert normalize(torch.tensor([[[0]], [[255]], [[0]]], dtype=torch.uint8), "none").tolist() == \
        [[[0.0]], [[1.0]], [[0.0]]]
    with pytest.raises(UserError, match="unknown normalization"):
        normalize(x, "imagenet21k")


def _fake_split(n):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return SplitData(images, torch.arange(n), get_task("digits"), "train800", True, 0, "")


def test_batches_deterministic_and_sized():
    data = _fake_split(10)
    order = lambda **kw: torch.cat([y for _, y in batches(data, 3, **kw)]).tolist()  # noqa: E731
    a = order(shuffle=True, drop_last=False, seed=1, epoch=0)
    assert a == order(shuffle=True, drop_last=False, seed=1, epoch=0)
    assert sorted(a) == list(range(10)) and a != list(range(10))
    assert a != order(shuffle=True, drop_last=False, seed=1, epoch=1)
    assert a != order(shuffle=True, drop_last=False, seed=2, epoch=0)
    assert order(shuffle=False, drop_last=False, seed=1) == list(range(10))
    for drop_last, n_batches in [(True, 3), (False, 4)]:
        b = batches(data, 3, shuffle=True, drop_last=drop_last, seed=0, progress_desc="x")
        got = list(b)
        assert len(b) == len(got) == n_batches
        assert all(len(y) == 3 for _, y in got[:3])
    x, y = next(iter(batches(data, 4, shuffle=True, drop_last=False, seed=3)))
    assert x.dtype == torch.uint8 and torch.equal(x[:, 0, 0, 0].long(), y)  # images follow labels


def test_ensure_digits_counts_labels_and_idempotent(tmp_path):
    tdir = ensure_digits(tmp_path / "root")
    assert tdir == tmp_path / "root" / "digits"
    lists = {s: (tdir / f"{s}.txt").read_text().splitlines() for s in SPLITS}
    assert {s: len(v) for s, v in lists.items()} == {
        "train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    labels = {s: [int(line.split()[1]) for line in v] for s, v in lists.items()}
    assert all(0 <= lab <= 9 for v in labels.values() for lab in v)
    assert set(labels["test"]) == set(range(10))
    assert labels["train800val200"] == labels["train800"] + labels["val200"]
    assert lists["train800val200"][0] == "images/train800val200/000000.png " + str(labels["train800"][0])
    with Image.open(tdir / "images/test/000796.png") as im:
        assert im.size == (8, 8) and im.mode == "L"

    stamp = (tdir / "test.txt").stat().st_mtime_ns
    assert ensure_digits(tmp_path / "root") == tdir
    assert (tdir / "test.txt").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["digits"]  # no temp leftovers

    sd = load_split(tmp_path / "root", "digits", "test", S, tmp_path / "cache", progress=False)
    assert sd.images.shape == (797, 3, S, S) and sd.labels.tolist() == labels["test"]
