"""``GradscopeCallback`` for Lightning: ``Trainer(callbacks=[GradscopeCallback()])``.

For ``lightning.pytorch`` (the ``lightning`` package); where only ``pytorch_lightning`` is
installed, for that (see :mod:`gradscope.integrations.pytorch_lightning` to choose it
explicitly). What it does: :class:`gradscope.integrations.lightning_hooks.LightningHooks`.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError(
            "gradscope.integrations.lightning needs Lightning: pip install 'gradscope-diagnostics[lightning]'"
        ) from None

from gradscope.integrations.lightning_hooks import LightningHooks

__all__ = ["GradscopeCallback"]


class GradscopeCallback(LightningHooks, Callback):
    __doc__ = LightningHooks.__doc__
