"""Paired comparison of two methods on the same test images (issue 17, item 5).

Two runs are *paired* when they predicted the same images in the same order: the
per-sample predictions a run saves (``predictions-<which>.npz``, written by the run
directory's owner, read by :func:`load_predictions`) carry the list-file names, and a
comparison refuses runs whose lists differ, naming the first differing file.

For one pair of runs (one seed), with ``a_i, b_i`` = 1 when A / B classify image i
correctly:

- **McNemar's test**, exact: under H0 (A and B equally accurate) each discordant image
  (only A right: ``n10``; only B right: ``n01``) is A's or B's with probability 1/2, so
  p = the two-sided binomial test of ``n10`` out of ``n10 + n01`` at 1/2
  (``scipy.stats.binomtest``; p = 1 with no discordant image). This is the p-value
  reported. The continuity-corrected chi-square variant ``(|n10 - n01| - 1)^2 /
  (n10 + n01)`` (``statsmodels``' ``mcnemar(exact=False, correction=True)``) is given
  beside it (``p_chi2``) for readers who know that one; it is an approximation, poor
  below about 25 discordant images.
- **Paired bootstrap** of the accuracy difference ``acc_A - acc_B`` (points): images are
  resampled with replacement, the same indices for both methods (and for every seed),
  ``B`` replicates, a fixed generator seed; the interval is the percentile interval
  ``[q(level/2), q(1 - level/2)]``. Because the resampled difference only depends on how
  often each value of the per-image difference ``d_i`` is drawn, the replicates are
  drawn as multinomial counts over the distinct values of ``d`` (the same distribution as
  drawing indices, without an (B, N) index matrix).
- **Agreement of errors**: both wrong, only A wrong, only B wrong, both right; the
  Jaccard index of the two error sets (both wrong / either wrong; undefined when neither
  errs) and Cohen's kappa of the correct/wrong labels; and the share of images where
  the two predicted classes are equal.

**Combined over seeds** (A and B each run with seeds s = 1..S, paired by seed): the test
images are the same in every seed, so the S * N pairs are not S * N independent
observations; pooling the discordant counts of all seeds into one McNemar test would
count an image that is discordant in every seed S times and overstate the evidence.
The combined test keeps the *image* as the unit: per image, ``d_i = sum_s (a_is -
b_is)`` (how many more seeds A got it right than B), and the exact two-sided sign test
on the images with ``d_i != 0`` (``n+`` images favour A, ``n-`` favour B; binomial at
1/2). With one seed it is exactly McNemar's exact test. The pooled counts and their
(optimistic) pooled exact p-value are kept in the result for reference (``p_pooled``).
The bootstrap of the seed-mean difference resamples images the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from common.errors import UserError

WHICH = ("final", "selected")
PRED_KEYS = ("pred", "label", "files")


# -- reading predictions --------------------------------------------------------------------------
def load_predictions(run_dir, which: str = "final") -> dict:
    """The per-sample predictions of a run directory (``which``: final | selected | an eval.py stem),
    read by the run directory's owner (``engine.run.load_predictions``: a UserError naming the file
    when it is missing)."""
    from engine.run import load_predictions as read
    if which not in WHICH and not str(which).startswith("eval-"):
        raise UserError(f"which must be one of {', '.join(WHICH)} or an eval.py stem (eval-<split>-<precision>), "
                        f"got '{which}'")
    return read(run_dir, which=which)


def check_paired(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> None:
    """UserError unless ``a`` and ``b`` predicted the same images (same files, same order, same
    labels, same split)."""
    for p, name in ((a, name_a), (b, name_b)):
        missing = [k for k in PRED_KEYS if k not in p]
        if missing:
            raise UserError(f"predictions of {name} lack {', '.join(missing)}")
    sa, sb = a.get("split"), b.get("split")
    if sa is not None and sb is not None and str(sa) != str(sb):
        raise UserError(f"{name_a} predicted split '{sa}' and {name_b} split '{sb}': not the same images")
    fa, fb = np.asarray(a["files"]).astype(str), np.asarray(b["files"]).astype(str)
    n = min(len(fa), len(fb))
    diff = np.flatnonzero(fa[:n] != fb[:n])
    if len(diff):
        i = int(diff[0])
        raise UserError(f"{name_a} and {name_b} did not predict the same images: image {i} is '{fa[i]}' in "
                        f"{name_a} and '{fb[i]}' in {name_b}")
    if len(fa) != len(fb):
        longer, name = (fa, name_a) if len(fa) > len(fb) else (fb, name_b)
        raise UserError(f"{name_a} has {len(fa)} images and {name_b} {len(fb)}: the first one only {name} has is "
                        f"'{longer[n]}'")
    la, lb = np.asarray(a["label"]), np.asarray(b["label"])
    bad = np.flatnonzero(la != lb)
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{name_a} and {name_b} list the same images with different labels: '{fa[i]}' is "
                        f"labelled {la[i]} in {name_a} and {lb[i]} in {name_b}")


def correct(p: dict) -> np.ndarray:
    return np.asarray(p["pred"]) == np.asarray(p["label"])


# -- McNemar ------------------------------------------------------------------------------------------
def sign_test(n_pos: int, n_neg: int) -> float:
    """Exact two-sided binomial test of ``n_pos`` successes in ``n_pos + n_neg`` trials at 1/2 (1.0 with no trial)."""
    n = int(n_pos) + int(n_neg)
    return 1.0 if n == 0 else float(binomtest(int(n_pos), n, 0.5, alternative="two-sided").pvalue)


def mcnemar_chi2(n10: int, n01: int) -> tuple[float, float]:
    """(statistic, p) of the continuity-corrected chi-square McNemar test (statsmodels); (0, 1) with no
    discordant pair."""
    if n10 + n01 == 0:
        return 0.0, 1.0
    from statsmodels.stats.contingency_tables import mcnemar
    r = mcnemar([[0, int(n10)], [int(n01), 0]], exact=False, correction=True)
    return float(r.statistic), float(r.pvalue)


def agreement(ca: np.ndarray, cb: np.ndarray, pa=None, pb=None) -> dict:
    """Counts of the 2x2 correct/wrong table, Jaccard of the error sets, Cohen's kappa of correctness,
    share of equal predicted classes (when ``pa``, ``pb`` are given)."""
    ca, cb = np.asarray(ca, bool), np.asarray(cb, bool)
    n = len(ca)
    both_right, both_wrong = int(np.sum(ca & cb)), int(np.sum(~ca & ~cb))
    only_a_wrong, only_b_wrong = int(np.sum(~ca & cb)), int(np.sum(ca & ~cb))
    either = both_wrong + only_a_wrong + only_b_wrong
    jaccard = both_wrong / either if either else float("nan")
    po = (both_right + both_wrong) / n if n else float("nan")
    ra, rb = ca.mean() if n else float("nan"), cb.mean() if n else float("nan")
    pe = ra * rb + (1 - ra) * (1 - rb)
    if n and pe < 1:
        kappa = (po - pe) / (1 - pe)
    else:  # both constant: kappa is 1 when they agree everywhere, undefined otherwise
        kappa = 1.0 if n and po == 1 else float("nan")
    out = {"n": n, "both_right": both_right, "both_wrong": both_wrong, "only_a_wrong": only_a_wrong,
           "only_b_wrong": only_b_wrong, "jaccard_errors": float(jaccard), "kappa": float(kappa)}
    if pa is not None and pb is not None:
        out["same_prediction"] = float(np.mean(np.asarray(pa) == np.asarray(pb))) if n else float("nan")
    return out


def mcnemar(ca: np.ndarray, cb: np.ndarray) -> dict:
    """McNemar on one pair of runs from their per-image correctness: ``n10`` (only A right), ``n01``
    (only B right), ``p`` (exact, reported), ``chi2`` and ``p_chi2`` (continuity-corrected)."""
    ca, cb = np.asarray(ca, bool), np.asarray(cb, bool)
    n10, n01 = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    chi2, p_chi2 = mcnemar_chi2(n10, n01)
    return {"n10": n10, "n01": n01, "p": sign_test(n10, n01), "chi2": chi2, "p_chi2": p_chi2}


def combined(cas: list, cbs: list) -> dict:
    """The image-level sign test over seeds (module docstring): ``n_pos`` images A got right in more
    seeds than B, ``n_neg`` the reverse, ``p`` exact; plus the pooled discordant counts and their pooled
    exact p (``p_pooled``, treats the S*N pairs as independent: optimistic)."""
    A, B = np.asarray(cas, bool), np.asarray(cbs, bool)   # (S, N)
    d = A.sum(0).astype(int) - B.sum(0).astype(int)
    n_pos, n_neg = int(np.sum(d > 0)), int(np.sum(d < 0))
    n10, n01 = int(np.sum(A & ~B)), int(np.sum(~A & B))
    return {"seeds": len(A), "n_pos": n_pos, "n_neg": n_neg, "p": sign_test(n_pos, n_neg),
            "n10_pooled": n10, "n01_pooled": n01, "p_pooled": sign_test(n10, n01)}


# -- bootstrap ----------------------------------------------------------------------------------------
def bootstrap_ci(cas: list, cbs: list, *, level: float = 0.05, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired bootstrap over images of the seed-mean accuracy difference A - B, in points.

    ``cas``/``cbs``: per-image correctness, one row per seed (or one 1-d array). Returns ``diff``
    (observed), ``low``/``high`` (percentile interval at 1 - level), ``se`` (sd of the replicates),
    ``n_boot``, ``seed``.
    """
    A, B = np.atleast_2d(np.asarray(cas, bool)), np.atleast_2d(np.asarray(cbs, bool))
    if A.shape != B.shape:
        raise ValueError(f"correctness arrays differ in shape: {A.shape} vs {B.shape}")
    if not 0 < level < 1:
        raise UserError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise UserError(f"the number of bootstrap replicates must be positive, got {n_boot}")
    n = A.shape[1]
    d = (A.astype(float) - B.astype(float)).mean(0) * 100.0      # per image, points, seed-mean
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)           # (n_boot, distinct values)
    reps = draws @ values / n
    low, high = np.quantile(reps, [level / 2, 1 - level / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "se": float(reps.std(ddof=1))
            if n_boot > 1 else float("nan"), "n_boot": int(n_boot), "seed": int(seed), "level": level}


# -- a whole comparison -------------------------------------------------------------------------------
@dataclass
class Comparison:
    """A against B on one task over paired seeds."""
    task: str
    seeds: list                     # [(seed_a, seed_b)] in pairing order
    acc_a: list                     # percent per seed
    acc_b: list
    per_seed: list                  # McNemar per seed (dicts of :func:`mcnemar`)
    agree: list                     # :func:`agreement` per seed
    combined: dict
    boot: dict | None               # None when compared with n_boot=0
    notes: list = field(default_factory=list)

    @property
    def diff(self) -> float:
        return float(np.mean(self.acc_a) - np.mean(self.acc_b))

    def significant(self, level: float) -> bool:
        return self.combined["p"] < level


def compare(pairs: list, *, task: str = "", level: float = 0.05, n_boot: int = 10000, seed: int = 0,
            names=("A", "B")) -> Comparison:
    """Compare predictions ``pairs = [((seed_a, pred_a), (seed_b, pred_b)), ...]`` (dicts as
    :func:`load_predictions` returns), one pair per seed, all on the same images."""
    if not pairs:
        raise UserError(f"{task or 'comparison'}: no pair of runs to compare")
    first = pairs[0][0][1]
    cas, cbs, per_seed, agree, acc_a, acc_b, seeds = [], [], [], [], [], [], []
    for (sa, pa), (sb, pb) in pairs:
        tag = f" (seed {sa})" if sa == sb else f" (seeds {sa}/{sb})"
        check_paired(pa, pb, names[0] + tag, names[1] + tag)
        check_paired(first, pa, f"{names[0]} (seed {pairs[0][0][0]})", names[0] + tag)
        ca, cb = correct(pa), correct(pb)
        cas.append(ca)
        cbs.append(cb)
        per_seed.append(mcnemar(ca, cb))
        agree.append(agreement(ca, cb, pa["pred"], pb["pred"]))
        acc_a.append(100.0 * ca.mean())
        acc_b.append(100.0 * cb.mean())
        seeds.append((sa, sb))
    notes = []
    for (s, p), acc in ((pp[0], a) for pp, a in zip(pairs, acc_a)):
        rep = p.get("accuracy")
        if rep is not None and abs(float(rep) - acc) > 1e-6 * max(1.0, abs(acc)) + 1e-9:
            notes.append(f"{names[0]} seed {s}: saved accuracy {float(rep):.4f} differs from the predictions' "
                         f"{acc:.4f}")
    if all(np.array_equal(pa["pred"], pb["pred"]) for (_, pa), (_, pb) in pairs):
        notes.append("identical predictions")
    boot = bootstrap_ci(cas, cbs, level=level, n_boot=n_boot, seed=seed) if n_boot else None
    return Comparison(task, seeds, acc_a, acc_b, per_seed, agree, combined(cas, cbs), boot, notes)


def fmt_p(p: float) -> str:
    return "1" if p >= 0.9995 else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def summary_row(c: Comparison, level: float) -> dict:
    """One row of the report (all text or numbers; a pandas DataFrame is built from these)."""
    n_a = len(c.acc_a)
    ag = {k: float(np.mean([a[k] for a in c.agree])) for k in ("both_wrong", "only_a_wrong", "only_b_wrong",
                                                                  "jaccard_errors", "kappa", "same_prediction")}
    pct = 100 * (1 - level)
    return {
        "task": c.task,
        "seeds": " ".join(str(a) if a == b else f"{a}/{b}" for a, b in c.seeds),
        "acc A": round(float(np.mean(c.acc_a)), 2), "acc B": round(float(np.mean(c.acc_b)), 2),
        "A - B": round(c.diff, 2),
        f"{pct:g}% CI (bootstrap)": f"[{c.boot['low']:.2f}, {c.boot['high']:.2f}]" if c.boot else "–",
        "McNemar p per seed (exact; only A right/only B right)": "; ".join(
            f"{fmt_p(m['p'])} ({m['n10']}/{m['n01']})" for m in c.per_seed),
        "p chi2 (cc) per seed": "; ".join(fmt_p(m["p_chi2"]) for m in c.per_seed),
        "combined p (image sign test)": fmt_p(c.combined["p"]) + (f" ({c.combined['n_pos']}/{c.combined['n_neg']})"
                                                                   if n_a > 1 else ""),
        f"significant at {level:g}": "yes" if c.significant(level) else "no",
        "both wrong / only A / only B (mean)": f"{ag['both_wrong']:.1f} / {ag['only_a_wrong']:.1f} / "
                                               f"{ag['only_b_wrong']:.1f}",
        "Jaccard errors": round(ag["jaccard_errors"], 3), "kappa": round(ag["kappa"], 3),
        "same class": round(ag["same_prediction"], 3),
        "notes": "; ".join(c.notes),
    }


def to_markdown(df) -> str:
    """A DataFrame as a Markdown table (no optional dependency)."""
    def esc(v):
        if isinstance(v, float) and np.isnan(v):
            return "–"
        return str(v).replace("|", "\\|")
    head = [esc(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# -- runs: directories or table cells ---------------------------------------------------------------
ALIASES = {"method": "method_id"}   # --a method=lily_qvffn_tiny means the method config's name


def select_runs(runs, filters: list, task: str | None = None, name: str = "A"):
    """The finished runs of ``runs`` (``results.runs.load_runs`` output) matching every ``KEY=V1,V2``
    filter: a results.json column (``method`` = ``method_id``, ``backbone``, ``seed``, ``protocol``,
    ``recipe``, ``precision``, ...) or a dotted identity key (``method.ne=4``)."""
    from results.runs import FIELDS, _same, where
    df = runs[runs["status"] == "finished"]
    if task:
        df = df[df["task"] == task]
    dotted = []
    for f in filters:
        key, sep, values = f.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or not key:
            raise UserError(f"--{name.lower()} expects KEY=VALUE[,VALUE...], got '{f}'")
        if key in FIELDS or key in df.columns and key not in ("flat", "identity"):
            wanted = [w.strip() for w in values.split(",")]
            df = df[[any(_same(v, w) for w in wanted) for v in df[key]]]
        else:
            dotted.append(f"{key}={values}")
    df = where(df, dotted) if dotted else df
    if df.empty:
        raise UserError(f"no finished run matches {name}: {' '.join(filters) or '(no filter)'}"
                        + (f" on task {task}" if task else ""))
    return df


def _differing(rows) -> str:
    keys = sorted({k for f in rows["flat"] for k in f})
    diff = [k for k in keys if len({str(f.get(k)) for f in rows["flat"]}) > 1]
    return ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")


def pair_runs(df_a, df_b) -> tuple[dict, list]:
    """Per task the run directories of A and B paired by seed: ({task: [((seed, dir_a), (seed, dir_b))]},
    notes). A task or seed only one side has is named in the notes; two runs of one side on one (task,
    seed) (the filter matches several configurations) are refused, naming the keys that differ."""
    out, notes = {}, []
    for name, df in (("A", df_a), ("B", df_b)):
        for (task, seed), g in df.groupby(["task", "seed"]):
            if len(g) > 1:
                raise UserError(f"{name} matches {len(g)} runs on task {task}, seed {seed} (they differ in "
                                f"{_differing(g)}): add KEY=VALUE filters so that it names one configuration")
    for task in sorted(set(df_a["task"]) | set(df_b["task"])):
        a = dict(zip(df_a[df_a["task"] == task]["seed"], df_a[df_a["task"] == task]["run_dir"]))
        b = dict(zip(df_b[df_b["task"] == task]["seed"], df_b[df_b["task"] == task]["run_dir"]))
        if not a or not b:
            notes.append(f"{task}: only {'A' if a else 'B'} has runs; not compared")
            continue
        common = sorted(set(a) & set(b))
        if not common:
            notes.append(f"{task}: A has seeds {sorted(a)} and B {sorted(b)}, none in common; not compared")
            continue
        for side, d in (("A", a), ("B", b)):
            extra = sorted(set(d) - set(common))
            if extra:
                notes.append(f"{task}: {side}'s seed(s) {extra} have no partner; left out")
        out[task] = [((s, a[s]), (s, b[s])) for s in common]
    return out, notes


def digests(df, run_dirs) -> set:
    if "data_digest" not in df.columns:
        return {None}
    wanted = {str(Path(d).resolve()) for d in run_dirs}
    sel = df[[str(Path(d).resolve()) in wanted for d in df["run_dir"]]]["data_digest"]
    return {None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in sel}


def compare_tasks(paired: dict, *, which: str = "final", level: float = 0.05, n_boot: int = 10000, seed: int = 0,
                  runs=None) -> list:
    """:func:`compare` per task of :func:`pair_runs` output, predictions read from the run directories.
    With ``runs`` (the load_runs frame) the data digests of the runs are checked: a note when they
    differ or are not recorded."""
    out = []
    for task, pairs in paired.items():
        loaded = [((sa, load_predictions(da, which)), (sb, load_predictions(db, which))) for (sa, da), (sb, db) in pairs]
        c = compare(loaded, task=task, level=level, n_boot=n_boot, seed=seed)
        if runs is not None:
            dg = digests(runs, [d for pair in pairs for _, d in pair])
            known = sorted(x for x in dg if x)
            if len(known) > 1:
                c.notes.append(f"runs read different data copies (data_digest {', '.join(k[:12] for k in known)})")
            elif None in dg:
                c.notes.append("data_digest not recorded for some runs")
        out.append(c)
    return out


def report(comparisons: list, level: float):
    """The comparisons as a pandas DataFrame, one row per task."""
    import pandas as pd
    return pd.DataFrame([summary_row(c, level) for c in comparisons])
