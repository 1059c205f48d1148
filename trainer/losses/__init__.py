"""The contrastive losses: pure math over tensors and a process group (imports only torch).

disco.py (the exact DisCo loss and the naive full-batch baseline), tiled.py (the same loss over
column tiles), ring.py (tiled, with features passed round a ring), siglip.py (the sigmoid
loss), registry.py (`loss.name` → function, `LossConfig`, `make_objective`). Every loss honours
the scaling contract of docs/disco.md.
"""

from trainer.losses.disco import disco_clip_loss, full_batch_clip_loss
from trainer.losses.registry import LOSSES, LossConfig, Objective, make_objective, needs_bias
from trainer.losses.ring import ring_tiled_disco_clip_loss
from trainer.losses.siglip import siglip_loss
from trainer.losses.tiled import tiled_disco_clip_loss

__all__ = [
    "LOSSES",
    "LossConfig",
    "Objective",
    "disco_clip_loss",
    "full_batch_clip_loss",
    "make_objective",
    "needs_bias",
    "ring_tiled_disco_clip_loss",
    "siglip_loss",
    "tiled_disco_clip_loss",
]
