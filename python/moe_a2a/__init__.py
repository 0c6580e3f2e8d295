"""moe_a2a: mixture-of-experts token dispatch and combine between ranks, without PyTorch.

One process per rank joins a world (``World.from_env()`` under torchrun or an MPI launcher,
``World.connect(...)``, or ``world_from_torch()`` over an initialized ``torch.distributed``
group), on the host or, with ``device=`` (and the engine's ``stream=``, e.g.
``torch.cuda.current_stream().cuda_stream``), on a GPU, then builds, per MoE layer, either

* ``PrepareFinalize`` -- shaped like vLLM's ``FusedMoEPrepareAndFinalize``: ``prepare`` quantizes
  and dispatches this rank's tokens and returns ``(a1q, a1q_scale, expert_tokens_meta, topk_ids,
  topk_weights)``; the engine runs its experts; ``finalize`` combines their output into
  ``output`` in place; or
* ``MoeLayer`` -- the whole layer with the experts a callable, which also applies the TP
  all-reduce exactly when the backend's output is not reduced.

Arrays go in as anything with ``__dlpack__`` (NumPy, PyTorch, CuPy, JAX) and come out as
``moe_a2a.Array``, which ``numpy.from_dlpack`` / ``torch.from_dlpack`` take. On the host
platform arrays are in host memory; on a GPU rank (a build with the GPU platform,
``World.has_gpu_platform()``) arrays on its GPU are read and written in place on the rank's
stream, and the experts must enqueue their work on that stream too. A stream handle of 0
(PyTorch's default stream) counts as none given: the rank then runs on a stream of its own and
waits, on the GPU, for each array's producer stream. Arrays whose type publishes DLPack's C
exchange table (PyTorch's tensors) are read without a Python call; where the rank runs on the
producer's current stream nothing else is needed, which is the fastest way to call the library
(make a stream current with ``torch.cuda.set_stream`` before joining the GPU). Errors are
``MoeA2aError`` subclasses carrying the library's message.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

from moe_a2a._native import (
    Array,
    backends,
    capability_matrix,
    CallTimeoutError,
    DeviceError,
    InternalError,
    InvalidArgumentError,
    MoeA2aError,
    PeerFailedError,
    UnsupportedError,
    World,
)
from moe_a2a import _native

__all__ = [
    "Array",
    "backends",
    "capability_matrix",
    "CallTimeoutError",
    "DeviceError",
    "InternalError",
    "InvalidArgumentError",
    "LayerSpec",
    "MoeA2aError",
    "MoeLayer",
    "PeerFailedError",
    "PrepareFinalize",
    "UnsupportedError",
    "World",
    "world_from_torch",
]

_DTYPES = {"bfloat16": 0, "float16": 1}
_SCHEMES = {
    "bf16": 0,
    "fp16": 1,
    "fp8_per_tensor": 2,
    "fp8_per_token": 3,
    "fp8_block128": 4,
    "nvfp4": 5,
    "mxfp8": 6,
}
_FORMATS = {"standard": 0, "batched_experts": 1}


def _code(field: str, value: str, table: dict) -> int:
    if value not in table:
        raise InvalidArgumentError(
            f"{field} = {value!r} is not one of {sorted(table)}"
        )
    return table[value]


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer, as every rank builds it.

    ``quant`` is how tokens travel (``"bf16"``, ``"fp16"``, ``"fp8_per_tensor"``,
    ``"fp8_per_token"``, ``"fp8_block128"``, ``"nvfp4"``, ``"mxfp8"``); ``dp`` defaults to the
    world size over ``tp``; ``activation_format`` is what the experts consume (``"standard"``
    or ``"batched_experts"``); ``expert_map``, when given, is each expert's EP rank (a
    placement from load balancing; default: contiguous blocks by rank).
    """

    num_experts: int
    top_k: int
    hidden: int
    max_tokens_per_rank: int
    input_dtype: str = "bfloat16"
    quant: str = "bf16"
    fp8_static_scale: float = 1.0
    nvfp4_global_scale: float = 1.0
    defer_input_quant: bool = False
    swizzled_scales: bool = False
    tp: int = 1
    dp: Optional[int] = None
    ep: bool = True
    sp: bool = False
    activation_format: str = "standard"
    workspace_group: Optional[str] = None
    expert_map: Optional[Sequence[int]] = None

    def _for(self, world: World) -> dict:
        tp = self.tp
        dp = self.dp if self.dp is not None else max(world.world_size // max(tp, 1), 1)
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden": self.hidden,
            "max_tokens_per_rank": self.max_tokens_per_rank,
            "input_dtype": _code("input_dtype", self.input_dtype, _DTYPES),
            "quant_scheme": _code("quant", self.quant, _SCHEMES),
            "fp8_static_scale": self.fp8_static_scale,
            "nvfp4_global_scale": self.nvfp4_global_scale,
            "defer_input_quant": self.defer_input_quant,
            "swizzled_scales": self.swizzled_scales,
            "tp": tp,
            "dp": dp,
            "ep": self.ep,
            "sp": self.sp,
            "activation_format": _code(
                "activation_format", self.activation_format, _FORMATS
            ),
            "workspace_group": self.workspace_group,
            "expert_map": None if self.expert_map is None else [int(r) for r in self.expert_map],
        }


