"""Build VTAB-1k in the folder format from TensorFlow Datasets (facts: vtab.md sections 1, 3, 6b).

One table row per task (``SPECS``): TFDS builder and pinned version, the three split
slices, the label rule and the image transform. The label rules are pure functions of
numpy values, testable without TensorFlow. ``build_task`` writes
``<root>/<task>/{train800,val200,train800val200,test}.txt`` and ``images/<split>/<idx:06d>.jpg``
into ``<root>/.<task>.partial`` and renames it into place only when complete; a task whose
``manifest.json`` exists is skipped. TensorFlow is imported only when a task is built.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.registry import SPLITS, VTAB_TASKS, get_task
from common.errors import UserError

MANIFEST = "manifest.json"
FORMATS = ("jpg", "png")

# --------------------------------------------------------------------------- label rules
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DEPTH = 1000.0   # [TA] appends this depth, so "no vehicle" is the last bin
KITTI_VEHICLE_TYPES = 3           # TFDS kitti object types 0, 1, 2 = Car, Van, Truck


def bin_index(value: float, thresholds) -> int:
    """Largest ``i`` with ``thresholds[i] < value`` ([TA]: ``reduce_max(where(thr - v < 0))``).

    A value exactly on a threshold therefore falls in the lower bin.
    """
    below = [i for i, t in enumerate(thresholds) if t < value]
    if not below:
        raise ValueError(f"value {value} is not above the lowest threshold {thresholds[0]}")
    return below[-1]


def clevr_count_label(num_objects: int) -> int:
    """CLEVR scenes hold 3-10 objects -> classes 0-7."""
    return int(num_objects) - 3


def clevr_dist_label(depths) -> int:
    """Depth (``pixel_coords[:, 2]``) of the closest object, binned."""
    depths = np.asarray(depths, dtype=np.float64).reshape(-1)
    if depths.size == 0:
        raise ValueError("CLEVR scene without objects (the TFDS 'test' split has no annotations)")
    return bin_index(float(depths.min()), CLEVR_DIST_THRESHOLDS)


def kitti_dist_label(types, depths) -> int:
    """Depth (``location[:, 2]``) of the closest vehicle (type < 3), binned; no vehicle -> 3."""
    types, depths = np.asarray(types).reshape(-1), np.asarray(depths, dtype=np.float64).reshape(-1)
    vehicle = depths[types < KITTI_VEHICLE_TYPES]
    return bin_index(float(min([*vehicle.tolist(), KITTI_NO_VEHICLE_DEPTH])), KITTI_DIST_THRESHOLDS)


def coarse_label(value: int, num_original: int, num_classes: int) -> int:
    """[TA] dSprites grouping: ``floor(value / (num_original / num_classes))``, exact in integers."""
    return int(value) * num_classes // num_original


def dsprites_loc_label(x: int) -> int:
    return coarse_label(x, 32, 16)       # x // 2


def dsprites_ori_label(orientation: int) -> int:
    return coarse_label(orientation, 40, 16)   # floor(o / 2.5): {0,1,2}->0, {3,4}->1, {5,6,7}->2, ...


@dataclass(frozen=True)
class LabelRule:
    features: dict                   # features to decode besides `image` (tfds PartialDecoding)
    fn: Callable[[dict], int]        # numpy example -> label
    doc: str
    source: str | None = None        # ClassLabel feature read, checked against the builder
    source_classes: int | None = None  # its expected class count (None: the task's count)


def _feature_rule(feature: str) -> LabelRule:
    return LabelRule({feature: True}, lambda ex: int(ex[feature]), f"TFDS `{feature}` unchanged", feature)


def _objects(ex: dict, key: str) -> np.ndarray:
    return np.asarray(ex["objects"][key])


LABEL_RULES: dict[str, LabelRule] = {
    "label": _feature_rule("label"),
    "smallnorb_azi": _feature_rule("label_azimuth"),
    "smallnorb_ele": _feature_rule("label_elevation"),
    "clevr_count": LabelRule(
        {"objects": {"size": True}}, lambda ex: clevr_count_label(len(_objects(ex, "size"))),
        "number of objects (len(objects/size)) - 3"),
    "clevr_dist": LabelRule(
        {"objects": {"pixel_coords": True}},
        lambda ex: clevr_dist_label(_objects(ex, "pixel_coords").reshape(-1, 3)[:, 2]),
        f"min(objects/pixel_coords[:, 2]) binned by thresholds {list(CLEVR_DIST_THRESHOLDS)} "
        "(largest i with thr[i] < d)"),
    "kitti_dist": LabelRule(
        {"objects": {"type": True, "location": True}},
        lambda ex: kitti_dist_label(_objects(ex, "type"), _objects(ex, "location").reshape(-1, 3)[:, 2]),
        f"min(objects/location[:, 2]) over vehicles (type < 3: Car, Van, Truck), "
        f"{KITTI_NO_VEHICLE_DEPTH:g} if none, binned by thresholds {list(KITTI_DIST_THRESHOLDS)}"),
    "dsprites_loc": LabelRule(
        {"label_x_position": True}, lambda ex: dsprites_loc_label(ex["label_x_position"]),
        "label_x_position // 2 (32 -> 16 classes)", "label_x_position", 32),
    "dsprites_ori": LabelRule(
        {"label_orientation": True}, lambda ex: dsprites_ori_label(ex["label_orientation"]),
        "floor(label_orientation / 2.5) (40 -> 16 classes)", "label_orientation", 40),
}


# --------------------------------------------------------------------------- image transforms
def rgb_image(img: np.ndarray) -> np.ndarray:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    return img


def dsprites_image(img: np.ndarray) -> np.ndarray:
    if img.max(initial=0) > 1:
        raise ValueError(f"dSprites images are binary (0/1), got values up to {img.max()}")
    return np.repeat(img.astype(np.uint8), 3, axis=2) * np.uint8(255)


def smallnorb_image(img: np.ndarray) -> np.ndarray:
    return np.repeat(img, 3, axis=2)


IMAGE_RULES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "rgb": (rgb_image, "decoded TFDS `image` as is"),
    "dsprites": (dsprites_image, "64x64x1 binary `image` tiled to 3 channels, x255"),
    "smallnorb": (smallnorb_image, "`image` (first camera; `image2` ignored) tiled to 3 channels"),
}


# --------------------------------------------------------------------------- manual downloads
@dataclass(frozen=True)
class Manual:
    what: str                     # what to download, from where
    layout: str                   # how to unpack it inside the manual dir
    required: tuple[str, ...]     # paths that must exist inside the manual dir


RESISC45_MANUAL = Manual(
    "NWPU-RESISC45.rar from the OneDrive link in the TFDS catalog "
    "(https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs, see "
    "https://www.tensorflow.org/datasets/catalog/resisc45)",
    "extract it so that <manual-dir>/NWPU-RESISC45/<class>/*.jpg exists",
    ("NWPU-RESISC45",))
DIABETIC_MANUAL = Manual(
    "train.zip (all 5 parts, train.zip.001-005), test.zip (all parts), sample.zip and "
    "trainLabels.csv.zip from Kaggle "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data; needs a Kaggle account)",
    "unpack them into <manual-dir>/train/, <manual-dir>/test/, <manual-dir>/sample/ and "
    "<manual-dir>/trainLabels.csv (the test labels are downloaded automatically)",
    ("train", "test", "sample", "trainLabels.csv"))


# --------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class TaskSpec:
    task: str          # folder name (data/registry.py)
    tfds: str          # builder name[/config]
    version: str       # pinned TFDS dataset version
    train800: str      # TFDS split slices (vtab.md section 1.2)
    val200: str
    test: str
    label: str = "label"   # key of LABEL_RULES
    image: str = "rgb"     # key of IMAGE_RULES
    manual: Manual | None = None
    note: str = ""

    @property
    def splits(self) -> dict[str, str]:
        # train800val200 is read as one TFDS split, exactly as NOAH's get_vtab1k.py does.
        return {"train800": self.train800, "val200": self.val200,
                "train800val200": f"{self.train800}+{self.val200}", "test": self.test}


def _spec(task, tfds, version, val200, test="test", **kw) -> TaskSpec:
    return TaskSpec(task, tfds, version, "train[:800]", val200, test, **kw)


_NEWER = "VPT's VTAB_SETUP.md used {0}; TFDS 4.9 can only generate {1} ({2}). Same split sizes; " \
         "same example order expected but not verified."
SPECS: dict[str, TaskSpec] = {s.task: s for s in [
    _spec("cifar", "cifar100", "3.0.2", "train[45000:45200]"),
    _spec("caltech101", "caltech101", "3.0.2", "train[2754:2954]",
          note=_NEWER.format("3.0.1", "3.0.2", "download-URL update only")),
    _spec("dtd", "dtd", "3.0.1", "validation[:200]"),
    _spec("oxford_flowers102", "oxford_flowers102", "2.1.1", "validation[:200]"),
    _spec("oxford_iiit_pet", "oxford_iiit_pet", "4.0.0", "train[2944:3144]",
          note=_NEWER.format("3.2.0", "4.0.0", "adds head boxes, re-encodes a few corrupt JPEGs")),
    _spec("svhn", "svhn_cropped", "3.1.0", "train[65931:66131]",
          note=_NEWER.format("3.0.0", "3.1.0", "adds an `id` feature; same example keys")),
    _spec("sun397", "sun397/tfds", "4.0.0", "validation[:200]"),
    _spec("patch_camelyon", "patch_camelyon", "2.0.0", "validation[:200]"),
    _spec("eurosat", "eurosat/rgb", "2.0.0", "train[16200:16400]", "train[21600:]"),
    _spec("resisc45", "resisc45", "3.0.0", "train[18900:19100]", "train[25200:]", manual=RESISC45_MANUAL),
    _spec("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300", "3.0.0",
          "validation[:200]", manual=DIABETIC_MANUAL),
    _spec("clevr_count", "clevr", "3.1.0", "train[63000:63200]", "validation", label="clevr_count"),
    _spec("clevr_dist", "clevr", "3.1.0", "train[63000:63200]", "validation", label="clevr_dist"),
    _spec("dmlab", "dmlab", "2.0.1", "validation[:200]"),
    _spec("kitti", "kitti", "3.2.0", "validation[:200]", label="kitti_dist",
          note="[TA] pinned 3.1.0; VPT and NOAH used 3.2.0 (TFDS refused to generate 3.1.0 for "
               "them), which has the same data (task_adaptation#18)."),
    _spec("dsprites_loc", "dsprites", "2.0.0", "train[589824:590024]", "train[663552:]",
          label="dsprites_loc", image="dsprites"),
    _spec("dsprites_ori", "dsprites", "2.0.0", "train[589824:590024]", "train[663552:]",
          label="dsprites_ori", image="dsprites"),
    _spec("smallnorb_azi", "smallnorb", "2.0.0", "test[:200]", "test[12150:]",
          label="smallnorb_azi", image="smallnorb"),
    _spec("smallnorb_ele", "smallnorb", "2.0.0", "test[:200]", "test[12150:]",
          label="smallnorb_ele", image="smallnorb"),
]}


# --------------------------------------------------------------------------- helpers
def default_manual_dir(data_dir=None) -> Path:
    """Where TFDS looks when no manual dir is given: ``<data_dir>/downloads/manual``."""
    base = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(base).expanduser() / "downloads" / "manual"


def check_manual(spec: TaskSpec, manual_dir, given: bool = True) -> None:
    """Raise a UserError saying what to download and where to put it, if anything is missing."""
    if spec.manual is None:
        return
    manual_dir = Path(manual_dir).expanduser()
    missing = [p for p in spec.manual.required if not (manual_dir / p).exists()]
    if missing:
        where = (f"--manual-dir {manual_dir}" if given
                 else f"no --manual-dir given, so the TFDS default {manual_dir} was searched")
        raise UserError(
            f"task '{spec.task}' needs a manual download (TFDS '{spec.tfds}' cannot fetch it); "
            f"missing in the manual dir: {', '.join(missing)} ({where}).\n"
            f"  1. Download {spec.manual.what}.\n"
            f"  2. {spec.manual.layout[0].upper()}{spec.manual.layout[1:]}.\n"
            f"  3. Re-run with --manual-dir <manual-dir> (e.g. --manual-dir {manual_dir}).\n"
            "The other tasks are not affected.")


def normalize_limit(limit) -> dict[str, int] | None:
    """``None`` (full splits), an int (cap on every split) or ``{split: cap}``."""
    if limit is None:
        return None
    limits = {s: int(limit) for s in SPLITS} if isinstance(limit, int) else {s: int(v) for s, v in limit.items()}
    bad = [s for s, v in limits.items() if s not in SPLITS or v < 1]
    if bad:
        raise UserError(f"bad limit for {bad}: expected positive caps for the splits {', '.join(SPLITS)}.")
    return limits


def _import_tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(f"building VTAB-1k from TFDS needs tensorflow and tensorflow-datasets ({e}). "
                        "Install them with `pip install -r requirements-data.txt`.") from None
    try:  # decoding happens on the CPU; leave any GPU to PyTorch
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tfds


def _check_source(spec: TaskSpec, rule: LabelRule, builder, num_classes: int) -> None:
    if rule.source is None:
        return
    got = builder.info.features[rule.source].num_classes
    want = rule.source_classes or num_classes
    if got != want:
        raise UserError(f"{spec.tfds}:{spec.version} feature '{rule.source}' has {got} classes, "
                        f"expected {want}: wrong TFDS dataset or version for task '{spec.task}'.")


def _write_split(tfds, builder, spec: TaskSpec, split: str, tmp: Path, fmt: str, cap, progress) -> int:
    task, rule = get_task(spec.task), LABEL_RULES[spec.label]
    transform = IMAGE_RULES[spec.image][0]
    accepted = task.accepted_sizes(split)
    if cap is not None:
        accepted = tuple(min(a, cap) for a in accepted)
    ds = builder.as_dataset(split=spec.splits[split], shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({"image": True, **rule.features}))
    if cap is not None:
        ds = ds.take(cap)
    (tmp / "images" / split).mkdir(parents=True)
    lines = []
    bar = tqdm(tfds.as_numpy(ds), total=accepted[0], desc=f"{spec.task}/{split}", unit="img",
               disable=not progress, leave=False)
    for i, ex in enumerate(bar):
        label = rule.fn(ex)
        if not 0 <= label < task.num_classes:
            raise UserError(f"{spec.task}/{split} example {i}: label {label} outside [0, {task.num_classes}) "
                            f"({rule.doc}); wrong TFDS dataset or version?")
        rel = f"images/{split}/{i:06d}.{fmt}"
        Image.fromarray(transform(ex["image"])).save(tmp / rel)   # PIL defaults: JPEG quality 75
        lines.append(f"{rel} {label}\n")
    if len(lines) not in accepted:
        raise UserError(
            f"{spec.task}/{split}: TFDS split '{spec.splits[split]}' of {spec.tfds}:{spec.version} gave "
            f"{len(lines)} examples, expected {' or '.join(map(str, accepted))}. The prepared TFDS data "
            "may be incomplete or another version: delete it under the TFDS data dir and re-run.")
    (tmp / f"{split}.txt").write_text("".join(lines))
    return len(lines)


# --------------------------------------------------------------------------- build
def build_task(name: str, root, *, manual_dir=None, image_format: str = "jpg", data_dir=None,
               limit=None, progress: bool = True) -> str:
    """Build one task folder; returns ``"built"`` or ``"skipped"`` (manifest already there)."""
    task = get_task(name)
    if task.name not in SPECS:
        raise UserError(f"'{task.name}' is not a VTAB-1k task; expected one of {', '.join(VTAB_TASKS)}.")
    if image_format not in FORMATS:
        raise UserError(f"unknown image format '{image_format}'; expected one of {', '.join(FORMATS)}.")
    spec, limits = SPECS[task.name], normalize_limit(limit)
    root = Path(root).expanduser()
    out, tmp = root / task.name, root / f".{task.name}.partial"

    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        wanted = {"image_format": image_format, "limit": limits}
        diff = {k: old.get(k) for k, v in wanted.items() if old.get(k) != v}
        if diff:
            raise UserError(f"'{out}' was already built with {diff}, not {wanted}. Delete the folder to "
                            "rebuild it, or use another --root.")
        return "skipped"
    if out.exists():
        raise UserError(f"'{out}' exists but has no {MANIFEST}, so it was not built by this script "
                        "(e.g. the downloaded archive). Move it away or use another --root.")

    tfds = _import_tfds()
    manual = Path(manual_dir).expanduser() if manual_dir else default_manual_dir(data_dir)
    builder = tfds.builder(f"{spec.tfds}:{spec.version}", data_dir=data_dir)
    _check_source(spec, LABEL_RULES[spec.label], builder, task.num_classes)
    if spec.manual and not builder.is_prepared():
        check_manual(spec, manual, given=manual_dir is not None)
    # dmlab (and others) must be prepared explicitly; a no-op when already prepared.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))

    shutil.rmtree(tmp, ignore_errors=True)   # left over by an interrupted run
    try:
        counts = {s: _write_split(tfds, builder, spec, s, tmp, image_format,
                                  limits and limits.get(s), progress) for s in SPLITS}
        manifest = {
            "task": task.name, "num_classes": task.num_classes,
            "tfds_name": spec.tfds, "tfds_version": str(builder.version),
            "tensorflow_datasets": tfds.__version__,
            "splits": spec.splits, "counts": counts,
            "label_rule": {"name": spec.label, "description": LABEL_RULES[spec.label].doc},
            "image_transform": {"name": spec.image, "description": IMAGE_RULES[spec.image][1]},
            "image_format": image_format,
            "encoding": "PIL defaults (JPEG quality 75), native resolution" if image_format == "jpg"
                        else "PIL PNG (lossless), native resolution",
            "read": "builder.as_dataset(split, shuffle_files=False), default ReadConfig (as NOAH's get_vtab1k.py)",
            "limit": limits, "note": spec.note,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "built"


def build_all(root, tasks=None, *, log=print, **kwargs) -> dict[str, str]:
    """Build each task (all 19 by default); a failing task is reported and the rest still build.

    Returns ``{task: "built" | "skipped" | "FAILED: <reason>"}``.
    """
    names = [get_task(t).name for t in (tasks or VTAB_TASKS)]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise UserError(f"not VTAB-1k tasks: {', '.join(unknown)}; expected some of {', '.join(VTAB_TASKS)}.")
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    results, todo = {}, list(dict.fromkeys(names))
    for i, name in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            results[name] = build_task(name, root, **kwargs)
        except UserError as e:
            results[name] = f"FAILED: {e}"
        except Exception as e:  # a download or TFDS error must not stop the other tasks
            results[name] = f"FAILED: {type(e).__name__}: {e}"
        note = " (manifest.json present)" if results[name] == "skipped" else ""
        log(f"[{i}/{len(todo)}] {name}: {results[name]}{note} ({time.perf_counter() - t0:.1f}s)")
    return results
