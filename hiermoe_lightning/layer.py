"""MoELayer = router + token dispatcher + experts (+ optional shared experts).

Unsharded, the layer holds every expert and is the exact single-process reference. ``ExpertParallel.shard_`` keeps
only this rank's experts (:meth:`MoELayer.become_expert_parallel`) and gives the layer a dispatcher that routes rows
with the chosen dispatch; the function computed does not change. The layer talks to its dispatcher only through the
:class:`~hiermoe_lightning.dispatch.dispatcher.TokenDispatcher` calls (layout, dispatch, combine).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from .dispatch.dispatcher import HopDispatcher, TokenDispatcher
from .dispatch.engine import DispatchHandle, apply_experts
from .experts import ExpertBank, SwiGLU, _normal, derive_seed, experts_on_meta, resolve_device
from .placement import Placement
from .routing import Router
from .validation import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:
    from .parallel import ExpertParallel

__all__ = ["MoELayer", "DROP_POLICIES"]

DROP_POLICIES = ("probs", "position")


def _settle_before_state_dict(layer: "MoELayer", prefix: str, keep_vars: bool) -> None:
    """A ``state_dict`` of a layer whose experts are moving shows them moved (the migration commits first)."""
    if layer.expert_parallel is not None:
        layer.expert_parallel.settle_migration()


def _settle_before_load(layer: "MoELayer", *args) -> None:
    """Loading into a layer whose experts are moving commits the move first (else the commit would overwrite what
    was loaded)."""
    if layer.expert_parallel is not None:
        layer.expert_parallel.settle_migration()


def _shared_expert_gate(hidden_size: int, seed: int, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear(hidden_size, 1, bias=False)`` whose weight ``[1, M]`` is drawn from ``(seed, "shared_expert_gate")``
    (identical on every rank; Linear's default init runs on meta, so the global RNG is untouched; the weight then
    follows the current default device, as ``_normal`` does)."""
    gate = nn.Linear(hidden_size, 1, bias=False, device="meta", dtype=dtype)
    gate.weight = nn.Parameter(_normal((1, hidden_size), hidden_size**-0.5, derive_seed(seed, "shared_expert_gate"), dtype))
    return gate


class _BoundExperts:
    """An expert bank called with other tensors in place of its parameters (``torch.func.functional_call``): what an
    overlapped layer's experts compute with (aliases of the parameters, :mod:`~hiermoe_lightning.dispatch.overlap`)."""

    def __init__(self, bank: nn.Module, params: dict[str, torch.Tensor]):
        self.bank, self.params = bank, params

    @property
    def num_slots(self) -> int:
        return self.bank.num_slots

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.bank, self.params, args, kwargs)


