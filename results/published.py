"""The authors' published VTAB-1k numbers (from the specs) beside ours, each row labelled with how
it was selected and trained.

    python scripts/collect_results.py --published vit|vim [--runs outputs/runs] [--protocol final]

Data (transcribed, not recomputed):
- ViT-B/16 (IN-21k): ../shared/spec/baselines-vit.md §12 (per-task rows; group-wise mean "GW" =
  mean of the three group means, and the plain 19-task mean) with each author's selection
  protocol from §13, and PETL_Vision's one-protocol re-runs (GW only).
- Vim-S: ../shared/spec/baselines-vim.md §4 (MambaPEFT's table: group means, its "Avg" = the
  19-task mean, G3 = mean of the group means, #Params (K)) with the selection protocol of §1/§6.
  Per-task numbers are not published there (UNCONFIRMED in the spec): those cells stay empty.

Ours: the VTAB-1k tables of results/tables.py (``build_tables``) of one protocol (default
``final``: the clean protocol's stage 2), one row per variant whose method config matches a
published row (``configs``), with per-task mean ± std over seeds, the group means, GW and the
19-task mean as mean ± std over seeds (each seed's own means; plain means of the cells when the
seeds differ between tasks), and Params(M) from the runs (trainable, head excluded, averaged over
the 19 tasks: the Convpass/FacT "Params" convention).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import UserError
from data.registry import GROUPS, TASKS, VTAB_TASKS

BACKBONES = ("vit", "vim")
GW, MEAN19 = "GW (mean of group means)", "19-task mean"
MISSING = "–"


@dataclass(frozen=True)
class Published:
    """One published row, as printed by its source."""
    method: str                 # the name the source uses
    configs: tuple              # our method configs it is compared with (empty: none here)
    backbone: str               # vit | vim
    source: str
    protocol: str               # how the authors selected the reported number
    recipe: str                 # how they trained
    tasks: dict | None = None   # task -> accuracy (VTAB_TASKS order), or None when not published
    groups: tuple | None = None  # (natural, specialized, structured) as printed, when printed
    gw: float | None = None     # stated mean of group means
    mean19: float | None = None  # stated 19-task mean
    reported: str = ""          # the headline as the source prints it
    params_m: float | None = None
    params_note: str = ""

    def group_means(self) -> tuple | None:
        if self.tasks:
            return tuple(statistics.fmean(self.tasks[t] for t in VTAB_TASKS if TASKS[t].group == g) for g in GROUPS)
        return self.groups

    def means(self) -> tuple[float | None, float | None]:
        """(GW, 19-task mean): recomputed from the per-task row when there is one, else as stated
        (for Vim the stated group means give GW; the 19-task mean is MambaPEFT's 'Avg')."""
        if self.tasks:
            return statistics.fmean(self.group_means()), statistics.fmean(self.tasks.values())
        g = self.groups
        return (statistics.fmean(g) if g else self.gw), self.mean19


def _row(text: str) -> dict:
    parts = [p.split() for p in text.split("|")]
    sizes = [sum(1 for t in VTAB_TASKS if TASKS[t].group == g) for g in GROUPS]
    if [len(p) for p in parts] != sizes:
        raise ValueError(f"a per-task row needs {sizes} values per group: {text}")
    return dict(zip(VTAB_TASKS, (float(v) for p in parts for v in p)))


# -- ViT-B/16 IN-21k: baselines-vit.md §12 (rows) and §13 (protocols) ------------------------
VPT_PROTOCOL = "VPT: grid on val200, 5 seeds, last epoch"
BEST_OF_TEST = "best of 10 test evaluations (selects on test)"
PETLV_PROTOCOL = "PETL_Vision: tuned on val200, last epoch; no normalisation"
VIT = [
    Published("BitFit", ("bitfit",), "vit", "VPT paper ('Bias'); V-PETL README", VPT_PROTOCOL, "VPT code",
              _row("72.8 87.0 59.2 97.5 85.3 59.9 51.4 | 78.7 91.6 72.9 69.8 | "
                   "61.5 55.6 32.4 55.9 66.6 40.0 15.7 25.1"), gw=65.22, mean19=62.05, reported="65.2 GW",
              params_m=0.102912),
    Published("VPT-shallow", ("vpt_shallow",), "vit", "VPT paper; V-PETL README", VPT_PROTOCOL, "VPT code",
              _row("77.7 86.9 62.6 97.5 87.3 74.5 51.2 | 78.2 92.0 75.6 72.9 | "
                   "50.5 58.6 40.5 67.1 68.7 36.1 20.2 34.1"), gw=67.82, mean19=64.85, reported="67.8 GW",
              params_note="768·p, p per task"),
    Published("VPT-deep", ("vpt_deep",), "vit", "Convpass report T1; NOAH T1", VPT_PROTOCOL, "VPT code",
              _row("78.8 90.8 65.8 98.0 88.3 78.1 49.6 | 81.8 96.1 83.4 68.4 | "
                   "68.5 60.0 46.5 72.8 73.6 47.9 32.9 37.8"), gw=71.97, mean19=69.43, reported="72.0 GW",
              params_m=0.678104, params_note="9,216·p: 19-task mean"),
    Published("SSF", ("ssf",), "vit", "V-PETL README",
              "fixed per-task recipe; test every epoch, best or last UNCONFIRMED", "SSF code (AugReg IN-21k weights)",
              _row("69.0 92.6 75.1 99.4 91.8 90.2 52.9 | 87.4 95.9 87.4 75.5 | "
                   "75.9 62.3 53.3 80.6 77.3 54.9 29.5 37.9"), gw=75.69, mean19=73.10, reported="73.10 (19-task mean)",
              params_m=0.205824),
    Published("FacT-TK (r ≤ 32)", ("fact_tk",), "vit", "V-PETL README ('FacT')",
              "train800val200, " + BEST_OF_TEST, "FacT code",
              _row("70.6 90.6 70.8 99.1 90.7 88.6 54.1 | 84.8 96.2 84.5 75.7 | "
                   "82.6 68.2 49.8 80.7 80.8 47.4 33.2 43.0"), gw=75.55, mean19=73.23, reported="75.6 GW",
              params_m=0.068985, params_note="19-task mean of the authors' per-task ranks"),
    Published("FacT-TT (r ≤ 16)", ("fact_tt",), "vit", "PETL-ViT issue #15 (per-task row UNCONFIRMED)",
              "train800val200, " + BEST_OF_TEST, "FacT code", gw=75.3, reported="75.3 GW",
              params_m=0.039734, params_note="19-task mean of the authors' per-task ranks"),
    Published("RepAdapter", ("repadapter",), "vit", "V-PETL README",
              BEST_OF_TEST + "; its scale search uses test", "RepAdapter code",
              _row("72.4 91.6 71.0 99.2 91.4 90.7 55.1 | 85.3 95.9 84.6 75.9 | "
                   "82.3 68.0 50.4 79.9 80.4 49.2 38.6 41.0"), gw=76.09, mean19=73.84, reported="76.1 GW (computed)",
              params_m=0.239808),
    Published("Convpass", ("convpass",), "vit", "Convpass report T1 (GW: README)", BEST_OF_TEST, "Convpass code",
              _row("72.3 91.2 72.2 99.2 90.9 91.3 54.9 | 84.2 96.1 85.3 75.6 | "
                   "82.3 67.9 51.3 80.0 85.9 53.1 36.4 44.4"), gw=76.56, mean19=74.45, reported="76.56 GW",
              params_m=0.327552),
    Published("Convpass-attn", (), "vit", "Convpass report T1", BEST_OF_TEST, "Convpass code",
              _row("71.8 90.7 72.0 99.1 91.0 89.9 54.2 | 85.2 95.6 83.4 74.8 | "
                   "79.9 67.0 50.3 79.9 84.3 53.2 34.8 43.0"), gw=75.85, mean19=73.69, reported="75.85 GW",
              params_m=0.163776),
    Published("Adapter d=8 (Pfeiffer)", ("adapter_pfeiffer",), "vit", "NOAH T1",
              "max test accuracy over epochs (selects on test)", "NOAH code",
              _row("69.2 90.1 68.0 98.8 89.9 82.8 54.3 | 84.0 94.9 81.9 75.5 | "
                   "80.9 65.3 48.6 78.3 74.8 48.5 29.9 41.6"), gw=73.86, mean19=71.44, reported="73.9 GW",
              params_m=0.156768),
    Published("Adapter (Houlsby), tuned", ("adapter_houlsby",), "vit", "PETL_Vision final_result.json",
              PETLV_PROTOCOL, "PETL_Vision code",
              _row("72.3 92.1 71.3 98.0 91.4 89.8 54.6 | 87.7 95.2 86.5 73.0 | "
                   "82.5 63.3 53.6 79.3 83.8 54.2 34.2 43.8"), gw=76.27, mean19=74.03, reported="76.27 GW",
              params_m=0.313536, params_note="d=8"),
] + [
    # PETL_Vision's re-runs of the field under one protocol (group-wise mean only)
    Published(f"{name} (PETL_Vision re-run)", cfg, "vit", "PETL_Vision tune_output/default_vtab", PETLV_PROTOCOL,
              "PETL_Vision code", gw=gw, reported=f"{gw:.2f} GW")
    for name, cfg, gw in (("BitFit", ("bitfit",), 74.54), ("VPT-shallow", ("vpt_shallow",), 66.05),
                          ("VPT-deep", ("vpt_deep",), 73.40), ("SSF", ("ssf",), 75.12),
                          ("FacT-TT", ("fact_tt",), 75.94), ("FacT-TK", ("fact_tk",), 75.70),
                          ("Convpass", ("convpass",), 76.35), ("RepAdapter", ("repadapter",), 75.76),
                          ("LoRA", ("lora",), 75.24))
]

# -- Vim-S: baselines-vim.md §4 (MambaPEFT's table), protocols §1, §3.9, §6 -------------------
MP_PROTOCOL = "one run (no seed), last epoch tested once; settings chosen by test accuracy (UNCONFIRMED)"
MP_HYBRID = "TPE search on the mean test accuracy of 5 tasks; last epoch, one run"
MP_RECIPE = "MambaPEFT (AdamW 1e-3/1e-4, batch 32, 100 epochs, ImageNet mean/std, 100-way head)"
_VIM = [  # method, our configs, Params (K), Nat, Spe, Str, Avg (19-task mean), G3
    ("Scratch", (), 25450, 8.33, 49.87, 28.16, 25.42, 28.79),
    ("Full", ("full",), 25450, 59.35, 68.74, 34.39, 47.08, 54.16),
    ("Linear probing", ("linear",), 9, 62.50, 77.25, 31.97, 52.75, 57.24),
    ("CLS-token-tuning", ("vim_cls_tuning",), 9, 62.50, 77.20, 32.20, 52.84, 57.30),
    ("Pos-embed-tuning", ("vim_pos_tuning",), 84, 64.25, 74.60, 39.77, 56.12, 59.54),
    ("Bias-tuning", ("vim_bias_tuning",), 37, 68.94, 79.16, 45.05, 61.03, 64.38),
    ("D-tuning", ("vim_d_tuning",), 45, 67.14, 78.56, 40.10, 58.16, 61.93),
    ("A-tuning", ("vim_a_tuning",), 598, 72.01, 80.72, 49.59, 64.40, 67.44),
    ("Conv1d-tuning", ("vim_conv1d_tuning",), 156, 74.33, 82.45, 57.83, 69.09, 71.54),
    ("Prompt-tuning (w/o proj)", ("vim_prompt",), 12, 69.92, 79.20, 47.75, 62.54, 65.62),
    ("Prompt-tuning", ("vim_prompt_proj",), 307, 63.19, 77.88, 35.82, 54.76, 58.96),
    ("Affix-tuning (w/o proj)", ("vim_affix",), 230, 63.90, 77.66, 34.21, 54.30, 58.59),
    ("Affix-tuning", ("vim_affix_proj",), 117000, 75.84, 83.29, 58.94, 70.29, 72.69),
    ("Additional-scan", ("vim_additional_scan",), 672, 74.63, 82.68, 56.40, 68.65, 71.24),
    ("ParallelAdapter", ("vim_parallel_adapter",), 663, 76.10, 83.97, 59.97, 70.96, 73.35),
    ("LoRA(embed)", ("vim_lora_embed",), 45, 64.66, 77.53, 43.83, 58.60, 62.01),
    ("LoRA(x_proj)", ("vim_lora_x_proj",), 2540, 74.41, 81.92, 54.88, 67.77, 70.40),
    ("LoRA(dt_proj)", ("vim_lora_dt",), 2442, 75.35, 83.05, 57.12, 69.30, 71.84),
    ("LoRA(out_proj)", ("vim_lora_out_proj",), 2663, 76.42, 83.96, 60.08, 71.12, 73.49),
    ("LoRA(in_proj)", ("vim_lora_in_proj",), 1483, 76.58, 84.08, 60.16, 71.25, 73.61),
    ("LoRAp(d)", ("vim_lorap_d",), 2442, 73.25, 80.91, 50.93, 65.46, 68.36),
    ("LoRAp(C)", ("vim_lorap_c",), 2417, 72.78, 81.57, 51.35, 65.61, 68.57),
    ("LoRAp(B)", ("vim_lorap_b",), 2417, 72.95, 81.66, 52.26, 66.07, 68.96),
    ("LoRAp(Z)", ("vim_lorap_z",), 1778, 76.15, 84.26, 59.72, 70.94, 73.38),
    ("LoRAp(X)", ("vim_lorap_x",), 1778, 76.64, 83.89, 60.84, 71.52, 73.79),
    ("All (w/ proj)", (), 119765, 74.67, 82.96, 53.92, 67.68, 70.52),
    ("Hybrid (w/ proj)", ("vim_hybrid",), 117236, 77.00, 84.41, 61.55, 72.05, 74.32),
    ("Hybrid (w/o proj)", (), 1044, 76.85, 84.42, 61.06, 71.80, 74.11),
]
# The Full row's Avg (47.08) is not its 19-task mean (50.82): a TAB inconsistency (spec §4 note 1).
VIM_AVG_INCONSISTENT = ("Full",)
VIM = [Published(m, cfg, "vim", "MambaPEFT (ICLR 2025) Vim-S table",
                 MP_HYBRID if m.startswith("Hybrid") else MP_PROTOCOL, MP_RECIPE, groups=(n, s, st), gw=g3, mean19=avg, reported=f"{avg:.2f} (Avg, 19-task mean)",
                 params_m=k / 1000)
       for m, cfg, k, n, s, st, avg, g3 in _VIM]
PUBLISHED = {"vit": VIT, "vim": VIM}


def published(backbone: str) -> list[Published]:
    if backbone not in PUBLISHED:
        raise UserError(f"--published takes one of {', '.join(BACKBONES)}, got '{backbone}'")
    return PUBLISHED[backbone]


# -- ours ----------------------------------------------------------------------------------
PROTOCOL_LABEL = {
    "final": "ours, clean protocol: chosen on val200 (trained on train800), retrained on train800val200, "
             "test once after the last epoch",
    "paper": "ours, paper protocol: best of test every {every} epochs (selects on test)",
}


@dataclass
class Ours:
    label: str
    method_id: str
    protocol: str
    recipe: str
    seeds: list
    cells: dict = field(default_factory=dict)      # task -> (mean, std, n)
    summary: dict = field(default_factory=dict)    # group / GW / MEAN19 -> (mean, std or nan, n_tasks, n_seeds)
    params_m: float = math.nan


def _family(identity: dict) -> str:
    bb = identity.get("backbone") or {}
    fam = bb.get("family") if isinstance(bb, dict) else None
    return fam or ("vim" if "vim" in str(bb.get("name", bb) if isinstance(bb, dict) else bb) else "vit")


def _aggregates(values: dict) -> dict:
    """task -> accuracy (some tasks) -> group means, GW, 19-task mean over the tasks present."""
    out = {}
    gm = []
    for g in GROUPS:
        have = [values[t] for t in VTAB_TASKS if TASKS[t].group == g and t in values]
        if have:
            out[g] = statistics.fmean(have)
            gm.append(out[g])
    if len(gm) == len(GROUPS):
        out[GW] = statistics.fmean(gm)
    if values:
        out[MEAN19] = statistics.fmean(values.values())
    return out


def ours(runs: pd.DataFrame, backbone: str, protocol: str = "final") -> list[Ours]:
    """Our VTAB-1k rows on ``backbone`` (vit | vim) from ``load_runs`` output."""
    from results.tables import build_tables
    if runs.empty:
        return []
    by_dir = runs.set_index("run_dir")
    out = []
    for t in build_tables(runs, protocol):
        if not t.title.startswith("VTAB-1k"):
            continue
        for r in t.rows:
            cells = {task: c for task, c in r.cells.items() if not math.isnan(c["mean"])}
            if not cells:
                continue
            first = by_dir.loc[next(iter(cells.values()))["run_dirs"][0]]
            if _family(first["identity"]) != backbone:
                continue
            per_seed = {}   # seed -> task -> accuracy
            for task, c in cells.items():
                metric = c["metric"]
                for s, d in zip(c["seeds"], c["run_dirs"]):
                    per_seed.setdefault(s, {})[task] = float(by_dir.at[d, metric])
            means = _aggregates({task: c["mean"] for task, c in cells.items()})
            same = len({frozenset(v) for v in per_seed.values()}) == 1   # every seed ran every task present
            seeds = sorted(per_seed)
            summary = {}
            for k, v in means.items():
                if same and len(seeds) > 1:
                    xs = [_aggregates(per_seed[s])[k] for s in seeds]
                    summary[k] = (statistics.fmean(xs), statistics.stdev(xs), len(cells), len(seeds))
                else:
                    summary[k] = (v, math.nan, len(cells), len(seeds) if same else 0)
            label = PROTOCOL_LABEL[protocol].format(every=first.get("eval_every")) if protocol in PROTOCOL_LABEL \
                else f"ours, protocol {protocol}"
            out.append(Ours(r.label.text, str(r.method_id), label, str(first["recipe"]), seeds,
                            {task: (c["mean"], c["std"], c["n"]) for task, c in cells.items()}, summary, r.params))
    return out


# -- the table -----------------------------------------------------------------------------
@dataclass
class Line:
    kind: str          # published | ours
    method: str        # display name
    config: str        # our method config ('' when none)
    source: str
    protocol: str
    recipe: str
    cells: dict        # task -> text
    summary: dict      # column -> text
    values: dict       # column -> number (for the CSV)
    params: str


def _f(v, d=2):
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _pm(mean, std, d):
    return _f(mean, d) + ("" if std is None or math.isnan(std) else f" ± {std:.{d}f}")


def _published_line(p: Published) -> Line:
    gw, m19 = p.means()
    g = p.group_means()
    values = {**({t: p.tasks[t] for t in VTAB_TASKS} if p.tasks else {}),
              **({x: y for x, y in zip(GROUPS, g)} if g else {}), GW: gw, MEAN19: m19}
    summary = {**{x: _f(values.get(x)) for x in GROUPS}, GW: _f(gw), MEAN19: _f(m19)}
    if p.method in VIM_AVG_INCONSISTENT:
        summary[MEAN19] += " (≠ its group means)"
    params = (f"{p.params_m:.3f}" if p.params_m is not None else MISSING) + (f" ({p.params_note})" if p.params_note
                                                                              else "")
    return Line("published", p.method, ", ".join(p.configs), f"{p.source}; reported {p.reported}", p.protocol,
                p.recipe, {t: _f(p.tasks[t], 1) for t in VTAB_TASKS} if p.tasks else {}, summary, values, params)


def _ours_line(o: Ours, decimals: int) -> Line:
    cells = {t: _pm(m, s, decimals) + ("" if n == len(o.seeds) else f" (n={n})") for t, (m, s, n) in o.cells.items()}
    summary, values = {}, {t: m for t, (m, _, _) in o.cells.items()}
    for k, (m, s, n_tasks, n_seeds) in o.summary.items():
        need = [t for t in VTAB_TASKS if k not in GROUPS or TASKS[t].group == k]
        full = all(t in o.cells for t in need)
        summary[k] = _pm(m, s, 2) + ("" if full else "*")
        values[k] = m
        values[f"{k} std"] = s
    seeds = ",".join(map(str, o.seeds))
    return Line("ours", o.label, o.method_id, f"run directories (seeds {seeds})", o.protocol, o.recipe, cells,
                summary, values, _f(o.params_m, 3) + " (19-task average)")


@dataclass
class PublishedTable:
    backbone: str
    lines: list
    caption: str
    footnotes: list

    def frame(self) -> pd.DataFrame:
        recs = []
        for ln in self.lines:
            recs.append({"kind": ln.kind, "method": ln.method, "config": ln.config, "source": ln.source,
                         "selection protocol": ln.protocol, "recipe": ln.recipe, **ln.values, "params": ln.params})
        return pd.DataFrame(recs)

    def to_markdown(self) -> str:
        from results.tables import DISPLAY

        def esc(s):
            return str(s).replace("|", "\\|")
        cols = [*GROUPS, GW, MEAN19]
        head = ["", "Method", "Selection protocol", "Recipe", *(DISPLAY[t] for t in VTAB_TASKS),
                *(c.capitalize() if c in GROUPS else c for c in cols), "Params(M)", "Source"]
        name = {"vit": "ViT-B/16 (ImageNet-21k)", "vim": "Vim-S"}[self.backbone]
        lines = [f"### VTAB-1k, {name}: published numbers beside ours", "", self.caption, "",
                 "| " + " | ".join(head) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * (len(head) - 5) + [":---"])
                 + "|"]
        for ln in self.lines:
            row = [ln.kind, ln.method, ln.protocol, ln.recipe, *(ln.cells.get(t, MISSING) for t in VTAB_TASKS),
                   *(ln.summary.get(c, MISSING) for c in cols), ln.params, ln.source]
            lines.append("| " + " | ".join(map(esc, row)) + " |")
        lines += [""] + [f"- {f}" for f in self.footnotes]
        return "\n".join(lines) + "\n"


