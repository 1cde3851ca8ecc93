"""Readable row labels for variants: the paper's names, derived from the method's values.

- ViT Lily: ``Lily (<placement>)`` with the placement the targets in the order q, k, v, ffn
  (``Lily (kvffn)``); ``routing: uniform`` (no router) is the monoscale ablation:
  ``Lily-mono (kvffn)``. With an LP expert bank (``lp_experts``, Lily v2): ``Lily v2 (kvffn)``.
- Vim Lily (targets in_proj and delta): ``Lily_<N_e>^{<delta rank>,<in_proj rank>}``, where
  N_e is in_proj's; when N_e is searched, ``Lily_{≤<largest N_e searched>}^{m,n}`` (paper
  Table 2). ``lp_stride.in_proj: 0`` (one model-shared in_proj LP) is ``DeltaFit_<delta rank>``;
  N_e 1 otherwise is ``DeltaInFit`` (ranks appended when not the paper's 4 and 1).
- LoRA: ``LoRA (r=<rank>)`` on ViT, ``Lily_0^{m,n}`` on Vim targets (the Table 3 ablation).
- ``AdaptFormer``, ``Linear``, ``Full``; anything else: its method config name.

When two variants of one table get the same label, each gets the identity values that
tell them apart appended: ``Lily (kvffn) [routing=sample]``.
"""
from __future__ import annotations

from dataclasses import dataclass

VIT_ORDER = ("q", "k", "v", "ffn")
VIM_TARGETS = ("in_proj", "delta")
# Row order in a table: baselines first, then the Lily family (as the paper's tables).
KIND_ORDER = ("full", "linear", "lora", "adaptformer", "deltafit", "deltainfit", "lily0", "lily-mono", "lily")
PLACEMENT_ORDER = ("ffn", "qv", "qvffn", "kvffn")


@dataclass(frozen=True)
class Label:
    text: str    # Markdown / CSV
    latex: str   # LaTeX (math for sub- and superscripts)
    kind: str = ""
    placement: str = ""

    def suffixed(self, extra: str) -> "Label":
        return Label(f"{self.text} [{extra}]", f"{self.latex} [{latex_escape(extra)}]", self.kind, self.placement)

    def sort_key(self):
        k = KIND_ORDER.index(self.kind) if self.kind in KIND_ORDER else len(KIND_ORDER)
        p = PLACEMENT_ORDER.index(self.placement) if self.placement in PLACEMENT_ORDER else len(PLACEMENT_ORDER)
        return (k, p, self.text)


def latex_escape(s: str) -> str:
    out = []
    for ch in str(s):
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "≤": r"$\leq$", "±": r"$\pm$", "–": "--"}.get(ch, ch))
    return "".join(out)


def _per(value, target):
    """A per-target value: ``{in_proj: 8, delta: 4}['delta']`` or the scalar itself."""
    return value.get(target) if isinstance(value, dict) else value


def _one(value):
    """A dict whose values are all equal -> that value; otherwise the dict as ``q16+v32``."""
    if isinstance(value, dict):
        vals = set(map(str, value.values()))
        return next(iter(value.values())) if len(vals) == 1 else "+".join(f"{k}{v}" for k, v in value.items())
    return value


def _script(name: str, sub=None, sup=None, kind: str = "") -> Label:
    text, latex = name, latex_escape(name)
    math = ""
    if sub is not None:
        s = str(sub)
        text += f"_{s}" if len(s) == 1 else f"_{{{s}}}"
        math += "_{" + s.replace("≤", r"\leq ") + "}"
    if sup is not None:
        text += f"^{{{sup}}}"
        math += "^{" + str(sup) + "}"
    return Label(text, latex + (f"${math}$" if math else ""), kind)


def method_label(identity: dict, grids=(), method_id: str | None = None) -> Label:
    """The label of a variant from its (nested) identity; ``grids``: its searched grid points
    (tuples of (dotted key, value)), used for the ``≤ max N_e`` of Vim Lily."""
    m = identity.get("method") or {}
    name = m.get("name")
    targets = list(m.get("targets") or [])
    vim = any(t in VIM_TARGETS for t in targets)
    if name == "lily" and vim:
        rd, ri = _per(m.get("rank"), "delta"), _per(m.get("rank"), "in_proj")
        ne = _per(m.get("ne"), "in_proj")
        searched_ne = sorted({v for g in grids for k, v in g if k in ("method.ne", "method.ne.in_proj")
                              and isinstance(v, (int, float))})
        if _per(m.get("lp_stride"), "in_proj") == 0:
            return _script("DeltaFit", rd, kind="deltafit")
        if ne == 1 and not searched_ne:
            return _script("DeltaInFit", sup=None if (rd, ri) == (4, 1) else f"{rd},{ri}", kind="deltainfit")
        sub = f"≤{searched_ne[-1]:g}" if len(searched_ne) > 1 else (searched_ne[0] if searched_ne else ne)
        return _script("Lily", sub, f"{rd},{ri}", kind="lily")
    if name == "lily":
        placement = "".join(t for t in VIT_ORDER if t in targets) + "".join(t for t in targets if t not in VIT_ORDER)
        routing = m.get("routing")
        mono = all(r == "uniform" for r in (routing.values() if isinstance(routing, dict) else [routing]))
        base = ("Lily v2" if m.get("lp_experts") else "Lily") + ("-mono" if mono else "")
        return Label(f"{base} ({placement})", f"{base} ({latex_escape(placement)})",
                     "lily-mono" if mono else "lily", placement)
    if name == "lora" and vim:
        lab = _script("Lily", 0, f"{_per(m.get('rank'), 'delta')},{_per(m.get('rank'), 'in_proj')}")
        return Label(lab.text, lab.latex, "lily0")
    if name == "lora":
        return Label(f"LoRA (r={_one(m.get('rank'))})", f"LoRA (r={latex_escape(_one(m.get('rank')))})", "lora")
    fixed = {"adaptformer": "AdaptFormer", "linear": "Linear", "full": "Full"}
    if name in fixed:
        return Label(fixed[name], fixed[name], name)
    field = field_label(m, method_id)
    if field is not None:
        return Label(field, latex_escape(field), name)
    text = str(method_id or name or "?")
    return Label(text, latex_escape(text), text)


def field_label(m: dict, method_id: str | None = None) -> str | None:
    """A registered method's own row label (``lily.Method.label``: each method names itself in its
    module), or None for a name the registry does not know."""
    import lily
    try:
        method = lily.get_method(m.get("name"))
    except lily.LilyConfigError:
        return None
    return method.label(m, method_id)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "+".join(map(_fmt, v))
    return str(v)


def unique_labels(labels: dict[str, Label], items: dict[str, dict]) -> dict[str, Label]:
    """Labels that two variants share get the identity values that differ between them."""
    out = dict(labels)
    by_text: dict[str, list[str]] = {}
    for vid, lab in labels.items():
        by_text.setdefault(lab.text, []).append(vid)
    for group in by_text.values():
        if len(group) < 2:
            continue
        keys = sorted({k for v in group for k in items[v]})
        diff = [k for k in keys if len({repr(items[v].get(k)) for v in group}) > 1]
        short = [k.split(".", 1)[-1] for k in diff]  # without the group: routing, epochs, ne.in_proj
        names = [s if short.count(s) == 1 else k for k, s in zip(diff, short)]
        for vid in group:
            extra = ", ".join(f"{n}={_fmt(items[vid].get(k))}" for k, n in zip(diff, names)) or vid
            out[vid] = labels[vid].suffixed(extra)
    return out