class MoELayer(nn.Module):
    """A token-choice MoE feed-forward layer; input ``[..., hidden_size]`` -> output of the same shape.

    Built with the same arguments on every rank it has identical weights everywhere (each expert is initialised from
    its own seed). Dropless by default; ``capacity_factor`` caps each expert at ``ceil(cf * T * K / E)`` pairs of the
    local batch and ``drop_policy`` picks which pairs stay (``"probs"``: highest router weight; ``"position"``:
    earliest tokens). ``aux_loss`` holds the last forward's load-balancing loss; add it to your loss yourself.

    Options that Hugging Face MoE families need (general options, passed through to the :class:`Router` where they
    are the router's):

    * ``routed_scaling_factor`` (float > 0, default 1.0): the routed weights are multiplied by it after the optional
      top-k renormalisation (DeepSeek-V3).
    * ``router_dtype`` (a floating ``torch.dtype`` or None, default ``torch.float32``): the dtype the gate's logits
      are computed in; None = the input's dtype (Qwen-MoE, Mixtral, OLMoE compute the gate in the model dtype). The
      scores are computed in fp32 from the logits either way, and the gate weight is stored in fp32.
    * ``shared_expert_gate`` (bool, default False; needs ``num_shared_experts >= 1``): the shared experts' output is
      multiplied by ``sigmoid(x @ shared_expert_gate.weight.T)``, one gate value per token, with
      ``shared_expert_gate`` an ``nn.Linear(hidden_size, 1, bias=False)`` in ``dtype`` (Qwen2-MoE), seeded from
      ``seed`` like every other parameter.
    * The router's selection bias ``router.expert_bias`` (zeros at construction, in the state dict) is always added
      to the scores for selection (never to the weights), whether ``bias_update_rate`` learns it or it was loaded
      (DeepSeek-V3's ``e_score_correction_bias``).
    """

    # True: materialize_ (and so ExpertParallel.shard_ of a meta-built layer) allocates the expert slots without
    # drawing their values, because a loader fills them next (hiermoe_lightning.hf.load_pretrained_)
    skip_expert_init: bool = False

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        seed: int = 0,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        num_expert_groups: int = 1,
        topk_groups: int | None = None,
        aux_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        num_shared_experts: int = 0,
        shared_ffn_hidden_size: int | None = None,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        routed_scaling_factor: float = 1.0,
        router_dtype: torch.dtype | None = torch.float32,
        shared_expert_gate: bool = False,
        dtype: torch.dtype = torch.float32,
        device: "torch.device | str | None" = None,
    ):
        # device: where every tensor is built (None: the current default device, e.g. inside `with torch.device(
        # "meta")`). On "meta" nothing is allocated or drawn; shard_ (or materialize_) fills the tensors later with
        # the values a normal build gives. The arguments are kept: materialize_ rebuilds the non-expert parts from them.
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if device is not None:
            with torch.device(device):
                MoELayer.__init__(self, **{**init_args, "device": None})
            self._init_args = init_args
            return
        super().__init__()
        self._init_args = init_args
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            check_int(value, name, 1)
        check_int(top_k, "top_k", 1, num_experts)
        check_int(num_shared_experts, "num_shared_experts", 0)
        check_number(capacity_factor, "capacity_factor", low=0.0, low_open=True, allow_none="dropless")
        check_choice(drop_policy, "drop_policy", DROP_POLICIES)
        check_bool(shared_expert_gate, "shared_expert_gate")
        if shared_expert_gate and not num_shared_experts:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1, got num_shared_experts=0")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k, self.seed = num_experts, top_k, seed
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.router = Router(hidden_size, num_experts, top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                             num_expert_groups=num_expert_groups, topk_groups=topk_groups,
                             aux_loss_coef=aux_loss_coef, bias_update_rate=bias_update_rate,
                             routed_scaling_factor=routed_scaling_factor, router_dtype=router_dtype, seed=seed)
        self.experts = ExpertBank(range(num_experts), hidden_size, ffn_hidden_size, seed=seed, dtype=dtype)
        self.shared_experts = (
            SwiGLU(hidden_size, (shared_ffn_hidden_size or ffn_hidden_size) * num_shared_experts, seed=seed, dtype=dtype)
            if num_shared_experts else None
        )
        self.shared_expert_gate = _shared_expert_gate(hidden_size, seed, dtype) if shared_expert_gate else None
        with torch.device("cpu"):  # placements are host metadata, also when the layer is built on meta
            self.placement: Placement = Placement.contiguous(num_experts, 1)
        self.expert_parallel: "ExpertParallel | None" = None
        self.dispatcher: TokenDispatcher = HopDispatcher(self)  # unsharded: no hop
        self._slot_of_expert: tuple = (None, None)  # (placement, expert_to_slot on the input's device)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_handle: DispatchHandle | None = None
        self.last_expert_ids: torch.Tensor | None = None  # [T, K] of the last forward, -1 = dropped
        self.last_local_slots: torch.Tensor | None = None
        self.expert_timings: dict | None = None  # set to {} to time the experts in place (benchmarks)
        self.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_state_dict_pre_hook(_settle_before_state_dict)
        self.register_load_state_dict_pre_hook(_settle_before_load)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer input must have last dimension hidden_size={self.hidden_size}, got shape {tuple(x.shape)}")
        if self.expert_parallel is not None and self.expert_parallel.migration_in_flight is not None:
            self.expert_parallel.settle_migration()  # experts moved while the step before this one ended
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        routed = self.router(x2)
        expert_ids, weights = routed.expert_ids, routed.weights
        if self.capacity_factor is not None:
            expert_ids, weights = self._apply_capacity(expert_ids, weights)
        self.aux_loss = routed.aux_loss
        self.last_expert_ids = expert_ids.detach()
        if self.training:
            self.routed_tokens += routed.tokens_per_expert

        layout = self.dispatcher.layout(expert_ids, weights)
        overlapped = getattr(self.dispatcher, "overlaps", False)
        if overlapped:  # dispatch, experts, shared experts and combine as one pipeline
            out, handle, pair_slot = self._overlapped(x2, layout)
        else:
            expert_input, handle = self.dispatcher.dispatch(x2, layout)
            pair_slot = self._expert_to_slot(x.device)[expert_input.pair_expert]
            start = time.perf_counter()
            y = apply_experts(self.experts, expert_input.rows, expert_input.pair_row, pair_slot,
                              expert_input.pair_weight, expert_input.one_pair_per_row)
            if self.expert_timings is not None:
                self._time_expert_backward(y, expert_input.rows, time.perf_counter() - start)
            out = self.dispatcher.combine(y, handle, x.dtype)
        self.last_handle = handle
        self.last_local_slots = pair_slot.detach()  # [P] local slot of every pair this rank's experts processed
        if self.shared_experts is not None and not overlapped:
            out = out + self._shared(x2)
        return out.reshape(shape)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output ``[T, M]`` (gated when the layer has a shared-expert gate)."""
        shared = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared

    def _overlapped(self, x: torch.Tensor, layout) -> tuple[torch.Tensor, object, torch.Tensor]:
        """The routed part through the dispatcher's ``dispatch_experts_combine``: ``x`` ``[T, M]`` -> ``(out [T, M],
        handle, pair_slot [P'])``, the slots of every pair this rank's experts served (over all programs)."""
        from torch.func import functional_call

        slots: list[torch.Tensor] = []
        table = self._expert_to_slot(x.device)
        names, params = zip(*self.experts.named_parameters())

        def experts(rows, pair_row, pair_expert, pair_weight, one_pair_per_row, aliases):
            pair_slot = table[pair_expert]
            slots.append(pair_slot.detach())
            bank = _BoundExperts(self.experts, dict(zip(names, aliases)))
            return apply_experts(bank, rows, pair_row, pair_slot, pair_weight, one_pair_per_row)

        side, side_params = None, []
        if self.shared_experts is not None:
            gate = self.shared_expert_gate
            shared_names = [n for n, _ in self.shared_experts.named_parameters()]
            gate_names = [n for n, _ in gate.named_parameters()] if gate is not None else []
            side_params = list(self.shared_experts.parameters()) + (list(gate.parameters()) if gate is not None else [])

            def shared_on(x_, aliases):  # _shared, on the aliases (shared experts' first, then the gate's)
                cut = len(shared_names)
                shared = functional_call(self.shared_experts, dict(zip(shared_names, aliases[:cut])), (x_,))
                if gate is not None:
                    shared = torch.sigmoid(functional_call(gate, dict(zip(gate_names, aliases[cut:])), (x_,))) * shared
                return shared

            side = shared_on
        out, handle = self.dispatcher.dispatch_experts_combine(x, layout, experts, list(params), x.dtype, side,
                                                               side_params)
        return out, handle, torch.cat(slots) if slots else table.new_zeros(0)

    def _expert_to_slot(self, device: torch.device) -> torch.Tensor:
        """``[E]`` local slot of each expert of the current placement, on ``device`` (copied once per placement)."""
        placement, table = self._slot_of_expert
        if placement is not self.placement or table.device != device:
            table = self.placement.expert_to_slot.to(device)
            self._slot_of_expert = (self.placement, table)
        return table

    def _time_expert_backward(self, y: torch.Tensor, rows: tuple[torch.Tensor, ...], forward_seconds: float) -> None:
        """Benchmarks only (``expert_timings`` a dict): expert forward time, and backward from y's grad to the grad of
        the first block of rows (the experts' backward is done by then)."""
        t = self.expert_timings
        t["forward"] = t.get("forward", 0.0) + forward_seconds
        rows = rows[0]
        if y.requires_grad and rows.requires_grad:
            mark = {}
            y.register_hook(lambda g: mark.__setitem__("start", time.perf_counter()))

            def stop(g):
                t["backward"] = t.get("backward", 0.0) + time.perf_counter() - mark.get("start", time.perf_counter())

            rows.register_hook(stop)

    def _apply_capacity(self, expert_ids: torch.Tensor, weights: torch.Tensor):
        """Keep at most ``ceil(cf * T * K / E)`` pairs per expert; dropped pairs get id -1 and weight 0."""
        T, K = expert_ids.shape
        capacity = math.ceil(self.capacity_factor * T * K / self.num_experts)
        flat = expert_ids.reshape(-1)
        priority = -weights.detach().reshape(-1) if self.drop_policy == "probs" else torch.arange(T * K, device=flat.device).float()
        by_priority = torch.argsort(priority, stable=True)
        order = by_priority[torch.argsort(flat[by_priority], stable=True)]
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(T * K, device=flat.device) - starts[flat[order]]
        keep = torch.empty_like(flat, dtype=torch.bool)
        keep[order] = position < capacity
        keep = keep.view(T, K)
        return torch.where(keep, expert_ids, -1), weights * keep

    # ------------------------------------------------------------------ routing bias
    @torch.no_grad()
    def update_routing_bias(self, group=None) -> None:
        """Aux-loss-free balancing step from the tokens routed since the last call (summed over ``group``; None: this
        process's counts), then the counts reset: :func:`~hiermoe_lightning.balancing.update_routing_biases` for this
        layer alone. ``HierMoEStrategy`` does this itself after every optimizer step (all layers, one all-reduce)."""
        from .balancing import update_routing_biases

        update_routing_biases([self], group)

    def set_placement(self, placement: Placement) -> None:
        """Point the slots at other experts (the slot contents must be filled to match, e.g. by loading a state)."""
        if placement.num_experts != self.num_experts:
            raise ValueError(f"placement has {placement.num_experts} experts, the layer {self.num_experts}")
        if self.expert_parallel is not None and placement.world_size != self.expert_parallel.world_size:
            raise ValueError(f"placement is for {placement.world_size} ranks, the layer runs on {self.expert_parallel.world_size}")
        self.placement = placement

    # ------------------------------------------------------------------ the dispatcher
    def use_dispatcher(self, dispatcher: TokenDispatcher) -> None:
        """Route tokens with ``dispatcher`` from the next forward on (a :class:`TokenDispatcher`: layout, dispatch,
        combine). It must serve this layer's placement; :meth:`become_expert_parallel` installs the hop engine."""
        if not isinstance(dispatcher, TokenDispatcher):
            raise TypeError(f"dispatcher must implement TokenDispatcher (name, layout, dispatch, combine), "
                            f"got {type(dispatcher).__name__}")
        self.dispatcher = dispatcher

    def become_expert_parallel(self, expert_parallel: "ExpertParallel", placement: Placement,
                               dispatcher: TokenDispatcher, device: "torch.device | str | None" = None) -> None:
        """Keep only the experts ``placement`` puts on this rank and route with ``dispatcher`` over
        ``expert_parallel`` (what :meth:`ExpertParallel.shard_ <hiermoe_lightning.parallel.ExpertParallel.shard_>`
        does to every layer). A layer built on meta is then materialised on ``device`` (:meth:`materialize_`): only
        the kept experts are allocated and drawn."""
        if self.is_sharded:
            raise ValueError("MoELayer is already sharded")
        self.experts.keep_slots(placement.experts_of(expert_parallel.rank))
        self.placement, self.expert_parallel = placement, expert_parallel
        self.use_dispatcher(dispatcher)
        if self.is_meta:
            self.materialize_(device)

    @property
    def is_meta(self) -> bool:
        """Whether any parameter or buffer is still on the meta device (built with ``device="meta"``)."""
        return any(t.is_meta for t in self.parameters()) or any(t.is_meta for t in self.buffers())

    @torch.no_grad()
    def materialize_(self, device: "torch.device | str | None" = None) -> "MoELayer":
        """Give every meta parameter and buffer real storage on ``device`` (None: the current default device, the CPU
        under a meta default), with exactly the values a normal build with the same arguments gives: the experts of
        the slots the layer holds (all of them unsharded, this rank's after sharding) from their own seeds, the rest
        (router, shared experts and their gate, buffers) from a build of the layer's non-expert parts. Tensors that
        are not on meta are kept. Returns the layer."""
        device = resolve_device(device)
        if device.type == "meta":
            device = torch.device("cpu")
        if self.skip_expert_init and self.experts.is_meta:  # a loader fills them next: allocate, draw nothing
            for name in ("w_gate", "w_up", "w_down"):
                old = getattr(self.experts, name)
                setattr(self.experts, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                                         requires_grad=old.requires_grad))
        else:
            self.experts.materialize_(device)
        rest = [(name, m) for name, m in self.named_modules() if not name.startswith("experts")]
        if any(t.is_meta for _, m in rest for t in (*m._parameters.values(), *m._buffers.values()) if t is not None):
            with experts_on_meta():  # the twin's experts stay on meta: nothing drawn for them
                twin = MoELayer(**{**self._init_args, "device": device})
            for name, module in rest:
                source = twin.get_submodule(name)
                for key, p in module._parameters.items():
                    if p is not None and p.is_meta:
                        module._parameters[key] = nn.Parameter(source._parameters[key].detach(),
                                                               requires_grad=p.requires_grad)
                for key, b in module._buffers.items():
                    if b is not None and b.is_meta:
                        module._buffers[key] = source._buffers[key]
        if self.aux_loss.is_meta:
            self.aux_loss = torch.zeros((), device=device)
        left = [n for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"MoELayer.materialize_ left tensors on meta: {', '.join(left)}")
        return self

    @property
    def dispatch(self) -> str:
        """The concrete dispatch in use (``"local"`` unsharded; ``"auto"`` until the first forward chose one)."""
        return self.dispatcher.name

    @dispatch.setter
    def dispatch(self, value: str) -> None:
        self.dispatcher.name = value

    @property
    def auto_calls(self) -> int:
        """Training forwards seen by ``dispatch="auto"`` (0 for a dispatcher without an automatic choice)."""
        return getattr(self.dispatcher, "auto_calls", 0)

    @auto_calls.setter
    def auto_calls(self, value: int) -> None:
        self.dispatcher.auto_calls = value

    @property
    def auto_predictions(self) -> dict[str, float]:
        """``hd<d>`` -> predicted ms at the last automatic choice (empty without one)."""
        return getattr(self.dispatcher, "auto_predictions", {})

    @auto_predictions.setter
    def auto_predictions(self, value: dict[str, float]) -> None:
        self.dispatcher.auto_predictions = value

    # ------------------------------------------------------------------ facts for users and the callback
    @property
    def is_sharded(self) -> bool:
        return self.expert_parallel is not None

    def local_expert_ids(self) -> torch.Tensor:
        """``[slots]`` global expert id held in each local slot."""
        rank = self.expert_parallel.rank if self.expert_parallel is not None else 0
        return self.placement.experts_of(rank)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, dispatch={self.dispatch!r}, slots={self.experts.num_slots}")
