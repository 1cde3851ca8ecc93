"""Lily: Low-Rank Interconnected Adaptation across Layers, as a small PyTorch library.

Depends on torch and einops only; usable on any model (timm ViTs, Vision Mamba, or your
own ``nn.Linear`` layers)::

    import timm, lily
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    lily.adapt(model, lily.MethodConfig(name="lily", targets=["q", "v"], rank=32, ne=4))

Lily v2 (LP experts with a router of their own) is the same method with ``lp_experts=N_a``.
"""
from .attach import Site, adapt, adapters, find_sites, lily_adapters
from .config import METHODS, ROUTING_MODES, LilyConfigError, MethodConfig
from .layers import (Adapter, AdaptedLinear, BottleneckAdapter, HPBank, LilyAdapter, LoRAAdapter, LPBank, LPMixture,
                     MergeError,
                     StaticRouter, add_parallel_adapter, add_residual_adapter)
from .state import (count_parameters, expert_weights, head_parameters, load_trainable, merge, read_trainable,
                    save_trainable, trainable_state_dict, unmerge)

__all__ = [
    "Adapter", "AdaptedLinear", "BottleneckAdapter", "HPBank", "LilyAdapter", "LilyConfigError", "LoRAAdapter", "LPBank", "LPMixture",
    "METHODS", "MergeError", "MethodConfig", "ROUTING_MODES", "Site", "StaticRouter", "adapt", "adapters",
    "add_parallel_adapter", "add_residual_adapter", "count_parameters", "expert_weights", "find_sites", "head_parameters", "lily_adapters",
    "load_trainable", "merge", "read_trainable", "save_trainable", "trainable_state_dict", "unmerge",
]
