"""``GradscopeCallback`` for the ``pytorch_lightning`` namespace (a ``pytorch_lightning.Trainer``
accepts only ``pytorch_lightning`` callbacks). What it does:
:class:`gradscope.integrations.lightning_hooks.LightningHooks`.
"""

from __future__ import annotations

try:
    from pytorch_lightning.callbacks import Callback
except ImportError:
    raise ImportError(
        "gradscope.integrations.pytorch_lightning needs pytorch_lightning: pip install pytorch-lightning"
    ) from None

from gradscope.integrations.lightning_hooks import LightningHooks

__all__ = ["GradscopeCallback"]


class GradscopeCallback(LightningHooks, Callback):
    __doc__ = LightningHooks.__doc__
