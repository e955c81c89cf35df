"""Aux-loss-free balancing (DeepSeek-V3): the one function that updates the routers' selection biases.

Every caller goes through :func:`update_routing_biases`:

* :class:`~hiermoe_lightning.strategy.HierMoEStrategy` after every optimizer step that was taken, for every
  ``MoELayer`` whose router has ``bias_update_rate > 0``, in any LightningModule (a converted Hugging Face model
  as much as the bundled ``MoEGPT``), with the counts summed over all ranks;
* ``MoEGPT.on_train_batch_end`` without that strategy (single process, or another strategy), as before; under
  ``HierMoEStrategy`` the hook leaves the update to the strategy, so a model is never updated twice in a step;
* :meth:`MoELayer.update_routing_bias <hiermoe_lightning.layer.MoELayer.update_routing_bias>` for one layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .layer import MoELayer

__all__ = ["update_routing_biases"]


@torch.no_grad()
def update_routing_biases(layers: Sequence["MoELayer"], group: Any = None, *, step_taken: bool = True) -> bool:
    """One aux-loss-free balancing step for ``layers`` from the tokens each routed since its last update.

    Each layer's ``routed_tokens`` (the tokens its router sent to each expert in training forwards since the last
    update, this process only) are summed over ``group`` with **one** all-reduce for all layers together, so every
    rank of the group gets the same global counts and makes the same update
    (``bias += bias_update_rate * sign(mean - load)``, :meth:`Router.update_bias
    <hiermoe_lightning.routing.Router.update_bias>`, a no-op at rate 0); then the counts are reset.

    ``group``: a process group, or None for no sum (this process's counts only). A collective: with a group, every
    rank of it must call this with the same layers. ``step_taken``: whether this rank's optimizer step was taken;
    it travels in the same all-reduce, and the biases change only when it was on every rank of the group (else the
    counts are kept for the next step). Returns whether the biases were updated.
    """
    layers = list(layers)
    if not layers:
        return False
    counts = [layer.routed_tokens for layer in layers]
    flat = torch.cat([c.reshape(-1).to(torch.long) for c in counts]
                     + [torch.tensor([int(step_taken)], dtype=torch.long, device=counts[0].device)])
    ranks = 1
    if group is not None and dist.is_available() and dist.is_initialized():
        ranks = dist.get_world_size(group)
        if ranks > 1:
            dist.all_reduce(flat, group=group)
    if int(flat[-1]) != ranks:  # some rank skipped its step: keep every rank's counts, change nothing
        return False
    for layer, total in zip(layers, torch.split(flat[:-1], [c.numel() for c in counts])):
        layer.router.update_bias(total)
        layer.routed_tokens.zero_()
    return True
