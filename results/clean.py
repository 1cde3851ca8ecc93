"""The clean protocol in one command: search on val200, write the choice down, retrain, test once.

    python scripts/clean_protocol.py <train.py overrides> [--seeds 42,43,44] [--search keys]
                                     [--search-space grid|method] [--out DIR]
    e.g. python scripts/clean_protocol.py task=dtd,eurosat method=lily_kvffn sweep=ne_scale hydra/launcher=joblib

1. Stage 1: ``python train.py -m protocol=search <overrides>``: every grid point trains on
   train800 and is evaluated on val200 only (the test set is never touched). With
   ``--search-space method`` (``experiment=field_vit``), stage 1 is one such command per method,
   each sweeping that method's own ``search:`` grid from its config (results/search_space.py:
   keys checked before anything trains; the methods' grids are never multiplied together).
2. Selection: per (variant, task) the grid point with the highest final val200 accuracy (mean
   over seeds if several), as ``collect_results.py --protocol search`` selects (results/tables.py).
3. The choice of each task is written as a Hydra experiment file that train.py runs directly:
   ``<output_dir>/chosen/experiment/<variant>/<task>.yaml`` (``# @package _global_``), holding
   the selected job's own overrides (task, method, the chosen searched values, and everything
   else given on the command line; an ``experiment=`` given is included first), minus
   ``protocol``, ``seed`` and ``sweep``. Run one by hand with
   ``python train.py --config-dir <output_dir>/chosen experiment=<variant>/<task> protocol=final``.
4. Stage 2: ``python train.py -m --config-dir <output_dir>/chosen experiment=<all chosen>
   protocol=final seed=<seeds>`` through the same launcher: only the chosen configurations
   train, on train800val200, tested once after the last epoch.
5. The table (protocol final) of the stage-2 runs is printed and written to ``--out``.

Re-running the command resumes: train.py skips finished runs (a run's directory is a function
of its configuration), so a finished stage 1 costs nothing and stage 2 trains only what is
missing. Which jobs belong to this command comes from each stage's sweep ledger
(``<output_dir>/runs/.sweeps/<time>-<pid>.jsonl``, engine/sweep.py). ``paths.output_dir``
is read from the command line (default ``outputs``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from common.errors import UserError
from engine.run import DONE
from results import search_space
from results.runs import load_runs
from results.tables import build_tables, prepare, select, status_block, to_markdown, write

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DROP = ("protocol", "seed", "sweep")     # never pinned in a chosen experiment file
ENV_DROP = ("LILY_SWEPT_KEYS", "LILY_SWEEP_LEDGER", "LILY_SWEEP_BATCH")  # a parent sweep's, not ours


class CleanProtocolError(Exception):
    """A stage that did not complete or a command line this script cannot run."""


# -- the chosen experiment files ------------------------------------------------------------
def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create().parse_overrides(list(overrides))


def split_command_line(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(train overrides, hydra overrides: launcher, sweeper settings...) of the user's command line."""
    train, hydra = [], []
    for text, o in zip(overrides, _parse(overrides)):
        if o.is_hydra_override():
            hydra.append(text)
        elif o.key_or_group in ("protocol",):
            raise CleanProtocolError("protocol is set by this script (search, then final): remove 'protocol=' "
                                     "from the command line")
        else:
            train.append(text)
    return train, hydra


def chosen_experiment(overrides: list[str], note: list[str], configs: Path = CONFIGS) -> str:
    """A ``# @package _global_`` experiment file that reproduces a job from its overrides.

    Config-group overrides (``task=dtd``, ``method=lily_kvffn``, ``logger=none``) become
    ``override /group: option`` entries of the defaults list, an ``experiment=X`` the entry
    ``/experiment/X`` (first, so the others win over it); value overrides (``method.ne=4``)
    the body. ``protocol``, ``seed`` and ``sweep`` are left out, and ``hydra.sweeper.params``
    is emptied so an included experiment's grid does not sweep again.
    """
    include, defaults, body = [], [], {}
    for o in _parse(overrides):
        key = o.key_or_group
        if o.is_hydra_override() or key in DROP:
            continue
        if o.is_delete():
            raise CleanProtocolError(f"cannot write a deletion override ('~{key}') into an experiment file")
        value = o.value()
        if key == "experiment":
            include.append(f"/experiment/{value}")
        elif (configs / key).is_dir():
            pkg = f"@{o.package}" if o.package else ""
            defaults.append({f"{'' if o.is_add() else 'override '}/{key}{pkg}": value})
        else:
            node = body
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
    body.setdefault("hydra", {}).setdefault("sweeper", {})["params"] = None
    text = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*include, *defaults, "_self_"], **body}))
    return "# @package _global_\n" + "".join(f"# {line}\n" for line in note) + text


def _slugs(chosen: pd.DataFrame, first: pd.DataFrame) -> dict:
    """Variant -> folder name under chosen/experiment/: the method config name, made unique."""
    names = {v: str(first.at[v, "method_id"]) for v in chosen["variant"].unique()}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {v: (f"{n}-{v}" if n in clash else n) for v, n in names.items()}


