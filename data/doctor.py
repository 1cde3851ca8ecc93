"""The VTAB folder doctor: is this copy the VTAB-1K everyone else used? (issue 17, items 1-2)

For each task folder ``<root>/<task>/`` (facts: ../shared/spec/vtab.md sections 1-3; the
sizes and class counts come from data/registry.py, so the demo task is judged against its
own registered sizes) :func:`check_task` checks

* the four list files are present and well formed, with the registered number of lines;
* every label lies in ``[0, num_classes)``, and which classes ``train800val200`` covers;
* every listed image exists and decodes (JPEG via PIL's ``draft``: the whole entropy-coded
  stream is read, the inverse DCT runs at 1/8 scale), with its mode, size and encoding (by
  magic bytes: JPEG, PNG or other; a folder mixing them is flagged);
* exact duplicates by content hash (sha256 of the file bytes): a test image that also appears
  in a training split is an error named with both file names; duplicates within a split and
  between train800 and val200 are warnings; train800val200 is checked to hold the images of
  train800 plus val200;

and writes (or refreshes) the task's content manifest (data/manifest.py) with every image's
hash and the task digest. Each image is read once and hashed and decoded from those bytes,
in a process pool. :func:`compare_task` compares two copies split by split: the same images
(by path, extension aside) in the same order with the same labels, and how the decoded
pixels differ.

An error is a hard problem (the copy is not VTAB-1K as registered, or cannot be read); a
warning is worth knowing but not wrong in itself. The command line is scripts/check_vtab.py.
"""
from __future__ import annotations

import io
import os
from collections import Counter, defaultdict
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.errors import UserError
from data import manifest as mf
from data.registry import SPLITS, TASKS, Task, get_task

TRAIN_SPLITS = ("train800", "val200", "train800val200")
_CHUNK = 64          # images per task handed to a worker process
_SHOW = 3            # examples named per problem
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


@dataclass
class Problem:
    level: str       # "error" | "warning"
    task: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.task}: {self.message}"


@dataclass
class Line:
    split: str
    lineno: int
    rel: str
    label: int

    @property
    def where(self) -> str:
        return f"{self.split}.txt:{self.lineno}"


@dataclass
class TaskReport:
    task: str
    folder: Path
    row: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    manifest_path: Path | None = None
    digest: str | None = None

    def error(self, msg: str) -> None:
        self.problems.append(Problem("error", self.task, msg))

    def warn(self, msg: str) -> None:
        self.problems.append(Problem("warning", self.task, msg))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def status(self) -> str:
        return "FAIL" if self.errors else "WARN" if self.warnings else "OK"


# ------------------------------------------------------------------------ per-image work

def encoding_of(head: bytes) -> str:
    """JPEG, PNG or 'other', from the file's first bytes (never from its name)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "other"


def inspect_image(path: str) -> tuple:
    """Read one file once: (size, mtime_ns, sha256, encoding, mode, width, height, error).

    ``error`` is None for a readable, decodable image; otherwise why not (the hash fields are
    None when the file cannot be read at all)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = "missing" if isinstance(e, FileNotFoundError) else (e.strerror or str(e))
        return (None, None, None, None, None, None, None, reason)
    enc = encoding_of(data[:8])
    mode = w = h = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, (w, h) = im.mode, im.size
            if im.format == "JPEG":
                im.draft(im.mode, (1, 1))   # decode at 1/8 scale; every byte is still parsed
            im.load()
        err = None
    except UnidentifiedImageError:
        err = "cannot decode: not an image PIL recognises (empty, truncated header or another format)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        err = f"cannot decode: {e}"
    return (st.st_size, st.st_mtime_ns, mf.hash_bytes(data), enc, mode, w, h, err)


def _inspect_chunk(paths: list[str]) -> list[tuple]:
    return [inspect_image(p) for p in paths]


def _decode_rgb(path: str) -> tuple[bytes, np.ndarray | None, str | None]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            return data, np.asarray(im.convert("RGB"), dtype=np.int16), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return b"", None, str(e)


