"""The VTAB folder doctor, its manifest and --compare (issue 17 items 1-2; data/doctor.py,
data/manifest.py, scripts/check_vtab.py).

Copies under test: the demo task (data/digits.py: 800/200/1000/797 PNGs, registered sizes)
and a VTAB-format ``kitti`` task made here (4 classes, 800/200/1000/711 as VTAB-1K: the
smallest registered test split), as JPEGs of 8x8 random pixels, train800val200 holding byte
copies of train800 + val200 as in the NOAH format. Each broken copy is one clean copy with one
thing broken; the doctor must name it and exit with the right code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from data import manifest as mf
from data.digits import ensure_digits
from data.doctor import run_doctor
from scripts.check_vtab import main

REPO = Path(__file__).resolve().parents[1]
KITTI = {"train800": 800, "val200": 200, "test": 711}


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _make_kitti(root: Path) -> Path:
    tdir = root / "kitti"
    rng = np.random.default_rng(0)
    data = {}
    for split, n in KITTI.items():
        (tdir / "images" / split).mkdir(parents=True)
        data[split] = [(_jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), i % 4) for i in range(n)]
    data["train800val200"] = data["train800"] + data["val200"]
    (tdir / "images" / "train800val200").mkdir()
    for split, items in data.items():
        lines = []
        for i, (blob, label) in enumerate(items):
            rel = f"images/{split}/{i:06d}.jpg"
            (tdir / rel).write_bytes(blob)
            lines.append(f"{rel} {label}\n")
        (tdir / f"{split}.txt").write_text("".join(lines))
    return tdir


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Pristine copies, never modified: ``<base>/digits`` and ``<base>/kitti`` in one root each."""
    base = tmp_path_factory.mktemp("clean")
    ensure_digits(base / "d")
    _make_kitti(base / "k")
    return base


@pytest.fixture
def copy(clean, tmp_path):
    def make(which: str) -> Path:
        src = clean / which[0]
        shutil.copytree(src, tmp_path / which, copy_function=shutil.copy2)
        return tmp_path / which
    return make


def doctor(root, *args, capsys):
    rc = main([str(root), "--workers", "0", "--no-progress", *args])
    return rc, capsys.readouterr().out


def _set_line(tdir: Path, split: str, index: int, text: str | None) -> None:
    f = tdir / f"{split}.txt"
    lines = f.read_text().splitlines(keepends=True)
    if text is None:
        del lines[index]
    else:
        lines[index] = text + "\n"
    f.write_text("".join(lines))


# ------------------------------------------------------------------ clean copies

@pytest.mark.parametrize("which,row", ids=["digits", "kitti"], argvalues=[
    ("digits", r"digits\s+4/4\s+800/200/1000/797\s+10\s+10/10\s+2797/2797 ok\s+PNG\s+L\s+8x8\s+0/0\s+\w{12}\s+OK"),
    ("kitti", r"kitti\s+4/4\s+800/200/1000/711\s+4\s+4/4\s+2711/2711 ok\s+JPEG\s+RGB\s+8x8\s+0/0\s+\w{12}\s+OK"),
])
def test_clean_copy_passes_and_manifest_is_stable(copy, capsys, which, row):
    root = copy(which)
    tdir = root / which
    rc, out = doctor(root, capsys=capsys)
    assert rc == 0, out
    assert re.search(row, out), out
    assert "0 error(s), 0 warning(s)" in out
    man_file = tdir / mf.MANIFEST_NAME
    first = man_file.read_bytes()
    man = json.loads(first)
    # one sha256 per listed image, equal to hashlib's on the file's bytes
    rel = next(iter(man["images"]))
    assert man["images"][rel][2] == hashlib.sha256((tdir / rel).read_bytes()).hexdigest()
    n_unique = len({ln.split()[0] for s in ("train800", "val200", "train800val200", "test")
                    for ln in (tdir / f"{s}.txt").read_text().splitlines()})
    assert len(man["images"]) == n_unique
    assert man["digest"] in out or man["digest"][:12] in out
    rc2, out2 = doctor(root, capsys=capsys)
    assert rc2 == 0 and man_file.read_bytes() == first           # stable across runs
    assert mf.task_digest(tdir) == man["digest"]                  # read back from the manifest


# ------------------------------------------------------------------ broken copies: each named