def build(backbone: str, runs: pd.DataFrame | None = None, protocol: str = "final", decimals: int = 1,
          order: list | None = None) -> PublishedTable:
    """Published rows of ``backbone`` with ours beside them (method by method), then ours without
    a published row. ``order``: method configs in the order to show (default: the published order)."""
    pubs = published(backbone)
    mine = ours(runs, backbone, protocol) if runs is not None else []
    configs = list(dict.fromkeys([*(order or []), *(c for p in pubs for c in p.configs), *(o.method_id for o in mine)]))
    lines, shown = [], set()
    for cfg in configs:
        for p in pubs:
            if cfg in p.configs and id(p) not in shown:
                lines.append(_published_line(p))
                shown.add(id(p))
        lines += [_ours_line(o, decimals) for o in mine if o.method_id == cfg]
    lines += [_published_line(p) for p in pubs if id(p) not in shown]   # no config of ours
    cap = {"vit": "Published: baselines-vit.md §12 (per-task rows as printed; GW and 19-task mean recomputed from "
                  "them, equal to the stated means to rounding) with each author's selection protocol (§13). ",
           "vim": "Published: MambaPEFT's Vim-S table (baselines-vim.md §4): group means, Avg = the 19-task mean, "
                  "GW = mean of the three group means (Lily's convention); per-task numbers were not published. "}
    caption = (cap[backbone] + "Ours: per task the mean ± sample std over seeds of the selected configuration; "
               "group means, GW and the 19-task mean as mean ± std over seeds of each seed's own means. "
               "Params(M): trainable parameters without the head; ours averaged over the 19 tasks.")
    notes = ["GW = (Natural mean + Specialized mean + Structured mean) / 3; 19-task mean = plain mean over the 19 "
             "tasks. The two differ by 2-3.5 points: compare like with like.",
             "* mean over the tasks present only (incomplete row).",
             "Selection protocols differ: rows that select on the test set (best-of-test, max over epochs, a test "
             "search) are optimistic against the clean protocol, which never sees test before its one evaluation."]
    if backbone == "vim":
        notes.append("Params(M) of MambaPEFT's rows: its #Params (K) as printed / 1000, which includes a ≈8.5K "
                     "head term for most rows (baselines-vim.md §4).")
        notes.append("Our vim_hybrid is MambaPEFT's released step-2 template (configs/method/vim_hybrid.yaml), "
                     "placed beside the paper's Hybrid (w/ proj) row, whose final settings are unreleased.")
        notes.append("MambaPEFT's head is 100-way for every task (sun397 has 397 classes); its Full row's Avg "
                     "does not equal its 19-task mean (50.82).")
    if not mine:
        notes.append(f"Ours: no finished run of protocol {protocol} on this backbone.")
    return PublishedTable(backbone, lines, caption, notes)