def pixel_difference(path_a: str, path_b: str) -> tuple[str, float, int, int]:
    """(status, sum of |a-b| over RGB values, number of values, max |a-b|) of two images decoded
    to RGB; status is 'same-bytes', 'identical', 'differ', 'size' (shapes differ) or 'unreadable'."""
    try:
        with open(path_a, "rb") as f:
            da = f.read()
        with open(path_b, "rb") as f:
            db = f.read()
    except OSError:
        return ("unreadable", 0.0, 0, 0)
    if da == db:
        with Image.open(io.BytesIO(da)) as im:
            n = im.size[0] * im.size[1] * 3
        return ("same-bytes", 0.0, n, 0)
    try:
        with Image.open(io.BytesIO(da)) as ia, Image.open(io.BytesIO(db)) as ib:
            a = np.asarray(ia.convert("RGB"), dtype=np.int16)
            b = np.asarray(ib.convert("RGB"), dtype=np.int16)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return ("unreadable", 0.0, 0, 0)
    if a.shape != b.shape:
        return ("size", 0.0, 0, 0)
    d = np.abs(a - b)
    mx = int(d.max()) if d.size else 0
    return ("differ" if mx else "identical", float(d.sum()), int(d.size), mx)


def _pixel_chunk(pairs: list[tuple[str, str]]) -> list[tuple]:
    return [pixel_difference(a, b) for a, b in pairs]


