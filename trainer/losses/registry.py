"""Which contrastive loss the trainer uses: a name → function table, its config, and the
`Objective` (image, text, logit_scale, logit_bias) -> loss that the step calls.

Every entry honours the scaling contract of trainer/losses/disco.py and takes
`(image_features, text_features, logit_scale, ..., group=None)`. Some take extra
arguments: "siglip" needs a `logit_bias` after `logit_scale` (see `needs_bias`), and "tiled"
and "ring" accept `tile_size` (see `LossConfig.loss_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.losses.disco import disco_clip_loss, full_batch_clip_loss
from trainer.losses.ring import ring_tiled_disco_clip_loss
from trainer.losses.siglip import siglip_loss
from trainer.losses.tiled import DEFAULT_TILE_SIZE, tiled_disco_clip_loss

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "disco": disco_clip_loss,
    "naive": full_batch_clip_loss,
    "tiled": tiled_disco_clip_loss,
    "siglip": siglip_loss,
    "ring": ring_tiled_disco_clip_loss,
}
_TILED_LOSSES = frozenset({"tiled", "ring"})
_BIAS_LOSSES = frozenset({"siglip"})


def needs_bias(name: str) -> bool:
    """True when LOSSES[name] takes a `logit_bias` argument right after `logit_scale`."""
    return name in _BIAS_LOSSES


@dataclass
class LossConfig:
    """The contrastive objective."""

    name: str = "disco"
    """One of LOSSES: disco (exact, O(b·B) per rank), naive (O(B²), baseline), tiled (exact,
    O(b·t + B·d)), ring (tiled over a ring of b-row chunks: O(b·t + b·d), N sequential hops),
    siglip (sigmoid loss; the model needs a logit_bias parameter)."""
    tile_size: int = DEFAULT_TILE_SIZE
    """Columns per tile for "tiled" and "ring"; ignored otherwise. Any value is exact; it trades memory
    (b·t per tile) for matmul efficiency."""

    def validate(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"name: unknown loss {self.name!r}; choose one of {sorted(LOSSES)}")
        if self.tile_size < 1:
            raise ValueError(f"tile_size: must be ≥ 1, got {self.tile_size}")

    def loss_kwargs(self) -> dict[str, int]:
        """Keyword arguments beyond the common ones that LOSSES[self.name] expects."""
        return {"tile_size": self.tile_size} if self.name in _TILED_LOSSES else {}


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_objective(cfg: LossConfig) -> Objective:
    """(image, text, logit_scale, logit_bias) -> loss, whichever loss is configured."""
    loss_fn, kwargs = LOSSES[cfg.name], cfg.loss_kwargs()
    if needs_bias(cfg.name):
        return lambda image, text, scale, bias: loss_fn(image, text, scale, bias, **kwargs)
    return lambda image, text, scale, bias: loss_fn(image, text, scale, **kwargs)