def write_chosen(runs: pd.DataFrame, job_overrides: dict, chosen_root: Path, search=()) -> pd.DataFrame:
    """Select per (variant, task) on val200 and write one experiment file each.

    ``runs``: the stage-1 runs (load_runs); ``job_overrides``: run directory -> the overrides
    of the job that ran it (the sweep ledger). Returns one row per file with its name
    (``<variant>/<task>``), the chosen grid point and its val200 mean / std / n.
    """
    df, info, _ = prepare(runs, "search", search)
    if df.empty:
        raise CleanProtocolError("stage 1 produced no finished search run")
    chosen = select(df, "search")
    first = df.groupby("variant").first()
    slugs = _slugs(chosen, first)
    rows = []
    for _, c in chosen.iterrows():
        run_dir = next((d for d in c["run_dirs"] if str(Path(d).resolve()) in job_overrides), None)
        if run_dir is None:
            raise CleanProtocolError(f"no stage-1 job recorded for {c['run_dirs'][0]}")
        grid = dict(c["grid"])
        std = "" if pd.isna(c["std"]) else f" ± {c['std']:.2f}"
        note = [f"Chosen by scripts/clean_protocol.py on val200 (stage 1, protocol=search: train800 -> val200):",
                f"  {', '.join(f'{k}={v}' for k, v in grid.items()) or '(no searched key)'}: mean val200 accuracy "
                f"{c['mean']:.2f}{std} over {c['n']} seed(s), best of {c['n_grid']} grid point(s).",
                f"Run: python train.py --config-dir {chosen_root} experiment={slugs[c['variant']]}/{c['task']} "
                "protocol=final"]
        text = chosen_experiment(job_overrides[str(Path(run_dir).resolve())], note)
        path = chosen_root / "experiment" / slugs[c["variant"]] / f"{c['task']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:  # unchanged files keep their mtime
            path.write_text(text)
        rows.append({"experiment": f"{slugs[c['variant']]}/{c['task']}", "variant": c["variant"], "task": c["task"],
                     "grid": grid, "val_mean": c["mean"], "val_std": c["std"], "n": c["n"],
                     "n_grid": c["n_grid"], "run_dirs": ";".join(c["run_dirs"])})
    return pd.DataFrame(rows)