def _map_chunks(pool: Executor | None, fn, items: list, desc: str, progress: bool) -> list:
    """fn over chunks of items (in a pool when given), flattened in order, with a progress bar."""
    chunks = [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    out = []
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for res in (pool.map(fn, chunks) if pool else map(fn, chunks)):
            out.extend(res)
            bar.update(len(res))
    return out


def make_pool(workers: int) -> Executor | None:
    """A process pool of ``workers`` processes, or None (work in this process) for 0."""
    return ProcessPoolExecutor(workers) if workers > 0 else None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------ list files

def parse_list(raw: bytes, split: str) -> tuple[list[Line], list[str]]:
    """Lines ``relative/path label`` -> (entries, malformed-line descriptions)."""
    entries, bad = [], []
    for lineno, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        parts = text.split()
        try:
            label = int(parts[1]) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label is None:
            bad.append(f"{split}.txt:{lineno} {text.strip()!r}")
        else:
            entries.append(Line(split, lineno, parts[0], label))
    return entries, bad


def _examples(items, n: int = _SHOW) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _ranges(nums) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    nums, out, i = sorted(nums), [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


# ------------------------------------------------------------------------ one task

def check_task(task: Task, folder, *, pool: Executor | None = None, progress: bool = True,
               write: bool = True, manifest_dir=None) -> TaskReport:
    """Check one task folder against the registry entry ``task``; see the module docstring."""
    folder = Path(folder)
    rep = TaskReport(task.name, folder)
    row = rep.row
    row["task"] = task.name if folder.name == task.name else f"{task.name} ({folder.name}/)"
    if folder.name != task.name:
        rep.warn(f"folder '{folder.name}' is an alias of '{task.name}': the loader reads "
                 f"'{folder.parent / task.name}', so rename it.")

    # -- list files: presence, format, sizes
    raws: dict[str, bytes] = {}
    lines: dict[str, list[Line]] = {}
    for split in SPLITS:
        f = folder / f"{split}.txt"
        try:
            raws[split] = f.read_bytes()
        except FileNotFoundError:
            rep.error(f"list file {split}.txt is missing.")
            continue
        except OSError as e:
            rep.error(f"list file {split}.txt cannot be read: {e.strerror or e}.")
            continue
        entries, bad = parse_list(raws[split], split)
        if bad:
            rep.error(f"{len(bad)} malformed line(s), expected '<relative/path> <integer label>': "
                      f"{_examples(bad)}.")
        lines[split] = entries
    row["lists"] = f"{len(raws)}/4"
    sizes = []
    for split in SPLITS:
        if split not in lines:
            sizes.append("-")
            continue
        n, expected = len(lines[split]), task.expected_size(split)
        accepted = task.accepted_sizes(split)
        if n in accepted and n != expected:
            rep.warn(f"{split}.txt lists {n} images, a known variant of the reference {expected}.")
            sizes.append(f"{n}~")
        elif n not in accepted:
            rep.error(f"{split}.txt lists {n} images; {task.name} has {expected}"
                      + (" (VTAB-1K)" if task.group != "demo" else " (registered demo size)") + ".")
            sizes.append(f"{n}!")
        else:
            sizes.append(str(n))
    row["train800/val200/trainval/test"] = "/".join(sizes)

    # -- labels
    every = [ln for split in SPLITS for ln in lines.get(split, [])]
    out_of_range = [ln for ln in every if not 0 <= ln.label < task.num_classes]
    if out_of_range:
        rep.error(f"{len(out_of_range)} label(s) outside [0, {task.num_classes}) for {task.num_classes} "
                  f"classes: {_examples(f'{ln.where} label {ln.label}' for ln in out_of_range)}.")
    row["classes"] = task.num_classes
    if "train800val200" in lines:
        covered = {ln.label for ln in lines["train800val200"] if 0 <= ln.label < task.num_classes}
        row["train covers"] = f"{len(covered)}/{task.num_classes}"
        missing = sorted(set(range(task.num_classes)) - covered)
        if missing:
            rep.warn(f"the {len(lines['train800val200'])} training images (train800val200) cover "
                     f"{len(covered)} of {task.num_classes} classes; never seen: {_ranges(missing)}.")
    else:
        row["train covers"] = "-"

    # -- images: read once, hash, decode
    rels = list(dict.fromkeys(ln.rel for ln in every))
    results = _map_chunks(pool, _inspect_chunk, [str(folder / r) for r in rels],
                          f"{task.name} check", progress)
    info = dict(zip(rels, results))
    first_where = {}
    for ln in every:
        first_where.setdefault(ln.rel, ln.where)
    missing_files = [r for r in rels if info[r][7] == "missing"]
    unreadable = [r for r in rels if info[r][2] is None and info[r][7] != "missing"]
    undecodable = [r for r in rels if info[r][2] is not None and info[r][7]]
    if missing_files:
        rep.error(f"{len(missing_files)} listed image(s) missing: "
                  f"{_examples(f'{r} ({first_where[r]})' for r in missing_files)}.")
    if unreadable:
        rep.error(f"{len(unreadable)} listed image(s) cannot be read: "
                  f"{_examples(f'{r} ({info[r][7]})' for r in unreadable)}.")
    if undecodable:
        rep.error(f"{len(undecodable)} image(s) do not decode: "
                  f"{_examples(f'{r} ({first_where[r]}: {info[r][7]})' for r in undecodable)}.")
    good = [r for r in rels if info[r][7] is None]
    row["images"] = f"{len(good)}/{len(rels)} ok"

    encs = Counter(info[r][3] for r in rels if info[r][3])
    row["encoding"] = "+".join(f"{e}" if len(encs) == 1 else f"{e}:{n}" for e, n in sorted(encs.items())) or "-"
    if len(encs) > 1:
        rep.warn("mixed encodings in one task: "
                 + ", ".join(f"{n} {e}" for e, n in sorted(encs.items()))
                 + f" (e.g. {_examples(r for r in rels if info[r][3] == min(encs, key=encs.get))}); "
                 "a copy built in one pass has one encoding.")
    if "other" in encs:
        rep.warn(f"{encs['other']} image(s) neither JPEG nor PNG: "
                 f"{_examples(r for r in rels if info[r][3] == 'other')}.")
    misnamed = [r for r in rels if info[r][3] in ("JPEG", "PNG")
                and _EXT.get(PurePosixPath(r).suffix.lower(), info[r][3]) != info[r][3]]
    if misnamed:
        rep.warn(f"{len(misnamed)} file name(s) whose extension does not match the content: "
                 f"{_examples(f'{r} is {info[r][3]}' for r in misnamed)}.")
    modes = Counter(info[r][4] for r in good)
    row["modes"] = ",".join(m for m, _ in modes.most_common()) or "-"
    unusual = {m: n for m, n in modes.items() if m not in ("RGB", "L")}
    if unusual:
        rep.warn("image mode(s) other than RGB and L, converted to RGB by the loader: "
                 + ", ".join(f"{n} {m}" for m, n in unusual.items()) + ".")
    if good:
        ws = [info[r][5] for r in good]
        hs = [info[r][6] for r in good]
        lo, hi = f"{min(ws)}x{min(hs)}", f"{max(ws)}x{max(hs)}"
        row["size (WxH)"] = lo if lo == hi else f"{lo}..{hi}"
    else:
        row["size (WxH)"] = "-"

    # -- duplicates by content
    _check_duplicates(rep, lines, {r: info[r][2] for r in rels if info[r][2]})

    # -- manifest
    hashed = all(info[r][2] for r in rels)
    if len(raws) == 4 and hashed:
        man = mf.make_manifest(task.name, raws, {r: info[r][:3] for r in rels},
                               info={r: {"encoding": info[r][3], "mode": info[r][4],
                                         "width": info[r][5], "height": info[r][6]} for r in rels})
        rep.digest = man["digest"]
        if write:
            rep.manifest_path = mf.write_manifest(folder, man, manifest_dir)
    row["digest"] = rep.digest[:12] if rep.digest else "-"
    row["status"] = rep.status
    return rep


def _check_duplicates(rep: TaskReport, lines: dict[str, list[Line]], hashes: dict[str, str]) -> None:
    by_split = {s: [(ln, hashes[ln.rel]) for ln in lines.get(s, []) if ln.rel in hashes] for s in SPLITS}
    n_within = 0
    for split, items in by_split.items():
        groups = defaultdict(list)
        for ln, h in items:
            groups[h].append(ln)
        dups = [g for g in groups.values() if len(g) > 1]
        if dups:
            extra = sum(len(g) - 1 for g in dups)
            n_within += extra
            rep.warn(f"{split}.txt holds {extra} exact duplicate(s) by content: "
                     f"{_examples(' = '.join(f'{ln.rel} ({ln.where})' for ln in g) for g in dups)}.")
    # test vs training: leakage (an error)
    train_by_hash = defaultdict(list)
    for split in TRAIN_SPLITS:
        for ln, h in by_split[split]:
            train_by_hash[h].append(ln)
    leaks = [(ln, train_by_hash[h]) for ln, h in by_split["test"] if h in train_by_hash]
    if leaks:
        def leak(ln, tr):
            same = "same label" if any(t.label == ln.label for t in tr) else f"label {ln.label} vs {tr[0].label}"
            return f"{ln.rel} ({ln.where}) = {tr[0].rel} ({tr[0].where}; {same})"
        rep.error(f"train/test leakage: {len(leaks)} test image(s) identical to training images: "
                  f"{_examples(leak(ln, tr) for ln, tr in leaks)}.")
    # train800 vs val200: hyper-parameters selected on training images
    t800 = {h: ln for ln, h in by_split["train800"]}
    shared = [(ln, t800[h]) for ln, h in by_split["val200"] if h in t800]
    if shared:
        rep.warn(f"val200 shares {len(shared)} image(s) with train800 (hyper-parameters would be "
                 f"selected on training images): {_examples(f'{a.rel} = {b.rel}' for a, b in shared)}.")
    # train800val200 should be train800 + val200 (as a multiset of images; its order may differ)
    if all(s in lines for s in TRAIN_SPLITS):
        parts = Counter(h for s in ("train800", "val200") for _, h in by_split[s])
        whole = Counter(h for _, h in by_split["train800val200"])
        extra, lacking = whole - parts, parts - whole
        if extra or lacking:
            first = [ln.rel for ln, h in by_split["train800val200"] if h in extra][:_SHOW]
            rep.warn(f"train800val200 is not train800 + val200 by content: {sum(extra.values())} of its "
                     f"images are in neither{' (e.g. ' + ', '.join(first) + ')' if first else ''}, "
                     f"{sum(lacking.values())} of theirs are absent from it.")
    rep.row["dups (within/leak)"] = f"{n_within}/{len(leaks)}"


# ------------------------------------------------------------------------ two copies

@dataclass
class SplitComparison:
    task: str
    split: str
    n_a: int
    n_b: int
    lists: str                 # same | same (extension ...) | order differs | different images | missing
    labels_differ: int
    compared: int = 0
    identical: int = 0         # identical pixels (same bytes or same decoded RGB)
    differ: int = 0
    size_differ: int = 0
    unreadable: int = 0
    mad: float | None = None   # mean |a-b| over every RGB value of the compared same-size images (0-255)
    max_abs: int = 0

    @property
    def share_differ(self) -> float | None:
        return (self.differ + self.size_differ) / self.compared if self.compared else None

    def row(self) -> dict:
        pix = ("-" if not self.compared else
               "identical" if self.identical == self.compared else
               f"{self.differ + self.size_differ}/{self.compared} differ ({100 * self.share_differ:.1f}%)")
        return {"task": self.task, "split": self.split, "images A/B": f"{self.n_a}/{self.n_b}",
                "lists": self.lists, "labels differ": self.labels_differ, "pixels": pix,
                "mean |A-B|": "-" if self.mad is None else f"{self.mad:.3f}",
                "max |A-B|": self.max_abs if self.compared else "-",
                "size differs": self.size_differ, "unreadable": self.unreadable}


def _stem(rel: str) -> str:
    p = PurePosixPath(rel)
    return str(p.with_suffix("")) if p.suffix else rel


def compare_task(task: Task, folder_a, folder_b, *, pool: Executor | None = None,
                 progress: bool = True) -> list[SplitComparison]:
    """Per split: do both copies list the same images (by path, the extension aside: a JPEG and
    a PNG build name them alike) in the same order with the same labels, and how do the pixels
    of the images they both list differ after decoding to RGB."""
    folder_a, folder_b = Path(folder_a), Path(folder_b)
    out = []
    for split in SPLITS:
        parsed = []
        for folder in (folder_a, folder_b):
            try:
                parsed.append(parse_list((folder / f"{split}.txt").read_bytes(), split)[0])
            except OSError:
                parsed.append(None)
        a, b = parsed
        if a is None or b is None:
            out.append(SplitComparison(task.name, split, len(a or []), len(b or []),
                                       f"missing in {'A' if a is None else 'B'}", 0))
            continue
        sa, sb = [_stem(ln.rel) for ln in a], [_stem(ln.rel) for ln in b]
        if [ln.rel for ln in a] == [ln.rel for ln in b]:
            lists = "same"
        elif sa == sb:
            exts = sorted({(PurePosixPath(x.rel).suffix, PurePosixPath(y.rel).suffix) for x, y in zip(a, b)
                           if x.rel != y.rel})
            lists = "same (" + ", ".join(f"{x or 'none'}->{y or 'none'}" for x, y in exts) + ")"
        elif Counter(sa) == Counter(sb):
            lists = "order differs"
        else:
            only_a, only_b = len(set(sa) - set(sb)), len(set(sb) - set(sa))
            lists = f"different images ({only_a} only in A, {only_b} only in B)"
        if sa == sb:
            pairs = list(zip(a, b))
        else:  # pair the entries both copies name alike (first occurrence)
            first_b = {}
            for ln in b:
                first_b.setdefault(_stem(ln.rel), ln)
            pairs = [(ln, first_b[_stem(ln.rel)]) for ln in a if _stem(ln.rel) in first_b]
        cmp = SplitComparison(task.name, split, len(a), len(b), lists,
                              sum(x.label != y.label for x, y in pairs))
        res = _map_chunks(pool, _pixel_chunk, [(str(folder_a / x.rel), str(folder_b / y.rel)) for x, y in pairs],
                          f"{task.name}/{split} compare", progress)
        total, values = 0.0, 0
        for status, s, n, mx in res:
            cmp.compared += 1
            if status in ("same-bytes", "identical"):
                cmp.identical += 1
            elif status == "differ":
                cmp.differ += 1
            elif status == "size":
                cmp.size_differ += 1
            else:
                cmp.unreadable += 1
                cmp.compared -= 1
            total, values, cmp.max_abs = total + s, values + n, max(cmp.max_abs, mx)
        cmp.mad = total / values if values else None
        out.append(cmp)
    return out


# ------------------------------------------------------------------------ the whole root

def resolve_tasks(root, names=None) -> tuple[list[tuple[Task, Path]], list[str]]:
    """(task, folder) pairs to check and notes. Named tasks must be present (alias folder names
    accepted); without names every folder of ``root`` that names a registered task is checked."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data root '{root}' does not exist or is not a folder.")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    notes, picked = [], []
    if names:
        for name in names:
            task = get_task(name)
            cands = [folders[n] for n in (task.name, *task.aliases) if n in folders]
            if not cands:
                raise UserError(f"task '{name}' has no folder under '{root}' (looked for "
                                f"{', '.join(repr(n) for n in (task.name, *task.aliases))}); the data root "
                                f"holds: {', '.join(folders) or 'nothing'}.")
            picked.append((task, cands[0]))
    else:
        unknown = []
        for name, path in folders.items():
            try:
                picked.append((get_task(name), path))
            except UserError:
                unknown.append(name)
        if unknown:
            notes.append(f"not task folders (skipped): {', '.join(unknown)}")
        if not picked:
            raise UserError(f"no task folders under '{root}' (expected folders named like "
                            f"{', '.join(list(TASKS)[:3])}, ...); pass the folder that holds the task folders.")
        vtab_absent = [t for t in TASKS if TASKS[t].group != "demo" and t not in {tk.name for tk, _ in picked}]
        if vtab_absent and len(vtab_absent) < len([t for t in TASKS if TASKS[t].group != "demo"]):
            notes.append(f"VTAB tasks absent from this root: {', '.join(vtab_absent)}")
    seen = Counter(t.name for t, _ in picked)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise UserError(f"task(s) {', '.join(dup)} present under more than one folder name in '{root}'; "
                        "keep one (the loader reads the canonical name) or name one with --tasks.")
    return picked, notes


@dataclass
class DoctorResult:
    reports: list[TaskReport]
    comparisons: list[SplitComparison]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not any(r.errors for r in self.reports)


def run_doctor(root, tasks=None, *, compare=None, workers: int | None = None, progress: bool = True,
               write: bool = True, manifest_dir=None) -> DoctorResult:
    picked, notes = resolve_tasks(root, tasks)
    other = None
    if compare is not None:
        other = Path(compare).expanduser()
        if not other.is_dir():
            raise UserError(f"--compare root '{other}' does not exist or is not a folder.")
    workers = default_workers() if workers is None else workers
    pool = make_pool(workers)
    reports, comparisons = [], []
    try:
        for task, folder in tqdm(picked, desc="tasks", unit="task", disable=not progress or len(picked) < 2):
            rep = check_task(task, folder, pool=pool, progress=progress, write=write, manifest_dir=manifest_dir)
            if rep.manifest_path is not None and rep.manifest_path.parent != folder:
                notes.append(f"{task.name}: task folder not writable; manifest written to {rep.manifest_path}")
            reports.append(rep)
            if other is not None:
                ofolder = next((other / n for n in (task.name, *task.aliases) if (other / n).is_dir()), None)
                if ofolder is None:
                    rep.error(f"--compare: no folder for '{task.name}' under '{other}'.")
                    rep.row["status"] = rep.status
                    continue
                comparisons.extend(compare_task(task, folder, ofolder, pool=pool, progress=progress))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return DoctorResult(reports, comparisons, notes)


# ------------------------------------------------------------------------ printing

def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_result(res: DoctorResult, root=None, other=None) -> str:
    parts = [format_table([r.row for r in res.reports])]
    errors = [p for r in res.reports for p in r.errors]
    warnings = [p for r in res.reports for p in r.warnings]
    if errors:
        parts.append(f"\n{len(errors)} error(s):\n" + "\n".join(f"  {p}" for p in errors))
    if warnings:
        parts.append(f"\n{len(warnings)} warning(s):\n" + "\n".join(f"  {p}" for p in warnings))
    if res.notes:
        parts.append("\nnotes:\n" + "\n".join(f"  {n}" for n in res.notes))
    if res.comparisons:
        parts.append(f"\ncompare A={root} B={other} (pixels decoded to RGB; mean |A-B| over every "
                     "RGB value, 0-255):\n" + format_table([c.row() for c in res.comparisons]))
    n_fail = sum(bool(r.errors) for r in res.reports)
    parts.append(f"\n{len(res.reports)} task(s) checked: {len(res.reports) - n_fail} passed, {n_fail} failed"
                 f" ({len(errors)} error(s), {len(warnings)} warning(s)).")
    return "\n".join(parts)