PrepareResult = Tuple[
    Array, Optional[Array], Optional[Array], Optional[Array], Optional[Array]
]


class PrepareFinalize:
    """One rank's prepare/finalize object of one MoE layer (vLLM's
    ``FusedMoEPrepareAndFinalize``). Building it is collective: every rank builds the layer."""

    def __init__(self, world: World, backend: str, spec: LayerSpec) -> None:
        self.spec = spec
        self._native = _native.PrepareFinalize(world, backend, spec._for(world))

    @property
    def activation_format(self) -> str:
        """``"standard"`` or ``"batched_experts"``: the format ``prepare`` delivers."""
        return self._native.activation_format

    def topk_indices_dtype(self) -> str:
        """The dtype ``topk_ids`` must have: ``"int32"``."""
        return self._native.topk_indices_dtype()

    def max_num_tokens_per_rank(self) -> int:
        """The most tokens one ``prepare`` takes on this rank."""
        return self._native.max_num_tokens_per_rank()

    def num_dispatchers(self) -> int:
        """The ranks that send tokens to this one."""
        return self._native.num_dispatchers()

    def output_is_reduced(self) -> bool:
        """Whether ``finalize`` leaves the complete result; when False the TP ranks' outputs
        still need an all-reduce (``MoeLayer`` applies it)."""
        return self._native.output_is_reduced()

    def supports_async(self) -> bool:
        """``prepare_async`` / ``finalize_async`` are not offered."""
        return False

    def _refuse(self, what: str) -> None:
        # The call is marked abandoned, so the peers' same call fails too, naming this rank.
        self._native.abandon(what)
        raise InvalidArgumentError(what)

    def prepare(
        self,
        a1: Any,
        topk_weights: Any,
        topk_ids: Any,
        num_experts: Optional[int] = None,
        expert_map: Any = None,
        apply_router_weight_on_input: bool = False,
        quant_config: Any = None,
        defer_input_quant: Optional[bool] = None,
    ) -> PrepareResult:
        """Quantizes and dispatches this rank's tokens ``a1`` ``[n, hidden]`` with their
        ``topk_ids`` ``[n, top_k]`` int32 and ``topk_weights`` ``[n, top_k]`` float32
        (collective). Returns ``(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)``
        of the rows this rank's experts compute: ``a1q`` the wire scheme's bytes (uint8),
        ``a1q_scale`` its scales or None, ``expert_tokens_meta`` the per-expert counts of a
        batched delivery or None. The quantization is the spec's: ``quant_config`` is not read,
        and a ``num_experts`` or ``defer_input_quant`` that differs from the spec is refused.
        Expert maps and router weights applied on input are not supported."""
        if num_experts is not None and num_experts != self.spec.num_experts:
            self._refuse(
                f"prepare: num_experts = {num_experts}, the layer was built for {self.spec.num_experts}"
            )
        if expert_map is not None:
            self._refuse(
                "prepare: a per-call expert_map is not read; place the experts with LayerSpec.expert_map (each expert's EP rank), set when the layer is built"
            )
        if apply_router_weight_on_input:
            self._refuse(
                "prepare: apply_router_weight_on_input is not supported; the experts apply the weights"
            )
        if (
            defer_input_quant is not None
            and defer_input_quant != self.spec.defer_input_quant
        ):
            self._refuse(
                f"prepare: defer_input_quant = {defer_input_quant}, the layer was built with {self.spec.defer_input_quant}"
            )
        del quant_config
        return self._native.prepare(a1, topk_weights, topk_ids)

    def finalize(
        self,
        output: Any,
        fused_expert_output: Any,
        topk_weights: Any = None,
        topk_ids: Any = None,
        apply_router_weight_on_input: bool = False,
        weight_and_reduce_impl: Any = None,
    ) -> None:
        """Combines the experts' output (``[rows, hidden]`` or ``[local_experts, max_rows,
        hidden]`` in the layer's input dtype, weighted and summed per row by the experts) into
        ``output`` ``[n, hidden]``, in place (collective). The other arguments are vLLM's and
        are not read: the backend weighs nothing itself."""
        del topk_weights, topk_ids, apply_router_weight_on_input, weight_and_reduce_impl
        self._native.finalize(output, fused_expert_output)

    def abandon(self, reason: str) -> None:
        """Abandons the prepared call (the experts failed), or the coming one: every peer's
        same call fails promptly, naming this rank and ``reason``."""
        self._native.abandon(reason)

    def wait(self) -> None:
        """Waits for the work enqueued on a GPU rank's stream and raises what its kernels
        recorded (a timed-out peer, a bad id in a device array); otherwise the next call
        raises it. Host calls are complete when they return."""
        self._native.wait()


