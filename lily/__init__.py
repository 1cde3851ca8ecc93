"""Lily: Low-Rank Interconnected Adaptation across Layers, and the PETL methods it is compared
with, as a small PyTorch library.

Depends on torch and einops only (peft for the methods that are peft's own); usable on any
model (timm ViTs, Vision Mamba, or your own ``nn.Linear`` layers)::

    import timm, lily
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    lily.adapt(model, lily.MethodConfig(name="lily", targets=["q", "v"], rank=32, ne=4))

Every method is registered by name (``lily.registered()``); ``lily.adapt``,
``count_parameters``, ``save_trainable``/``load_trainable`` and ``merge``/``unmerge`` work for
all of them. Lily v2 (LP experts with a router of their own) is Lily with ``lp_experts=N_a``.
"""
from .attach import Site, adapt, adapters, attach, attach_per_kind, find_sites, lily_adapters, sites_by_kind
from .config import ROUTING_MODES
from .errors import LilyConfigError, MergeError
from .layers import (Adapter, AdaptedLinear, HPBank, LilyAdapter, LPBank, LPMixture, StaticRouter,
                     add_parallel_adapter, add_residual_adapter)
from .merging import Mergeable
from .methods.adaptformer import BottleneckAdapter
from .methods.lily import LilyOptions
from .methods.lora import LoRAAdapter
from .registry import Method, MethodConfig, MethodOptions, get_method, method_config, register, registered
from .state import (count_parameters, expert_weights, head_parameters, load_trainable, merge, read_trainable,
                    save_trainable, trainable_state_dict, unmerge)

METHODS = tuple(registered())

__all__ = [
    "Adapter", "AdaptedLinear", "BottleneckAdapter", "HPBank", "LilyAdapter", "LilyConfigError", "LilyOptions",
    "LoRAAdapter", "LPBank", "LPMixture", "METHODS", "Mergeable", "MergeError", "Method", "MethodConfig",
    "MethodOptions", "ROUTING_MODES", "Site", "StaticRouter", "adapt", "adapters", "add_parallel_adapter",
    "add_residual_adapter", "attach", "attach_per_kind", "count_parameters", "expert_weights", "find_sites",
    "get_method", "head_parameters", "lily_adapters", "load_trainable", "merge", "method_config", "read_trainable",
    "register", "registered", "save_trainable", "sites_by_kind", "trainable_state_dict", "unmerge",
]