def _wrong_size(tdir):
    _set_line(tdir, "val200", 5, None)


def _label_out_of_range(tdir):
    _set_line(tdir, "train800", 7, "images/train800/000007.jpg 4")


def _undecodable(tdir):
    p = tdir / "images" / "test" / "000003.jpg"
    p.write_bytes(p.read_bytes()[:60])


def _leak(tdir):
    shutil.copyfile(tdir / "images" / "train800" / "000010.jpg", tdir / "images" / "test" / "000020.jpg")


def _missing_list(tdir):
    (tdir / "val200.txt").unlink()


def _missing_image(tdir):
    (tdir / "images" / "train800val200" / "000999.jpg").unlink()


@pytest.mark.parametrize("break_it,needles", [
    (_wrong_size, ["val200.txt lists 199 images; kitti has 200 (VTAB-1K)", "800/199!/1000/711"]),
    (_label_out_of_range, ["1 label(s) outside [0, 4)", "train800.txt:8 label 4"]),
    (_undecodable, ["1 image(s) do not decode", "images/test/000003.jpg (test.txt:4: cannot decode"]),
    (_leak, ["train/test leakage: 1 test image(s) identical to training images",
             "images/test/000020.jpg (test.txt:21) = images/train800/000010.jpg (train800.txt:11; "]),
    (_missing_list, ["list file val200.txt is missing", "3/4"]),
    (_missing_image, ["1 listed image(s) missing: images/train800val200/000999.jpg (train800val200.txt:1000)"]),
])
def test_broken_vtab_copy_fails_naming_the_problem(copy, capsys, break_it, needles):
    root = copy("kitti")
    break_it(root / "kitti")
    rc, out = doctor(root, capsys=capsys)
    assert rc == 1, out
    assert re.search(r"^  error: kitti: ", out, re.M), out
    for needle in needles:
        assert needle in out, out
    assert "FAIL" in out and "1 failed" in out


def test_mixed_encoding_is_a_warning_not_an_error(copy, capsys):
    root = copy("kitti")
    tdir = root / "kitti"
    for i in (1, 2):  # two test images re-saved as PNG (lossless copies of the decoded JPEG)
        jpg = tdir / "images" / "test" / f"{i:06d}.jpg"
        Image.open(jpg).save(jpg.with_suffix(".png"))
        jpg.unlink()
        _set_line(tdir, "test", i, f"images/test/{i:06d}.png {i % 4}")
    rc, out = doctor(root, capsys=capsys)
    assert rc == 0, out
    assert "warning: kitti: mixed encodings in one task: 2709 JPEG, 2 PNG" in out
    assert "images/test/000001.png" in out and "JPEG:2709+PNG:2" in out
    assert "0 error(s), 1 warning(s)" in out and "WARN" in out


def test_demo_task_judged_against_its_registered_sizes(copy, capsys):
    root = copy("digits")
    tdir = root / "digits"
    _set_line(tdir, "test", 0, None)
    _set_line(tdir, "train800val200", 3, "images/train800val200/000003.png 10")
    rc, out = doctor(root, capsys=capsys)
    assert rc == 1
    assert "test.txt lists 796 images; digits has 797 (registered demo size)" in out
    assert "train800val200.txt:4 label 10" in out
    # a label is not content: train800val200 still holds the images of train800 + val200
    assert "train800val200 is not train800 + val200" not in out


def test_duplicates_within_and_between_training_splits_are_warnings(copy, capsys):
    root = copy("kitti")
    tdir = root / "kitti"
    img = tdir / "images"
    shutil.copyfile(img / "train800" / "000001.jpg", img / "train800" / "000002.jpg")
    shutil.copyfile(img / "train800" / "000005.jpg", img / "val200" / "000000.jpg")
    rc, out = doctor(root, capsys=capsys)
    assert rc == 0, out
    assert ("train800.txt holds 1 exact duplicate(s) by content: images/train800/000001.jpg (train800.txt:2)"
            " = images/train800/000002.jpg (train800.txt:3)") in out
    assert "val200 shares 1 image(s) with train800" in out
    assert "train800val200 is not train800 + val200 by content: 2 of its images are in neither" in out


def test_subprocess_with_a_worker_pool(copy):
    root = copy("kitti")
    _leak(root / "kitti")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_vtab.py"), str(root), "--workers", "1",
                        "--no-progress"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "train/test leakage" in r.stdout, r.stdout + r.stderr


