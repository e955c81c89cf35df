"""A plain, slow, obviously-correct MoE forward, independent of the package's dispatch engine."""

import torch
import torch.nn.functional as F


def naive_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer`` must be unsharded. Loops over tokens and their top-k experts one by one."""
    x2 = x.reshape(-1, layer.hidden_size)
    routed = layer.router(x2)
    ids, w = routed.expert_ids, routed.weights
    if layer.capacity_factor is not None:
        ids, w = layer._apply_capacity(ids, w)
    out = []
    for t in range(x2.shape[0]):
        acc = torch.zeros(layer.hidden_size, dtype=torch.float32)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            wg, wu, wd = layer.experts.w_gate[e], layer.experts.w_up[e], layer.experts.w_down[e]
            h = F.silu(x2[t] @ wg) * (x2[t] @ wu)
            acc = acc + (h @ wd).float() * w[t, k].float()
        out.append(acc)
    y = torch.stack(out).to(x.dtype)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(x2)
    return y.reshape(x.shape)
