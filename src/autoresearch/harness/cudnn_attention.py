"""cuDNN's fused attention with a sliding window, as a torch op that torch.compile can trace.

torch's SDPA reaches cuDNN's fused kernels only for full causal attention: a sliding window there is
an explicit mask, which costs the work of a full layer and a read of the mask. cuDNN's graph API
(the nvidia-cudnn-frontend package, over the libcudnn that torch installs) also takes a diagonal
band, whose skipped tiles cost nothing. On an H100 a window of half the context runs forward and
backward in 4.2 ms per layer at the reference's shape, against 5.3 ms for FlexAttention.

`attention(q, k, v, window)` is the entry point. The graphs are built once per shape, layout and
window, then reused; the op's autograd formula runs cuDNN's backward graph.
"""
import importlib.util

import torch

_GRAPHS: dict[tuple, tuple] = {}  # key -> (graph, workspace bytes)
_HANDLES: dict[int, object] = {}  # CUDA device index -> cuDNN handle
Q, K, V, O, STATS, DO, DQ, DK, DV = range(1, 10)  # the graphs' tensor ids


def available(device: torch.device) -> bool:
    """True where this op can serve `device`: a Hopper or newer GPU with the frontend installed."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return importlib.util.find_spec("cudnn") is not None  # nvidia-cudnn-frontend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention on (B, H, T, D) bf16 or fp16 CUDA tensors, k and v with H or a divisor of H
    heads; each query sees itself and the `window` keys before it (window >= T: full causal). The
    output is (B, H, T, D), laid out as (B, T, H, D) so that merging the heads after it is free."""
    return torch.ops.autoresearch.cudnn_attention(q, k, v, window)[0]


def _bthd_like(q: torch.Tensor) -> torch.Tensor:
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _stats_like(q: torch.Tensor) -> torch.Tensor:
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, 1, dtype=torch.float32)  # per-row log-sum-exp, kept for the backward


@torch.library.custom_op("autoresearch::cudnn_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    o, stats = _bthd_like(q), _stats_like(q)
    _execute("fwd", window, {Q: q, K: k, V: v, O: o, STATS: stats})
    return o, stats


@_forward.register_fake
def _forward_fake(q, k, v, window):
    return _bthd_like(q), _stats_like(q)


@torch.library.custom_op("autoresearch::cudnn_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              stats: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _execute("bwd", window, {Q: q, K: k, V: v, O: o, STATS: stats, DO: do, DQ: dq, DK: dk, DV: dv})
    return dq, dk, dv


@_backward.register_fake
def _backward_fake(do, q, k, v, o, stats, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.window = inputs
    ctx.save_for_backward(q, k, v, *output)


def _gradients(ctx, do, _dstats):  # the log-sum-exps are an internal output: no gradient flows into them
    q, k, v, o, stats = ctx.saved_tensors
    return (*torch.ops.autoresearch.cudnn_attention_backward(do, q, k, v, o, stats, ctx.window), None)


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _execute(kind: str, window: int, tensors: dict[int, torch.Tensor]) -> None:
    import cudnn

    q = tensors[Q]
    if q.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != q.dtype for t in (tensors[K], tensors[V])):
        raise TypeError(f"cuDNN attention takes q, k and v all bf16 or all fp16, got {q.dtype}, "
                        f"{tensors[K].dtype}, {tensors[V].dtype}: run it under bf16 autocast, as train.py does on "
                        "CUDA, or use another attention path")
    for uid, t in tensors.items():
        if t.stride(-1) != 1:
            tensors[uid] = t = t.contiguous()  # cuDNN needs the head channels packed
    key = (kind, window, q.dtype, q.device.index) + tuple((t.shape, t.stride()) for t in tensors.values())
    handle = _HANDLES.get(q.device.index)
    if handle is None:
        with torch.cuda.device(q.device):
            handle = _HANDLES[q.device.index] = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    if key not in _GRAPHS:
        _GRAPHS[key] = _build(cudnn, handle, kind, window, tensors)
    graph, workspace_bytes = _GRAPHS[key]
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=q.device)
    graph.execute(tensors, workspace, handle=handle)


def _build(cudnn, handle, kind: str, window: int, tensors: dict[int, torch.Tensor]):
    io = cudnn.data_type.BFLOAT16 if tensors[Q].dtype == torch.bfloat16 else cudnn.data_type.HALF
    graph = cudnn.pygraph(handle=handle, io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT)

    def data_type(t):  # the log-sum-exps are fp32, the rest q's dtype
        return cudnn.data_type.FLOAT if t.dtype == torch.float32 else io

    def declare(uid):
        t = tensors[uid]
        return graph.tensor(name=str(uid), dim=list(t.shape), stride=list(t.stride()), uid=uid, data_type=data_type(t))

    def output(node, uid):
        t = tensors[uid]
        node.set_uid(uid).set_output(True).set_dim(list(t.shape)).set_stride(list(t.stride()))
        node.set_data_type(data_type(t))

    T = tensors[Q].size(2)
    # The band keeps key j for query i when i - window <= j <= i; cuDNN's left bound counts the query itself.
    band = dict(attn_scale=tensors[Q].size(-1) ** -0.5, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                diagonal_band_right_bound=0, diagonal_band_left_bound=window + 1 if window < T else None)
    q, k, v = declare(Q), declare(K), declare(V)
    if kind == "fwd":
        o, stats = graph.sdpa(name="attention", q=q, k=k, v=v, generate_stats=True, **band)
        output(o, O)
        output(stats, STATS)
    else:
        dq, dk, dv = graph.sdpa_backward(name="attention_backward", q=q, k=k, v=v, o=declare(O), dO=declare(DO),
                                         stats=declare(STATS), **band)
        for node, uid in ((dq, DQ), (dk, DK), (dv, DV)):
            output(node, uid)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except cudnn.cudnnGraphNotSupportedError as e:
        raise RuntimeError(
            f"cuDNN {cudnn.backend_version_string()} has no kernel for this attention ({kind}, q of shape "
            f"{tuple(tensors[Q].shape)}, window {window}): {e}. Head dimensions of 64 and 128 are known to "
            "work; otherwise serve attention another way (train.py's setup_device chooses the path).") from e
    return graph, graph.get_workspace_size()
