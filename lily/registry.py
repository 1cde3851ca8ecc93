"""Methods by name: each method is one module with typed options and one registration.

A method module defines an options dataclass (a subclass of :class:`MethodOptions`) and a
:class:`Method` subclass, and registers the method with :func:`register`::

    @dataclass
    class BitFitOptions(MethodOptions):
        name: str = "bitfit"

    @register
    class BitFit(Method):
        name = "bitfit"
        options = BitFitOptions
        mergeable = True
        def apply(self, model, opts): ...

Nothing central changes when a method is added: ``lily.adapt``, ``count_parameters``,
``save_trainable``/``load_trainable`` and ``merge``/``unmerge`` dispatch through the registry.

``MethodOptions(**kw)`` (also exported as ``lily.MethodConfig``) builds the options of the
method named by ``kw["name"]`` (default ``"lily"``), so ``lily.MethodConfig(name="lora", rank=8)``
is a :class:`~lily.methods.lora.LoRAOptions`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Mapping

from torch import nn

from .errors import LilyConfigError, MergeError

# Keys a method's Hydra config may carry that are not options of the method itself: free text,
# its search space (the clean protocol), its source, and training-recipe values that the optim
# and backbone configs read (``${oc.select:method.optim.lr,...}``).
META_KEYS = ("description", "search", "source", "optim")

_REGISTRY: dict[str, "Method"] = {}


def _builtin_methods():
    from . import methods  # noqa: F401  (importing registers the built-in methods)


@dataclass
class MethodOptions:
    """Base of every method's typed options. ``head``: module names that stay trainable."""
    name: str = "lily"
    head: list = field(default_factory=lambda: ["head"])

    # options whose value may be a mapping {target: value} (with an optional 'default' entry)
    per_target: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args, **kwargs):
        if cls is MethodOptions:  # MethodConfig(name=...): the options class of that method
            cls = get_method(kwargs.get("name", "lily")).options
        return super().__new__(cls)

    def __post_init__(self):
        registered = get_method(self.name)
        if not isinstance(self, registered.options):
            raise LilyConfigError(f"options of type {type(self).__name__} cannot be given name '{self.name}'")
        self.head = [self.head] if isinstance(self.head, str) else list(self.head or [])
        for key in self.per_target:
            value = getattr(self, key)
            if isinstance(value, Mapping):
                setattr(self, key, dict(value))
        if hasattr(self, "targets"):
            t = getattr(self, "targets")
            self.targets = [t] if isinstance(t, str) else list(t or [])
        self.validate()

    def validate(self) -> None:
        """Check every value; raise :class:`LilyConfigError` naming the option."""

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping) -> "MethodOptions":
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.method)``); the method
        is ``d['name']``. Unknown keys are an error naming the key; META_KEYS are ignored."""
        d = {k: v for k, v in dict(d).items() if k not in META_KEYS}
        target = get_method(d.get("name", "lily")).options if cls is MethodOptions else cls
        known = {f.name for f in fields(target)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LilyConfigError(f"unknown method option(s) {unknown} for method '{d.get('name', target.name)}'; "
                                  f"its options: {sorted(known)}")
        return target(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- per-target values --------------------------------------------------------------
    def get(self, key: str, target: str, group: str | None = None):
        """The value of ``key`` for ``target`` (``group`` is an alias, e.g. 'delta' for 'delta_f')."""
        value = getattr(self, key)
        if not isinstance(value, Mapping):
            return value
        for k in (target, group, "default"):
            if k is not None and k in value:
                return value[k]
        raise LilyConfigError(
            f"method.{key} is a mapping {value} without an entry for target '{target}' "
            f"(add '{target}: ...' or 'default: ...')")

    def getter(self, site):
        """``get(key)``: the value of ``key`` for ``site``'s target kind (see :meth:`get`)."""
        return lambda key: self.get(key, site.kind, site.group)

    def check_values(self, checks) -> None:
        """``checks``: (key, predicate, what) triples; per-target mappings are checked entry by entry."""
        for key, check, what in checks:
            value = getattr(self, key)
            for v in value.values() if isinstance(value, Mapping) else [value]:
                if isinstance(v, bool) or not check(v):
                    raise LilyConfigError(f"method.{key} must be {what}, got {v!r}")


MethodConfig = MethodOptions


class Method:
    """One method: how it attaches to a model and whether/how it merges.

    ``apply`` runs on a model whose every parameter is already frozen; it attaches the
    method's modules (their parameters trainable unless the method freezes them) and may
    unfreeze parameters of the model itself (BitFit, full fine-tuning). The head is made
    trainable afterwards by :func:`lily.adapt`.

    ``mergeable``: True, or a sentence saying why the method cannot fold into the frozen
    weights. The default :meth:`merge` is the safe merge of the core: every
    :class:`~lily.merging.Mergeable` module of the model is checked first, then merged.
    """
    name: ClassVar[str]
    options: ClassVar[type[MethodOptions]]
    mergeable: ClassVar[bool | str] = "it changes the computation, not only the weights"
    source: ClassVar[str] = ""           # where the method comes from (paper / code), for the README table
    title: ClassVar[str | None] = None   # the authors' name of the method: a table's row label

    def label(self, opts: Mapping, method_id: str | None = None) -> str | None:
        """A table's row label for these options (a plain mapping, as a run's identity holds them;
        ``method_id``: the method config's name). Values the authors chose per task (a VPT prompt
        length, a FacT rank) stay out: one row spans the tasks. None: the table layer's default."""
        return self.title

    def apply(self, model: nn.Module, opts: MethodOptions) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, opts: MethodOptions) -> None:
        from .merging import safe_merge
        if self.mergeable is not True:
            raise MergeError(f"method '{self.name}' cannot be merged: {self.mergeable}")
        safe_merge(model)

    def unmerge(self, model: nn.Module, opts: MethodOptions) -> None:
        from .merging import unmerge_all
        unmerge_all(model)

    def parts(self, opts: MethodOptions) -> list[tuple[str, MethodOptions]]:
        """(name, options) of the methods this one is made of (a composition); itself otherwise."""
        return [(self.name, opts)]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise LilyConfigError(f"a method named '{name}' is already registered ({type(_REGISTRY[name]).__name__})")
    if not (isinstance(cls.options, type) and issubclass(cls.options, MethodOptions)):
        raise TypeError(f"{cls.__name__}.options must be a MethodOptions subclass")
    _REGISTRY[name] = cls()
    return cls


def get_method(name: str) -> Method:
    _builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LilyConfigError(f"unknown method name '{name}'; registered methods: {sorted(_REGISTRY)}") from None


def registered() -> dict[str, Method]:
    """Every registered method by name."""
    _builtin_methods()
    return dict(_REGISTRY)


def method_config(cfg: MethodOptions | Mapping) -> MethodOptions:
    """Typed options from options or a mapping with a ``name`` (Hydra's ``cfg.method``)."""
    if isinstance(cfg, MethodOptions):
        return cfg
    return MethodOptions.from_dict(cfg)

