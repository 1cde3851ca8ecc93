"""Constants of Lily's options and the options base shared by every method.

``MethodConfig`` (= :class:`lily.registry.MethodOptions`) builds the typed options of the method
it names: ``MethodConfig(name="lily", targets=["q", "v"], rank=32, ne=4)`` is a
:class:`lily.methods.lily.LilyOptions`. Lily's options are documented there.
"""
from __future__ import annotations

from .errors import LilyConfigError, MergeError
from .registry import MethodConfig, MethodOptions, method_config, registered

ROUTING_MODES = ("batch", "sample", "token", "static", "uniform")
ROUTER_INITS = ("paper", "default")
ACTIVATIONS = ("identity", "relu", "gelu")
DEPTH_OVER_NE = "depth//ne"    # lp_stride value: max(1, L // N_e) consecutive layers share one LP

__all__ = ["ACTIVATIONS", "DEPTH_OVER_NE", "LilyConfigError", "MergeError", "MethodConfig", "MethodOptions",
           "ROUTER_INITS", "ROUTING_MODES", "method_config", "registered"]
