"""The built-in methods, one module each; importing this package registers them.

A new method is one module here (options dataclass + ``@register``'d Method), one import line
below, its Hydra config under ``configs/method/`` and its tests. Nothing else changes.
"""
from . import adaptformer, full, lily, lora  # noqa: F401
from . import vim_lora  # noqa: F401,E402
from . import vim_tuning  # noqa: F401,E402
from . import compose  # noqa: F401,E402
from . import vim_adapter, vim_scan, vim_tokens  # noqa: F401,E402  (MambaPEFT on Vim, part B)
from . import bitfit, convpass, fact, repadapter, ssf, vpt  # noqa: F401,E402  (issue 15, part A: ViT baselines)
from . import adapter, dora, hydralora, moslora, peft_lily, vera  # noqa: F401,E402  (issue 15, part B)
