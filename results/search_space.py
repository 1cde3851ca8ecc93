"""Each method searched on its own grid: a method config's ``search:`` -> Hydra sweep overrides.

A method config (``configs/method/<name>.yaml``) names its own search space for the clean
protocol as a meta key (lily/registry.py META_KEYS)::

    search:
      method.prompt_length: [1, 10, 50]
      optim.lr: [1e-3, 1e-2]

``clean_protocol.py experiment=field_vit --search-space method`` then runs stage 1 as one
``train.py -m`` invocation per method, each with that method's own grid: the grids of two
methods are never multiplied together (VPT's prompt lengths are not tried on LoRA, and LoRA's
scales not on VPT). Everything else on the command line (tasks, seeds, launcher, the experiment's
own sweep over tasks) is shared by every invocation.

Pure functions, no training: :func:`method_search` reads one config's space, :func:`sweep_overrides`
writes it as Hydra sweep overrides, :func:`field_methods` finds the methods a command line runs
(its ``method=`` override, else the experiment's ``hydra.sweeper.params.method``), and
:func:`stage1_invocations` puts them together after :func:`validate` checked, before anything
runs, that every searched key exists in the composed config of its method and is not also set
on the command line or swept by the experiment.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

from common.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEARCH_KEY = "search"
MODES = ("grid", "method")   # --search-space: grid = the command line's own sweep (cartesian) | method
# Keys that say what runs, not how: never a hyper-parameter of a method's search space.
NOT_SEARCHABLE = ("task", "method", "backbone", "seed", "protocol", "experiment", "sweep", "recipe", "hydra",
                  "paths", "logger")
NOT_SEARCHABLE_UNDER = ("task", "protocol", "experiment", "sweep", "hydra", "paths", "logger")
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")


@dataclass(frozen=True)
class Invocation:
    """One stage-1 ``train.py -m`` command: one method with its own grid."""
    method: str
    space: dict             # key -> list of values (empty: the method's config values only)
    overrides: list         # the train.py overrides (without protocol=search)

    @property
    def n_points(self) -> int:
        return math.prod(len(v) for v in self.space.values()) if self.space else 1


# -- one method's space ---------------------------------------------------------------------
def method_search(method: str, configs: Path = CONFIGS) -> dict[str, list]:
    """The ``search:`` mapping of ``configs/method/<method>.yaml`` as {dotted key: [values]}.

    A config without ``search:`` has an empty space (it runs at its own values). A malformed
    space is a UserError naming the method and the key.
    """
    path = Path(configs) / "method" / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(configs) / "method").glob("*.yaml"))
        raise UserError(f"method '{method}' has no config {path}; known methods: {', '.join(known)}")
    node = OmegaConf.load(path).get(SEARCH_KEY)
    if node is None:
        return {}
    space = OmegaConf.to_container(node, resolve=False)
    if not isinstance(space, dict):
        raise UserError(f"{path}: '{SEARCH_KEY}:' must map override keys to lists of values "
                        f"(e.g. optim.lr: [1e-3, 1e-2]), got {space!r}")
    out = {}
    for key, values in space.items():
        where = f"{path}: {SEARCH_KEY}.{key}"
        if not isinstance(key, str) or key in NOT_SEARCHABLE or key.split(".")[0] in NOT_SEARCHABLE_UNDER:
            raise UserError(f"{where}: '{key}' is not a hyper-parameter (searchable keys lie under method., "
                            f"optim., or are top-level settings other than {', '.join(NOT_SEARCHABLE)})")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: the values must be a non-empty list (e.g. [1e-3, 1e-2]), got {values!r}")
        if any(isinstance(v, str) and "${" in v for v in values):
            raise UserError(f"{where}: interpolations are not searchable values, got {values!r}")
        if len({_fmt(v) for v in values}) < len(values):
            raise UserError(f"{where}: repeated value in {values!r}")
        out[key] = values
    return out


def _fmt(v: Any) -> str:
    """One value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return v if _PLAIN.match(v) and v.lower() not in ("null", "true", "false", "nan", "inf") else \
            "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    raise UserError(f"cannot write {v!r} ({type(v).__name__}) as a Hydra override value")


def sweep_overrides(space: Mapping[str, list]) -> list[str]:
    """``{"optim.lr": [1e-3, 1e-2]}`` -> ``["optim.lr=0.001,0.01"]``; one value: a plain override;
    list or mapping values: ``key=choice([..],[..])``."""
    out = []
    for key, values in space.items():
        text = [_fmt(v) for v in values]
        if len(text) == 1:
            out.append(f"{key}={text[0]}")
        elif any(isinstance(v, (list, tuple, Mapping)) for v in values):
            out.append(f"{key}=choice({','.join(text)})")
        else:
            out.append(f"{key}={','.join(text)}")
    return out