def write(table: PublishedTable, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"published_{table.backbone}.md", out / f"published_{table.backbone}.csv"
    md.write_text(table.to_markdown())
    table.frame().to_csv(csv, index=False)
    return [md, csv]


def main(argv=None) -> PublishedTable:
    """``collect_results.py --published vit|vim``: the table, printed and written."""
    import argparse
    import sys

    from results.runs import load_runs, where
    ap = argparse.ArgumentParser(description="Published VTAB-1k numbers beside ours (results/published.py).")
    ap.add_argument("--published", required=True, choices=BACKBONES, help="which backbone's published table")
    ap.add_argument("--runs", type=Path, default=None, help="folder of run directories (default outputs/runs; "
                                                            "none there: the published rows alone)")
    ap.add_argument("--protocol", choices=("final", "paper"), default="final",
                    help="which of our runs: final (the clean protocol's stage 2, default) or paper")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <runs>/../tables)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2",
                    help="only runs whose identity has one of these values (repeatable)")
    ap.add_argument("--decimals", type=int, default=1)
    args = ap.parse_args(argv)
    runs_dir = args.runs or Path("outputs/runs")
    if args.runs is not None and not args.runs.is_dir():
        sys.exit(f"error: {args.runs} is not a folder (pass --runs <output_dir>/runs)")
    try:
        runs = where(load_runs(runs_dir), args.where) if runs_dir.is_dir() else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        from results.search_space import field_methods
        order = field_methods([f"experiment=field_{args.published}"])
    except UserError:
        order = None
    table = build(args.published, runs, args.protocol, args.decimals, order)
    if runs is None:
        table.footnotes.append(f"No run folder {runs_dir}: the published rows only.")
    paths = write(table, args.out or runs_dir.parent / "tables")
    print(table.to_markdown())
    print(f"wrote {', '.join(map(str, paths))}")
    return table
