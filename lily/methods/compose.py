"""Several registered methods in one model (MambaPEFT's Hybrid is one such composition).

    lily.adapt(model, {"name": "compose", "parts": [
        {"name": "vim_lora", "target": "out_proj", "rank": 4},
        {"name": "vim_lora", "target": "X", "rank": 4},
        {"name": "vim_delta_tuning", "param": "A"},
        {"name": "vim_token_tuning", "which": "cls"}]})

Each part is any registered method's config mapping (its own options, unknown keys named); the
parts are applied in order to the same frozen model. The model's trainable count is the sum of
the parts' counts (a part that would replace another part's trainable tensors is refused). Merge
merges every part when each part's method is mergeable, and otherwise refuses, naming the first
part that is not, before any weight changes. The compose options' ``head`` is the model's head; a
part's own ``head`` is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..errors import LilyConfigError, MergeError
from ..merging import safe_merge
from ..registry import Method, MethodOptions, get_method, register, registered


def _label(i: int, opts: MethodOptions) -> str:
    return f"part {i} ('{opts.name}')"


@dataclass
class ComposeOptions(MethodOptions):
    """``parts``: a list of method config mappings (each with a ``name``), applied in order."""
    name: str = "compose"
    parts: list = field(default_factory=list)

    def validate(self):
        if not isinstance(self.parts, (list, tuple)):
            raise LilyConfigError(f"method.parts must be a list of method configs, got {type(self.parts).__name__}")
        typed = []
        for i, part in enumerate(self.parts):
            if isinstance(part, MethodOptions):
                opts = part
            elif isinstance(part, Mapping):
                if "name" not in part:
                    raise LilyConfigError(f"method.parts[{i}] needs a 'name' (a registered method)")
                try:
                    opts = MethodOptions.from_dict(part)
                except LilyConfigError as e:
                    raise LilyConfigError(f"method.parts[{i}]: {e}") from None
            else:
                raise LilyConfigError(f"method.parts[{i}] must be a method config mapping, got {part!r}")
            typed.append(opts)
        self.__dict__["_typed"] = typed
        # normalised: every option of every part spelled out (stable identity); heads are the compose's
        self.parts = [{k: v for k, v in o.to_dict().items() if k != "head"} for o in typed]

    def typed_parts(self) -> list[MethodOptions]:
        return list(self.__dict__["_typed"])


@register
class Compose(Method):
    name = "compose"
    options = ComposeOptions
    # True: a composition merges when every part does (checked per part in merge(), which names
    # the first part that cannot)
    mergeable = True
    source = "MambaPEFT's Hybrid (Yoshimura et al., ICLR 2025): several PEFT methods in one model"

    @property
    def decay_mult(self) -> dict[str, float]:
        """The union of every registered method's per-parameter decay rules: their keys are
        substrings of each method's own parameter names, so only the parts present match."""
        out: dict[str, float] = {}
        for name, method in registered().items():
            if name != self.name:
                out.update(getattr(method, "decay_mult", None) or {})
        return out

    def label(self, opts, method_id=None):
        if method_id == "vim_hybrid":
            return "Hybrid"
        names = []
        for part in opts.get("parts") or []:
            try:
                names.append(get_method(part.get("name")).label(part) or str(part.get("name")))
            except LilyConfigError:
                names.append(str(part.get("name")))
        return "Compose (" + " + ".join(names) + ")"

    def parts(self, opts: ComposeOptions):
        return [(o.name, o) for o in opts.typed_parts()]

    def apply(self, model, opts: ComposeOptions):
        parts = opts.typed_parts()
        if not parts:
            raise LilyConfigError("method compose needs at least one part (method.parts: [{name: ..., ...}, ...])")
        owner: dict[int, str] = {}                 # id(trainable parameter) -> the part that made it
        for i, part in enumerate(parts):
            get_method(part.name).apply(model, part)
            live = {id(p) for p in model.parameters()}
            lost = sorted({label for pid, label in owner.items() if pid not in live})
            if lost:
                raise LilyConfigError(f"method.parts[{i}] ('{part.name}') replaced the trainable tensors of "
                                      f"{', '.join(lost)} (the same adapter twice?)")
            for p in model.parameters():
                if p.requires_grad and id(p) not in owner:
                    owner[id(p)] = _label(i, part)

    def merge(self, model, opts: ComposeOptions):
        for i, part in enumerate(opts.typed_parts()):
            method = get_method(part.name)
            if method.mergeable is not True:
                raise MergeError(f"method 'compose' cannot be merged: {_label(i, part)} cannot: {method.mergeable}")
        safe_merge(model)
