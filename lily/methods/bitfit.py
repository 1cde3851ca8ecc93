"""BitFit (Zaken et al.) as VTAB runs it: VPT's ``tinytl-bias`` baseline (KMnP/vpt
``src/models/vit_models.py``; the same in OSU-MLB/PETL_Vision): every bias tensor of the encoder
trains (patch-embed, norm1/norm2, qkv, proj, fc1, fc2, final norm), LayerNorm *weights* do not.
ViT-B/16: 768 + 12 x 8,448 + 768 = 102,912 parameters. Forward unchanged; merging is trivial (the
tuned biases are the model's own)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LilyConfigError
from ..registry import Method, MethodOptions, register


@dataclass
class BitFitOptions(MethodOptions):
    """``exclude``: modules (by name, and everything below them) whose biases stay frozen besides
    the head: the frozen pre-logits layer that the original ViT-B_16.npz brings (models/vit.py) is
    not part of the encoder that VPT's baseline tunes."""
    name: str = "bitfit"
    exclude: list = field(default_factory=lambda: ["pre_logits"])

    def validate(self):
        self.exclude = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude or [])
        if not all(isinstance(e, str) and e for e in self.exclude):
            raise LilyConfigError(f"method.exclude must be a list of module names, got {self.exclude!r}")


@register
class BitFit(Method):
    name = "bitfit"
    title = "BitFit"
    options = BitFitOptions
    mergeable = True        # nothing to fold: the trained biases are the model's own parameters
    source = "Zaken et al. 2022; VTAB form: VPT's tinytl-bias baseline (KMnP/vpt)"

    def apply(self, model, opts: BitFitOptions):
        skip = tuple(opts.exclude) + tuple(opts.head)
        n = 0
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] != "bias":
                continue
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            p.requires_grad_(True)
            n += 1
        if n == 0:
            raise LilyConfigError(f"bitfit: {type(model).__name__} has no bias parameter to train")
