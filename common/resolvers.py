"""OmegaConf resolvers every entry point shares (registered on import of ``common``).

``${by_task:{cifar: 10, dtd: 10, ..., default: 5}}``: the value for the run's task
(``task.name``; a ``default`` entry covers tasks the table lacks). A method's config uses it for
its authors' per-task settings (VPT-deep prompt length, FacT rank and scale, ...); a
command-line override of the key wins, and the resolved value is part of the run's identity.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from .errors import UserError


def by_task(table, *, _root_):
    task = _root_.get("task", {}).get("name") if hasattr(_root_, "get") else None
    if task is None:
        raise UserError("${by_task:...} needs task.name in the config")
    if task in table:
        return table[task]
    if "default" in table:
        return table["default"]
    raise UserError(f"no per-task value for task '{task}' in {dict(table)} (give the value on the command line, "
                    "or add the task to the method's table)")


def per_task_keys(raw: dict, skip=()) -> list[str]:
    """Dotted keys of an *unresolved* config container whose value is chosen per task: written with
    ``${by_task:...}``, or an interpolation of such a key (``optim.lr: ${oc.select:method.optim.lr,...}``).
    A run records them (results.json ``per_task``) so that tables treat them as chosen per task,
    like searched keys, instead of splitting one method into a row per task."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                if not prefix and k in skip:
                    continue
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, str) and "${" in node:
            flat[prefix[:-1]] = node
    walk(raw, "")
    keys = {k for k, v in flat.items() if "${by_task:" in v}
    grown = True
    while grown:
        more = {k for k, v in flat.items() if k not in keys and any(p in v for p in keys)}
        keys |= more
        grown = bool(more)
    return sorted(keys)


if not OmegaConf.has_resolver("by_task"):
    OmegaConf.register_new_resolver("by_task", by_task)