class MoeLayer:
    """The whole MoE layer on one rank: prepare, ``experts``, finalize, the sequence-parallel
    split and gather, and the TP all-reduce exactly when the backend's output is not reduced.

    ``experts(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)`` receives what
    ``PrepareFinalize.prepare`` returns and returns the experts' output (any DLPack array of
    the delivery's rows, in the input dtype). Building it is collective."""

    def __init__(
        self,
        world: World,
        backend: str,
        spec: LayerSpec,
        experts: Callable[..., Any],
    ) -> None:
        self.spec = spec
        self._native = _native.MoeLayer(world, backend, spec._for(world), experts)

    def forward(self, tokens: Any, topk_ids: Any, topk_weights: Any, out: Any) -> None:
        """Runs the layer on this rank's tokens into ``out`` ``[n, hidden]``, in place
        (collective)."""
        self._native.forward(tokens, topk_ids, topk_weights, out)

    def wait(self) -> None:
        """As ``PrepareFinalize.wait``."""
        self._native.wait()


def world_from_torch(
    group: Any = None,
    timeout_s: float = 20.0,
    device: Optional[int] = None,
    stream: Optional[int] = None,
) -> World:
    """Joins a world of the ranks of ``group`` (default: the whole ``torch.distributed``
    world), which must be initialized: rank 0 of the group picks a port, and the address
    crosses through ``torch.distributed.broadcast_object_list``. Collective over the group.
    ``device`` and ``stream`` as for ``World.connect``."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    offer: list = [None]
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(
            socket.gethostname()
        )
        offer = [(addr, World.free_local_port(), int.from_bytes(os.urandom(7), "little"))]
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(offer, src=src, group=group)
    addr, port, run_id = offer[0]
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World.connect(
        addr, port, rank, size, local_rank, local_size, run_id, timeout_s, device, stream
    )
