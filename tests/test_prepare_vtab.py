"""VTAB-1k from TFDS (data/vtab_tfds.py, scripts/prepare_vtab.py).

The label rules, the spec table, the manual-download check and the CLI's argument
handling run everywhere. The tests marked ``tfds`` need requirements-data.txt and build
every task from ``tensorflow_datasets.testing.mock_data`` (random offline data): they
check the folder format, counts, label ranges, manifests and resumability, not the real
images or labels.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import vtab_tfds as vt
from data.registry import SPLITS, VTAB_TASKS, get_task
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_vtab.py"
LIMIT = {"train800": 3, "val200": 2, "train800val200": 5, "test": 4}
MOCK_EXAMPLES = 6  # per split (mock_data ignores slices); above every cap in LIMIT


# --------------------------------------------------------------------------- label rules
def test_bin_index_value_on_threshold_falls_in_lower_bin():
    thr = (0.0, 1.0, 2.0)
    assert [vt.bin_index(v, thr) for v in (0.5, 1.0, 1.0001, 2.0, 7.0)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError):
        vt.bin_index(0.0, thr)          # nothing below: [TA] would return int64 min
    with pytest.raises(ValueError):
        vt.bin_index(float("nan"), thr)


@pytest.mark.parametrize("depth, label", [
    (0.5, 0), (8.0, 0), (8.0001, 1), (8.5, 1), (8.75, 2), (9.0, 2), (9.25, 3), (9.5, 3),
    (9.75, 4), (10.0, 4), (10.5, 5), (100.0, 5)])
def test_clevr_dist_bins(depth, label):
    assert vt.clevr_dist_label([depth, depth + 3.0]) == label


def test_clevr_dist_uses_the_closest_object_and_rejects_empty_scenes():
    assert vt.clevr_dist_label([12.0, 8.2, 9.9]) == 1
    with pytest.raises(ValueError, match="without objects"):
        vt.clevr_dist_label([])


def test_clevr_count():
    assert [vt.clevr_count_label(n) for n in (3, 4, 10)] == [0, 1, 7]


@pytest.mark.parametrize("types, depths, label", [
    ([0], [3.0], 0), ([0], [8.0], 0), ([1], [8.01], 1), ([2], [20.0], 1), ([0], [20.5], 2),
    ([0], [999.0], 2), ([0], [999.5], 3),
    ([], [], 3),                                      # no object at all
    ([3, 4, 5, 6, 7], [1.0, 2.0, 3.0, 4.0, 5.0], 3),  # pedestrians, cyclists, trams, misc: not vehicles
    ([5, 0], [2.0, 30.0], 2),                         # a closer non-vehicle is ignored
    ([0, 1, 2], [25.0, 7.0, 15.0], 0),                # closest vehicle wins
])
def test_kitti_closest_vehicle_distance(types, depths, label):
    assert vt.kitti_dist_label(np.array(types, dtype=np.int64), np.array(depths, dtype=np.float32)) == label


def test_dsprites_location_and_orientation_binning():
    assert [vt.dsprites_loc_label(x) for x in (0, 1, 2, 3, 30, 31)] == [0, 0, 1, 1, 15, 15]
    ori = [vt.dsprites_ori_label(o) for o in range(40)]
    assert ori[:10] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3] and ori[-1] == 15
    assert ori == [int(np.floor(np.float32(o) / np.float32(2.5))) for o in range(40)]  # [TA]'s float op
    assert [ori.count(c) for c in range(16)] == [3, 2] * 8


def test_image_transforms_tile_channels():
    binary = np.array([[[0], [1]], [[1], [0]]], dtype=np.uint8)
    out = vt.dsprites_image(binary)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}
    assert (out[..., 0] == binary[..., 0] * 255).all() and (out == out[..., :1]).all()
    with pytest.raises(ValueError, match="binary"):
        vt.dsprites_image(binary * 7)
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    assert (vt.smallnorb_image(gray) == np.repeat(gray, 3, axis=2)).all()
    with pytest.raises(ValueError, match="RGB"):
        vt.rgb_image(gray)


# --------------------------------------------------------------------------- spec table
def _slice(s: str) -> tuple[str, int | None, int | None]:
    m = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", s)
    assert m, s
    return m[1], int(m[2]) if m[2] else None, int(m[3]) if m[3] else None


def test_spec_table_covers_the_19_tasks_consistently():
    assert list(vt.SPECS) == list(VTAB_TASKS)
    for name, s in vt.SPECS.items():
        assert s.label in vt.LABEL_RULES and s.image in vt.IMAGE_RULES, name
        assert re.fullmatch(r"\d+\.\d+\.\d+", s.version), f"{name}: pin an exact version"
        assert s.train800 == "train[:800]"
        assert s.splits["train800val200"] == f"{s.train800}+{s.val200}"
        vsplit, a, b = _slice(s.val200)
        assert (b - (a or 0)) == 200, name
        if vsplit == "train":
            assert a >= 800, f"{name}: val200 overlaps train800"
            tsplit, t0, _ = _slice(s.test)
            assert tsplit != "train" or t0 >= a + 200, f"{name}: test overlaps val200"
        assert (s.manual is not None) == (name in ("resisc45", "diabetic_retinopathy")), name
    assert vt.SPECS["smallnorb_azi"].val200 == "test[:200]" and vt.SPECS["smallnorb_azi"].test == "test[12150:]"
    assert vt.SPECS["clevr_count"].test == "validation"  # TFDS clevr test has no scene annotations


# --------------------------------------------------------------------------- manual downloads
def test_missing_manual_download_message_says_what_and_where(tmp_path):
    spec = vt.SPECS["resisc45"]
    with pytest.raises(UserError) as e:
        vt.check_manual(spec, tmp_path / "manual")
    msg = str(e.value)
    assert "resisc45" in msg and "1drv.ms" in msg and "NWPU-RESISC45" in msg and "--manual-dir" in msg
    with pytest.raises(UserError, match="TFDS default"):
        vt.check_manual(spec, tmp_path, given=False)
    (tmp_path / "NWPU-RESISC45").mkdir()
    vt.check_manual(spec, tmp_path)  # complete: no error
    vt.check_manual(vt.SPECS["dtd"], tmp_path / "nowhere")  # not a manual task


def test_missing_manual_download_lists_missing_parts(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as e:
        vt.check_manual(vt.SPECS["diabetic_retinopathy"], tmp_path)
    msg = str(e.value)
    assert "kaggle.com" in msg and "missing in the manual dir: test, sample, trainLabels.csv" in msg


def test_default_manual_dir_follows_tfds(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert vt.default_manual_dir() == tmp_path / "downloads" / "manual"
    assert vt.default_manual_dir("/d") == Path("/d/downloads/manual")


# --------------------------------------------------------------------------- errors before any TF work
def test_build_task_refuses_bad_requests_and_foreign_folders(tmp_path):
    with pytest.raises(UserError, match="not a VTAB-1k task"):
        vt.build_task("digits", tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        vt.build_task("nosuchtask", tmp_path)
    with pytest.raises(UserError, match="image format"):
        vt.build_task("dtd", tmp_path, image_format="webp")
    with pytest.raises(UserError, match="limit"):
        vt.normalize_limit({"train": 3})
    assert vt.normalize_limit(2) == dict.fromkeys(SPLITS, 2)
    (tmp_path / "dtd").mkdir()  # e.g. the downloaded archive: never overwritten
    with pytest.raises(UserError, match="no manifest.json"):
        vt.build_task("dtd", tmp_path)
    (tmp_path / "dtd" / "manifest.json").write_text(json.dumps({"image_format": "png", "limit": None}))
    with pytest.raises(UserError, match="already built"):
        vt.build_task("dtd", tmp_path, image_format="jpg")
    assert vt.build_task("dtd", tmp_path, image_format="png") == "skipped"


def test_missing_tensorflow_datasets_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(UserError, match="requirements-data.txt"):
        vt.build_task("dtd", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_from_any_cwd_and_rejects_unknown_tasks(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "out"), "--tasks", "nosuchtask"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown task 'nosuchtask'" in r.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- with TFDS mock data
@contextlib.contextmanager
def mocked_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking
    with pytest.MonkeyPatch.context() as mp:
        # Fixed length 10 for every unknown dimension (image sides, object lists), so a CLEVR
        # scene has 10 objects (label 7 of 8) instead of a random 5-49.
        mp.setattr(mocking.RandomFakeGenerator, "__init__", functools.partialmethod(
            mocking.RandomFakeGenerator.__init__, constant_dynamic_shape=True))
        # max_value=2: integer tensors (images) are 0/1, as dSprites' binary images are.
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, max_value=2,
                                    policy=tfds.testing.MockPolicy.USE_CODE):
            yield


def _manual_dir(path: Path) -> Path:
    """A stand-in manual dir with the layout check_manual expects (mock data reads nothing)."""
    for spec in (vt.SPECS["resisc45"], vt.SPECS["diabetic_retinopathy"]):
        for p in spec.manual.required:
            (path / p).parent.mkdir(parents=True, exist_ok=True)
            (path / p).touch() if "." in p else (path / p).mkdir(exist_ok=True)
    return path


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def mock_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    manual = _manual_dir(tmp_path_factory.mktemp("manual"))
    with mocked_tfds():
        results = vt.build_all(root, manual_dir=manual, limit=LIMIT, progress=False)
    return root, results, manual


@pytest.mark.tfds
def test_mock_build_writes_the_folder_format_for_all_19_tasks(mock_build):
    root, results, _ = mock_build
    assert results == dict.fromkeys(VTAB_TASKS, "built")
    assert sorted(p.name for p in root.iterdir()) == sorted(VTAB_TASKS)  # no .partial left
    for name in VTAB_TASKS:
        task, spec, tdir = get_task(name), vt.SPECS[name], root / name
        manifest = json.loads((tdir / "manifest.json").read_text())
        assert manifest["tfds_name"] == spec.tfds and manifest["tfds_version"] == spec.version
        assert manifest["splits"] == spec.splits and manifest["counts"] == LIMIT
        assert manifest["label_rule"]["name"] == spec.label and manifest["image_format"] == "jpg"
        for split in SPLITS:
            lines = (tdir / f"{split}.txt").read_text().splitlines()
            assert len(lines) == LIMIT[split], (name, split)
            for i, line in enumerate(lines):
                path, label = line.split(" ")
                assert path == f"images/{split}/{i:06d}.jpg"
                assert 0 <= int(label) < task.num_classes, (name, line)
                with Image.open(tdir / path) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
    assert {l.split()[1] for l in (root / "clevr_count" / "test.txt").read_text().splitlines()} == {"7"}


@pytest.mark.tfds
def test_mock_build_images_load_with_the_folder_loader(mock_build, tmp_path):
    try:
        from data.folder import load_split
    except ImportError:
        pytest.skip("data/folder.py (the folder-format loader) is not available")
    root = mock_build[0]
    for name in VTAB_TASKS:
        data = load_split(root, name, "train800val200", image_size=8, cache_dir=tmp_path, progress=False)
        labels = [int(l.split()[1]) for l in (root / name / "train800val200.txt").read_text().splitlines()]
        assert tuple(data.images.shape) == (LIMIT["train800val200"], 3, 8, 8)
        assert data.labels.tolist() == labels


@pytest.mark.tfds
def test_mock_second_run_does_no_work(mock_build):
    root, _, manual = mock_build
    before = _snapshot(root)
    with mocked_tfds():
        again = vt.build_all(root, manual_dir=manual, limit=LIMIT, progress=False)
    assert again == dict.fromkeys(VTAB_TASKS, "skipped")
    assert _snapshot(root) == before


@pytest.mark.tfds
def test_mock_cli_png_channel_handling_and_skip(tmp_path, capsys):
    from scripts.prepare_vtab import main
    argv = ["--root", str(tmp_path), "--tasks", "dsprites_ori", "smallnorb_ele", "--format", "png",
            "--limit", "2"]
    with mocked_tfds():
        assert main(argv) == 0
        assert main(argv) == 0
    assert "0 built, 2 skipped" in capsys.readouterr().out
    for name in ("dsprites_ori", "smallnorb_ele"):
        assert json.loads((tmp_path / name / "manifest.json").read_text())["counts"] == dict.fromkeys(SPLITS, 2)
        for line in (tmp_path / name / "test.txt").read_text().splitlines():
            assert line.split()[0].endswith(".png")
            img = np.asarray(Image.open(tmp_path / name / line.split()[0]))
            assert img.ndim == 3 and img.shape[2] == 3 and (img == img[..., :1]).all()
            assert img.shape[:2] == ((64, 64) if name.startswith("dsprites") else (96, 96))
            if name.startswith("dsprites"):
                assert set(np.unique(img)) <= {0, 255} and img.max() == 255


@pytest.mark.tfds
def test_mock_missing_manual_download_fails_only_that_task(tmp_path, capsys):
    from scripts.prepare_vtab import main
    argv = ["--root", str(tmp_path / "out"), "--tasks", "resisc45", "dtd", "--limit", "2",
            "--manual-dir", str(tmp_path / "empty"), "--no-progress"]
    with mocked_tfds():
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "resisc45" in err and "NWPU-RESISC45" in err and "--manual-dir" in err
    assert (tmp_path / "out" / "dtd" / "manifest.json").is_file()
    assert not (tmp_path / "out" / "resisc45").exists()


@pytest.mark.tfds
def test_mock_interrupted_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    leftover = tmp_path / ".dtd.partial" / "images" / "train800"
    leftover.mkdir(parents=True)  # as after a killed run
    (leftover / "000000.jpg").write_bytes(b"junk")
    real = vt._write_split

    def interrupt_at_test(*args, **kwargs):
        if args[3] == "test":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vt, "_write_split", interrupt_at_test)
    with mocked_tfds(), pytest.raises(KeyboardInterrupt):
        vt.build_task("dtd", tmp_path, limit=2, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a task folder nor the partial one
    monkeypatch.setattr(vt, "_write_split", real)
    (tmp_path / ".dtd.partial").mkdir()  # a leftover is replaced, not reused
    (tmp_path / ".dtd.partial" / "junk").touch()
    with mocked_tfds():
        assert vt.build_task("dtd", tmp_path, limit=2, progress=False) == "built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dtd"]
    assert not (tmp_path / "dtd" / "junk").exists()


@pytest.mark.tfds
def test_specs_match_the_tfds_builders_offline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    for name, spec in vt.SPECS.items():
        builder = tfds.builder(f"{spec.tfds}:{spec.version}", data_dir=tmp_path)  # from code, no data
        feats = builder.info.features
        assert str(builder.version) == spec.version
        assert feats["image"].shape[-1] == (1 if spec.image != "rgb" else 3), name
        rule = vt.LABEL_RULES[spec.label]
        for key, sub in rule.features.items():
            assert key in feats, (name, key)
            if isinstance(sub, dict):
                assert set(sub) <= set(feats[key].feature), (name, sub)
        if rule.source:
            assert feats[rule.source].num_classes == (rule.source_classes or get_task(name).num_classes), name
    kitti = tfds.builder("kitti:3.2.0", data_dir=tmp_path).info.features["objects"]["type"]
    assert kitti.names[:vt.KITTI_VEHICLE_TYPES] == ["Car", "Van", "Truck"]
