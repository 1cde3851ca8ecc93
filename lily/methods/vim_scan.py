"""Additional-scan (MambaPEFT): N' extra scan states per mixer and per direction, beside the N
pretrained ones. Facts: ../shared/spec/baselines-vim.md section 3.8.

Per direction: A_eff = [-exp(A_log_new) (d_inner x N') | A]; the states' input and output
projections get N' new rows each from ``x_proj_new`` = Linear(d_inner -> 2N', no bias) of the
scan input u (its first N' rows feed B, its last N' rows feed C). D, dt and z are unchanged.
``A_log_new`` starts as the pretrained ``A_log[:, 0]`` repeated N' times.

Released-code defect, fixed by default: the released code leaves ``x_proj_new`` at PyTorch's
default init U(+-1/sqrt(d_inner)) (``x_proj_init: random_released``), so the output changes at
init. Zeroing all of it, as the released ``zero_init_x_proj=True`` does (``x_proj_init: zeros``),
makes the model the identity at init but is a saddle point: with B_new = 0 the new states stay 0,
so C_new gets no gradient, and with C_new = 0 neither B_new nor A_log_new does; every gradient of
the method is exactly 0 and it never trains (tests/test_methods_vim_b.py shows it). The default
``x_proj_init: zero_c`` zeroes only the C rows (B rows as released): the new states fill but are
not read, so the model is the identity at init and C_new gets a gradient at the first step.

Vim-S at N' = 6: 2 * 24 * (768 * 6 + 768 * 12) = 663,552. Not mergeable (inference needs
d_state = N + N'). Weight decay: MambaPEFT's ``.A_log`` key (decay 0) also matches the new
A_log, so :attr:`VimAdditionalScan.decay_mult` gives the new A_log tensors no decay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LilyConfigError
from ..registry import Method, MethodOptions, register
from .vim_adapter import vim_mixers

X_PROJ_INITS = ("zero_c", "zeros", "random_released")


class ScanAddition(nn.Module):
    """The new tensors of one mixer: A_log, A_b_log (d_inner, N'); x_proj, x_proj_b (d_inner -> 2N')."""

    def __init__(self, A_log: torch.Tensor, A_b_log: torch.Tensor, num_states: int, x_proj_init: str):
        super().__init__()
        d_inner = A_log.shape[0]
        self.num_states = num_states
        self.A_log = nn.Parameter(A_log.detach()[:, :1].repeat(1, num_states).clone())
        self.A_b_log = nn.Parameter(A_b_log.detach()[:, :1].repeat(1, num_states).clone())
        self.x_proj = nn.Linear(d_inner, 2 * num_states, bias=False, device=A_log.device)
        self.x_proj_b = nn.Linear(d_inner, 2 * num_states, bias=False, device=A_log.device)
        for proj in (self.x_proj, self.x_proj_b):   # rows [B_new (N') | C_new (N')]
            if x_proj_init == "zeros":
                nn.init.zeros_(proj.weight)
            elif x_proj_init == "zero_c":
                nn.init.zeros_(proj.weight[num_states:])


@dataclass
class VimAdditionalScanOptions(MethodOptions):
    name: str = "vim_additional_scan"
    num_states: int = 6                 # scan_addition_num (N')
    x_proj_init: str = "zero_c"         # zero_c: C rows zero (identity at init, trains; the fix) | zeros:
                                        # all zero (released zero_init_x_proj: identity but no gradient
                                        # ever) | random_released (the released default)

    def validate(self):
        self.check_values((("num_states", lambda v: isinstance(v, int) and v >= 1, "a positive int"),))
        if self.x_proj_init not in X_PROJ_INITS:
            raise LilyConfigError(f"method.x_proj_init must be one of {X_PROJ_INITS}, got {self.x_proj_init!r}")


@register
class VimAdditionalScan(Method):
    name = "vim_additional_scan"
    title = "Additional-scan"
    options = VimAdditionalScanOptions
    mergeable = "the extra states change the scan's state size (d_state + N'); no weight can hold them"
    source = "MambaPEFT (Yoshimura et al. 2025) Additional-scan, sony/MambaPEFT"
    decay_mult = {"scan_addition.A_log": 0.0, "scan_addition.A_b_log": 0.0}

    def apply(self, model, opts: VimAdditionalScanOptions):
        for mixer in vim_mixers(model, self.name):
            if not hasattr(mixer, "scan_addition"):
                raise LilyConfigError(f"method '{self.name}' needs mixers with a 'scan_addition' hook (models/vim.py)")
            if mixer.scan_addition is not None:
                raise LilyConfigError(f"method '{self.name}': the mixers' 'scan_addition' hook is already in use")
            mixer.scan_addition = ScanAddition(mixer.A_log, mixer.A_b_log, opts.num_states, opts.x_proj_init)