def test_usage_errors_are_one_line_exit_2(copy, tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data root") and "does not exist" in err and err.count("\n") == 1
    root = copy("kitti")
    assert main([str(root), "--tasks", "cifar"]) == 2
    assert "task 'cifar' has no folder" in capsys.readouterr().err
    assert main([str(root), "--compare", str(tmp_path / "nope")]) == 2
    assert "--compare root" in capsys.readouterr().err


# ------------------------------------------------------------------ the digest and the manifest

def test_task_digest_changes_with_one_image_and_only_then(copy, tmp_path):
    tdir = copy("digits") / "digits"
    d0 = mf.task_digest(tdir)                          # computed (no manifest yet), nothing written
    assert not (tdir / mf.MANIFEST_NAME).exists()
    assert mf.task_digest(tdir, save=True) == d0       # computed again, same bytes -> same digest
    assert mf.read_manifest(tdir, fresh_only=True)[1] == tdir / mf.MANIFEST_NAME
    os.utime(tdir / "train800.txt")                    # touched, not changed: lists are hashed
    assert mf.task_digest(tdir) == d0
    img = tdir / "images" / "test" / "000005.png"
    px = np.asarray(Image.open(img)).copy()
    px[0, 0] ^= 1
    st = os.stat(img)
    Image.fromarray(px).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, whatever the clock tick
    assert not mf.is_fresh(tdir, json.loads((tdir / mf.MANIFEST_NAME).read_text()))
    d1 = mf.task_digest(tdir)
    assert d1 != d0
    (tdir / mf.MANIFEST_NAME).unlink()
    assert mf.task_digest(tdir) == d1                  # computed without a manifest: the same
    # the digest is the content's: a copy elsewhere has the same one
    other = tmp_path / "elsewhere" / "digits"
    shutil.copytree(tdir, other)
    assert mf.task_digest(other) == d1


def test_manifest_goes_elsewhere_when_the_task_folder_is_not_writable(copy, tmp_path, monkeypatch):
    tdir = copy("digits") / "digits"
    real = mf._atomic_write

    def refuse_task_folder(path, text):
        if path.parent == tdir:
            raise PermissionError(13, "Permission denied")
        real(path, text)

    monkeypatch.setattr(mf, "_atomic_write", refuse_task_folder)
    monkeypatch.setenv("LILY_CACHE", str(tmp_path / "cache"))
    res = run_doctor(tdir.parent, workers=0, progress=False)
    path = res.reports[0].manifest_path
    assert path.parent == tmp_path / "cache" / "manifests" and path.name.startswith("digits-")
    assert any(f"manifest written to {path}" in n for n in res.notes)
    assert not (tdir / mf.MANIFEST_NAME).exists()
    assert mf.read_manifest(tdir, fresh_only=True)[1] == path
    assert mf.task_digest(tdir) == res.reports[0].digest
    # a run writes to its cache only, never into the data root
    mdir = tmp_path / "run-cache"
    monkeypatch.setattr(mf, "_atomic_write", real)
    path.unlink()
    mf.task_digest(tdir, manifest_dir=mdir, save=True)
    assert not (tdir / mf.MANIFEST_NAME).exists() and len(list(mdir.iterdir())) == 1


def test_missing_list_file_is_a_user_error_for_task_digest(copy):
    tdir = copy("digits") / "digits"
    (tdir / "test.txt").unlink()
    with pytest.raises(UserError, match="test.txt"):
        mf.task_digest(tdir)


# ------------------------------------------------------------------ --compare

def _jpeg_build(src: Path, dst: Path) -> None:
    """The same task with every image re-encoded as JPEG (PIL default quality) under .jpg names."""
    for f in src.rglob("*.png"):
        out = dst / f.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).save(out, format="JPEG")
    for s in ("train800", "val200", "train800val200", "test"):
        (dst / f"{s}.txt").write_text((src / f"{s}.txt").read_text().replace(".png ", ".jpg "))