# -- running the stages ---------------------------------------------------------------------
def _ledger(runs_dir: Path, pid: int, since: float) -> Path | None:
    found = [p for p in (runs_dir / ".sweeps").glob(f"*-{pid}.jsonl") if p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_stage(name: str, cmd: list[str], runs_dir: Path) -> dict:
    """Run one ``train.py -m`` command; return {run_dir: overrides} of its jobs (all done)."""
    print(f"[clean protocol] {name}: {' '.join(cmd)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    start = time.time()
    proc = subprocess.Popen(cmd, env=env)
    rc = proc.wait()
    ledger = _ledger(runs_dir, proc.pid, start)
    if rc != 0:
        raise CleanProtocolError(f"{name} did not complete (exit code {rc}); fix what the summary above says and "
                                 "re-run the same command: finished runs are skipped")
    if ledger is None:
        raise CleanProtocolError(f"{name}: no sweep ledger of this command under {runs_dir / '.sweeps'}; set "
                                 "paths.output_dir on the command line (not in an experiment file)")
    from engine.sweep import read_ledger
    jobs, bad = {}, []
    for r in read_ledger(ledger):
        if r.get("event") != "end":
            continue
        if r.get("status") in DONE:
            jobs[str(Path(r["run_dir"]).resolve())] = list(r.get("overrides") or [])
        else:
            bad.append(f"{r.get('status')}: {r.get('run_dir')}")
    if bad:
        raise CleanProtocolError(f"{name}: {len(bad)} job(s) did not finish ({'; '.join(bad[:5])}); re-run the "
                                 "same command to resume them")
    return jobs


def _output_dir(train_overrides: list[str]) -> Path:
    for o in _parse(train_overrides):
        if o.key_or_group == "paths.output_dir" and not o.is_sweep_override():
            return Path(str(o.value())).expanduser().resolve()
    return Path("outputs").resolve()


def _seeds_from(train_overrides: list[str]) -> str | None:
    for text, o in zip(train_overrides, _parse(train_overrides)):
        if o.key_or_group == "seed":
            return text.split("=", 1)[1]
    return None


def check_seeds(seeds: str | None, where: str) -> None:
    """``42,43,44``: comma-separated integers >= 0 (a CleanProtocolError naming the bad one)."""
    if seeds is None:
        return
    for token in seeds.split(","):
        if not token.strip().isdigit():
            raise CleanProtocolError(f"{where} '{seeds}': '{token}' is not a seed; give comma-separated integers "
                                     ">= 0, e.g. --seeds 42,43,44")


def first_values(train_overrides: list[str]) -> list[str]:
    """The overrides with each sweep replaced by its first value: one job's command line."""
    out = []
    for text, o in zip(train_overrides, _parse(train_overrides)):
        if o.is_sweep_override():
            value = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={value}")
        else:
            out.append(text)
    return out


def check_command_line(train_overrides: list[str], search: list[str], seeds: str | None, out: Path | None) -> None:
    """Everything this command needs, checked before stage 1 trains anything: the overrides compose
    into a train.py config, every --search key exists in it, the stage-2 seeds are integers, --out
    is not a file."""
    check_seeds(seeds, "--seeds")
    check_seeds(_seeds_from(train_overrides), "seed=")
    if out is not None and out.exists() and not out.is_dir():
        raise CleanProtocolError(f"--out {out} is a file; give a folder for the tables")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    import engine.cli  # noqa: F401 - LILY_ROOT and the ${run_subdir:} resolver, as train.py has them
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=first_values(train_overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's own message names the bad override
        raise CleanProtocolError(f"the overrides do not compose into a train.py config: {e}") from None
    finally:
        GlobalHydra.instance().clear()
    missing = object()
    unknown = [k for k in search if OmegaConf.select(cfg, k, default=missing) is missing]
    if unknown:
        raise CleanProtocolError(f"--search {','.join(unknown)}: no such key in the configuration of this command "
                                 f"(keys are dotted config paths, e.g. method.scale or optim.lr)")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description="The clean protocol in one command (see results/clean.py).",
                                 usage="clean_protocol.py <train.py overrides> [--seeds 42,43,44] [--search keys] "
                                       "[--search-space grid|method] [--out DIR]")
    ap.add_argument("--seeds", default=None,
                    help="stage-2 seeds, comma-separated (default: the seed override of stage 1, else the config's)")
    ap.add_argument("--search", default="", help="extra searched keys, comma-separated (beyond the recorded sweep)")
    ap.add_argument("--out", type=Path, default=None, help="tables folder (default: <output_dir>/tables)")
    ap.add_argument("--search-space", choices=search_space.MODES, default="grid",
                    help="grid: stage 1 sweeps the command line's grid (default); method: one stage-1 sweep per "
                         "method over its own search: grid (results/search_space.py), never their product")
    args, overrides = ap.parse_known_args(argv)
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    unknown = [o for o in overrides if o.startswith("-")]
    try:
        if unknown:
            raise CleanProtocolError(f"unsupported option(s) {' '.join(unknown)} (config dirs: use experiment files "
                                     "under configs/experiment/)")
        train_overrides, hydra_overrides = split_command_line(overrides)
        base = _output_dir(train_overrides)
        runs_dir = base / "runs"
        chosen_root = base / "chosen"
        search = [s.strip() for s in args.search.split(",") if s.strip()]
        check_command_line(train_overrides, search, args.seeds, args.out)
        python = [sys.executable, str(REPO / "train.py"), "-m"]

        if args.search_space == "method":  # checked (keys, clashes) before anything trains
            try:
                invocations = search_space.stage1_invocations(train_overrides)
            except UserError as e:
                raise CleanProtocolError(str(e)) from None
            print(f"[clean protocol] stage 1 per method: {search_space.describe(invocations)}", flush=True)
            stage1 = {}
            for inv in invocations:
                stage1.update(run_stage(f"stage 1, {inv.method} (search: train800 -> val200)",
                                        [*python, *inv.overrides, *hydra_overrides, "protocol=search"], runs_dir))
        else:
            stage1 = run_stage("stage 1 (search: train800 -> val200)",
                               [*python, *overrides, "protocol=search"], runs_dir)
        runs1 = load_runs(runs_dir, run_dirs=stage1)
        chosen = write_chosen(runs1, stage1, chosen_root, search)
        chosen.to_csv(chosen_root / "selection.csv", index=False)
        print(f"[clean protocol] chose {len(chosen)} configuration(s) on val200: {chosen_root / 'experiment'}")
        for _, r in chosen.iterrows():
            print(f"  {r['experiment']}: {r['grid']} (val200 {r['val_mean']:.2f}, n={r['n']})")

        seeds = args.seeds or _seeds_from(train_overrides)
        stage2_cmd = [*python, "--config-dir", str(chosen_root), f"experiment={','.join(chosen['experiment'])}",
                      "protocol=final", *([f"seed={seeds}"] if seeds else []), *hydra_overrides]
        stage2 = run_stage("stage 2 (final: train800val200 -> test once)", stage2_cmd, runs_dir)

        out = args.out or base / "tables"
        searched = sorted({k for k in (r["grid"] for _, r in chosen.iterrows()) for k in k} | set(search))
        tables1 = build_tables(runs1, "search", searched)
        if tables1:
            write(tables1, "search", out, status_block(runs1, runs_dir))
        runs2 = load_runs(runs_dir, run_dirs=stage2)
        tables = build_tables(runs2, "final", searched)
        status = status_block(runs2, runs_dir)
        paths = write(tables, "final", out, status)
        print("\n".join(to_markdown(t) for t in tables))
        print(status)
        print(f"wrote {', '.join(map(str, paths))}")
        return tables
    except CleanProtocolError as e:
        sys.exit(f"error: {e}")