# -- which methods a command line runs -----------------------------------------------------
def _parse(overrides: Iterable[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's parse error, as one message
        raise UserError(f"cannot parse the overrides {list(overrides)}: {e}") from None


def _values(o) -> list[str]:
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


def _fixed(overrides: list[str]) -> list[str]:
    """The command line for a compose: sweeps reduced to their first value, Hydra's own keys dropped."""
    out = []
    for text, o in zip(overrides, _parse(overrides)):
        if o.is_hydra_override():
            continue
        out.append(f"{o.get_key_element()}={_values(o)[0]}" if o.is_sweep_override() else text)
    return out


def compose(overrides: list[str], configs: Path = CONFIGS):
    """The train config (with its ``hydra`` node) for ``overrides`` (no sweeps), unresolved."""
    return compose_many([overrides], configs)[0]


def compose_many(overrides_list: list[list[str]], configs: Path = CONFIGS) -> list:
    """:func:`compose` for several command lines, Hydra initialised once."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    out, overrides = [], []
    try:
        with initialize_config_dir(config_dir=str(Path(configs).resolve()), version_base="1.3"):
            for overrides in overrides_list:
                out.append(hydra_compose("train", overrides=list(overrides), return_hydra_config=True))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"the configuration {' '.join(overrides)} does not compose: "
                        f"{str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    return out


def field_methods(overrides: list[str], configs: Path = CONFIGS) -> list[str]:
    """The methods a command line runs: its ``method=`` override (one or a sweep), else the
    experiment's ``hydra.sweeper.params.method``, else the config's default method."""
    for o in _parse(overrides):
        if o.key_or_group == "method" and not o.is_hydra_override():
            return list(dict.fromkeys(_values(o)))
    cfg = compose(_fixed(overrides), configs)
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    if params.get("method") is not None:
        return list(dict.fromkeys(_values(_parse([f"method={params['method']}"])[0])))
    return [str(cfg.hydra.runtime.choices.method)]


def _has_key(cfg, key: str) -> bool:
    node = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def validate(overrides: list[str], spaces: Mapping[str, Mapping[str, list]], configs: Path = CONFIGS) -> None:
    """Before stage 1: every searched key exists in its method's composed config (a typo would
    otherwise fail hundreds of jobs, or silently search nothing), and none is also set on the
    command line or swept by the experiment (which value would win is not what the user meant)."""
    given = {o.key_or_group: text for text, o in zip(overrides, _parse(overrides)) if not o.is_hydra_override()}
    base = [o for o in _fixed(overrides) if _parse([o])[0].key_or_group != "method"]
    problems = []
    cfgs = compose_many([[*base, f"method={method}"] for method in spaces], configs)
    for (method, space), cfg in zip(spaces.items(), cfgs):
        swept = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        for key in space:
            if key in given:
                problems.append(f"{method}: '{key}' is searched by the method's config and also set on the command "
                                f"line ({given[key]}); remove one")
            elif key in swept:
                problems.append(f"{method}: '{key}' is searched by the method's config and also swept by the "
                                f"experiment (hydra.sweeper.params.{key}); remove one")
            elif not _has_key(cfg, key):
                problems.append(f"{method}: unknown search key '{key}' (configs/method/{method}.yaml "
                                f"{SEARCH_KEY}:): no such key in its composed config")
    if problems:
        raise UserError("the methods' search spaces cannot run:\n  " + "\n  ".join(problems))


def stage1_invocations(overrides: list[str], configs: Path = CONFIGS, check: bool = True) -> list[Invocation]:
    """One stage-1 invocation per method of the command line, each sweeping only its own grid.

    ``overrides``: the train.py overrides of the clean-protocol command line (``experiment=``,
    ``task=``, ``seed=``, ``hydra/launcher=``...; no ``protocol``). The ``method=`` override (if
    any) is replaced by one method per invocation; the rest is kept as given.
    """
    methods = field_methods(overrides, configs)
    spaces = {m: method_search(m, configs) for m in methods}
    if check:
        validate(overrides, spaces, configs)
    rest = [text for text, o in zip(overrides, _parse(overrides)) if o.key_or_group != "method"
            or o.is_hydra_override()]
    return [Invocation(m, spaces[m], [*rest, f"method={m}", *sweep_overrides(spaces[m])]) for m in methods]


def describe(invocations: list[Invocation]) -> str:
    """A few lines: per method its grid and its number of grid points."""
    lines = []
    for inv in invocations:
        grid = "; ".join(f"{k} in {v}" for k, v in inv.space.items()) or "no search: key (its config's values only)"
        lines.append(f"  {inv.method}: {inv.n_points} grid point{'s' if inv.n_points != 1 else ''} ({grid})")
    total = sum(i.n_points for i in invocations)
    return f"{len(invocations)} method(s), {total} grid points per task and seed in all:\n" + "\n".join(lines)