def _expected_mad(a: Path, b: Path, split: str) -> tuple[float, float]:
    tot = n = differ = count = 0
    for ln_a, ln_b in zip((a / f"{split}.txt").read_text().split("\n"), (b / f"{split}.txt").read_text().split("\n")):
        if not ln_a:
            continue
        x = np.asarray(Image.open(a / ln_a.split()[0]).convert("RGB"), dtype=float)
        y = np.asarray(Image.open(b / ln_b.split()[0]).convert("RGB"), dtype=float)
        tot, n = tot + np.abs(x - y).sum(), n + x.size
        differ, count = differ + bool((x != y).any()), count + 1
    return tot / n, differ / count


def test_compare_png_and_jpeg_builds_of_the_same_images(copy, tmp_path, capsys):
    png = copy("digits")
    jpg = tmp_path / "jpg"
    _jpeg_build(png / "digits", jpg / "digits")
    res = run_doctor(png, compare=jpg, workers=0, progress=False, write=False)
    by_split = {c.split: c for c in res.comparisons}
    assert set(by_split) == {"train800", "val200", "train800val200", "test"}
    for c in by_split.values():
        assert c.lists == "same (.png->.jpg)" and c.labels_differ == 0 and c.n_a == c.n_b
        assert c.differ > 0 and c.size_differ == c.unreadable == 0 and c.mad > 0
    mad, share = _expected_mad(png / "digits", jpg / "digits", "val200")
    assert by_split["val200"].mad == pytest.approx(mad, rel=1e-9)
    assert by_split["val200"].share_differ == pytest.approx(share)
    rc, out = doctor(png, "--compare", str(jpg), "--no-manifest", capsys=capsys)
    assert rc == 0  # differences between copies are reported, not errors of ROOT
    assert re.search(rf"digits\s+val200\s+200/200\s+same \(\.png->\.jpg\)\s+0\s+\d+/200 differ \({100 * share:.1f}%\)"
                     rf"\s+{mad:.3f}\s", out), out


def test_compare_identical_copies(copy, tmp_path, capsys):
    a = copy("kitti")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _set_line(b / "kitti", "test", 3, "images/test/000003.jpg 0")   # one label differs (was 3)
    rc, out = doctor(a, "--compare", str(b), capsys=capsys)
    assert rc == 0
    res = run_doctor(a, compare=b, workers=0, progress=False, write=False)
    for c in res.comparisons:
        assert c.lists == "same" and c.identical == c.compared == c.n_a and c.mad == 0 and c.max_abs == 0
        assert c.labels_differ == (1 if c.split == "test" else 0)
    assert re.search(r"kitti\s+train800\s+800/800\s+same\s+0\s+identical\s+0\.000\s+0\s", out), out
    assert re.search(r"kitti\s+test\s+711/711\s+same\s+1\s+identical", out), out


def test_known_size_variant_and_uncovered_classes_are_warnings(tmp_path):
    """Judged against the registry entry it is given: a test size listed as a known variant (as
    caltech101's 6085) warns, and classes the training images never show are named."""
    from data.doctor import check_task
    from data.registry import Task
    task = Task("tiny", 5, "demo", 4, test_size_alternatives=(5,),
                split_sizes={"train800": 3, "val200": 1, "train800val200": 4})
    tdir = tmp_path / "tiny"
    rng = np.random.default_rng(1)
    sizes, labels = {"train800": 3, "val200": 1, "train800val200": 4, "test": 5}, [0, 1, 3, 1]
    for split, n in sizes.items():
        (tdir / "images" / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.png"
            px = rng.integers(0, 256, (4, 6), dtype=np.uint8) if split != "train800val200" else \
                np.asarray(Image.open(tdir / ([f"images/train800/{j:06d}.png" for j in range(3)]
                                              + ["images/val200/000000.png"])[i]))
            Image.fromarray(px).save(tdir / rel)
            lines.append(f"{rel} {labels[i] if split != 'test' else i}\n")
        (tdir / f"{split}.txt").write_text("".join(lines))
    rep = check_task(task, tdir, progress=False, write=False)
    assert not rep.errors, rep.problems
    msgs = [p.message for p in rep.warnings]
    assert msgs == ["test.txt lists 5 images, a known variant of the reference 4.",
                    "the 4 training images (train800val200) cover 3 of 5 classes; never seen: 2, 4."]
    assert rep.row["train800/val200/trainval/test"] == "3/1/4/5~" and rep.row["train covers"] == "3/5"
    assert rep.row["size (WxH)"] == "6x4" and rep.status == "WARN"
