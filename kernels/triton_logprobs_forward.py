"""Triton forward: per-row log-sum-exp, entropy and target logit, one vocabulary tile at a time.

A program owns ``BLOCK_N`` tokens and a contiguous range of vocabulary tiles (a "split"). For each
``[BLOCK_N, BLOCK_V]`` tile it computes the logits with ``tl.dot`` over ``H`` and folds them into
three running sums (online softmax): the max ``m``, ``s = sum exp(z - m)`` and
``t = sum exp(z - m) * z``. The splits' partial sums are merged in torch (``S`` numbers per row),
which gives ``lse = m + log s`` and ``entropy = lse - t / s``. No ``[N, V]`` tensor is ever built.

Variants, chosen through the config dict (all off by default):

* ``"tma": 1``: the ``h``/``W`` tiles come through host-built Triton tensor descriptors (TMA on
  Hopper; out-of-range rows, columns and K are zero-filled by the hardware). Falls back to pointer
  loads when the Triton build has no ``TensorDescriptor``, the GPU is older than sm90, or the rows
  are not 16-byte aligned.
* ``"even_k": 1``: when ``H % BLOCK_K == 0``, the K loop loads without masks (rows and columns are
  clamped into range instead of masked; their results are discarded later).
* ``"cublas": 1``: the logits of a vocabulary chunk are one cuBLAS GEMM into an fp32 ``[N, Vc]``
  buffer (``fwd_chunk_bytes``), and a Triton row kernel folds the chunk into the running sums.
* ``"flatten": 1``: the loop over a program's vocabulary tiles and the K loop inside it become one
  software-pipelined loop (``tl.range(..., flatten=True)``), so the next tile's loads are in flight
  while the current tile's softmax epilogue runs, instead of the pipeline draining at every tile.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

#: Integer arguments that change with every batch's token count. Triton compiles a kernel again (about 1 s) for
#: each new combination of "divisible by 16" and "equal to 1" among its integer arguments and "16-byte aligned"
#: among its pointers (:func:`partial_sums` keeps the pointers aligned). On an H200 a GRPO step that met a new
#: combination took 1.2-1.5 s instead of 0.2-0.3 s. Left unspecialized, each kernel compiles once per run;
#: these arguments only bound masks and loops.
TOKEN_COUNT_ARGS = ("N",)


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def logit_tile(
    h_src,
    w_src,
    b_ptr,
    n0,
    v0,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_t,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(h[n0:n0+BN] @ w[v0:v0+BV].T + b) * inv_t`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile.

    ``h_src``/``w_src`` are tensor descriptors when ``TMA``, else pointers.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    if not TMA:
        if EVEN_K:  # clamp instead of masking: out-of-range rows/columns are discarded by the callers
            ld_n = tl.where(offs_n < N, offs_n, 0)
            ld_v = tl.where(offs_v < V, offs_v, 0)
        else:
            ld_n = offs_n
            ld_v = offs_v
        h_ptrs = h_src + ld_n[:, None] * stride_hn + offs_k[None, :]
        w_ptrs = w_src + ld_v[:, None] * stride_wv + offs_k[None, :]
    row_ok = offs_n[:, None] < N
    col_ok = offs_v[:, None] < V
    for k0 in range(0, H, BLOCK_K):
        if TMA:
            h = h_src.load([n0, k0])
            w = w_src.load([v0, k0])
        elif EVEN_K:
            h = tl.load(h_ptrs + k0)
            w = tl.load(w_ptrs + k0)
        else:
            k_ok = (k0 + offs_k)[None, :] < H
            h = tl.load(h_ptrs + k0, mask=row_ok & k_ok, other=0.0)
            w = tl.load(w_ptrs + k0, mask=col_ok & k_ok, other=0.0)
        if UPCAST:  # the CPU interpreter cannot multiply bf16 in tl.dot
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # fp32 inputs: exact fp32 products instead of TF32
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_t


@triton.jit
def _online_update(z, offs_v, y, m, s, t, zy, V):
    """Fold a scaled logit tile ``z`` (columns ``offs_v``) into the running ``(m, s, t, zy)``."""
    col_ok = offs_v[None, :] < V
    z = tl.where(col_ok, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile passed here has a real column
    alpha = tl.exp(m - m_new)
    p = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(p, axis=1)
    t = t * alpha + tl.sum(p * tl.where(col_ok, z, 0.0), axis=1)
    zy += tl.sum(tl.where((offs_v[None, :] == y[:, None]) & col_ok, z, 0.0), axis=1)
    return m_new, s, t, zy


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS + ("tiles_per_split",))
def _forward_kernel(
    h_src,
    w_src,
    b_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_t,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=FLATTEN):
        z = logit_tile(
            h_src, w_src, b_ptr, n0, v0, N, V, H, stride_hn, stride_wv, inv_t,
            HAS_BIAS, UPCAST, IEEE, TMA, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        m, s, t, zy = _online_update(z, v0 + tl.arange(0, BLOCK_V), y, m, s, t, zy, V)
    out = pid_s * N + offs_n
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS)
def _reduce_chunk_kernel(
    z_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    N,
    V,
    v_start,
    width,
    stride_z,
    inv_t,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold raw fp32 logits ``z[:, :width]`` (vocabulary ``v_start + j``) into the per-row sums."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.load(m_ptr + offs_n, mask=row_ok, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=row_ok, other=0.0)
    t = tl.load(t_ptr + offs_n, mask=row_ok, other=0.0)
    zy = tl.load(zy_ptr + offs_n, mask=row_ok, other=0.0)
    v_stop = v_start + width
    for j0 in range(0, width, BLOCK_V):
        offs_j = j0 + tl.arange(0, BLOCK_V)
        offs_v = v_start + offs_j
        ok = row_ok[:, None] & (offs_j < width)[None, :]
        z = tl.load(z_ptr + offs_n[:, None] * stride_z + offs_j[None, :], mask=ok, other=0.0)
        if HAS_BIAS:
            z = z + tl.load(b_ptr + offs_v, mask=offs_v < v_stop, other=0.0).to(tl.float32)[None, :]
        m, s, t, zy = _online_update(z * inv_t, offs_v, y, m, s, t, zy, v_stop)
    tl.store(m_ptr + offs_n, m, mask=row_ok)
    tl.store(s_ptr + offs_n, s, mask=row_ok)
    tl.store(t_ptr + offs_n, t, mask=row_ok)
    tl.store(zy_ptr + offs_n, zy, mask=row_ok)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (4 on the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def pick_splits(n_blocks: int, v_tiles: int, slots: int) -> int:
    """Number of vocabulary splits that keeps every SM busy with the least wave-quantization loss.

    Cost model: ``waves * tiles_per_program``, in units of one tile's time on one SM.
    """
    best, best_cost = 1, None
    for splits in range(1, v_tiles + 1):
        per = -(-v_tiles // splits)
        splits = -(-v_tiles // per)  # drop empty splits
        cost = -(-(n_blocks * splits) // slots) * per
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


@functools.lru_cache(maxsize=8)
def _tma_device_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return interpreting()
    return torch.cuda.get_device_capability(device)[0] >= 9


def tile_sources(
    hidden: torch.Tensor, weight: torch.Tensor, config: dict[str, int]
) -> tuple[object, object, bool, bool]:
    """What the tile kernels read ``h``/``W`` through: ``(h_src, w_src, TMA, EVEN_K)``.

    With ``config["tma"]`` set and supported, ``h_src``/``w_src`` are tensor descriptors with
    ``[BLOCK_N, BLOCK_K]`` / ``[BLOCK_V, BLOCK_K]`` blocks; otherwise the tensors themselves.
    ``EVEN_K`` is on when ``config["even_k"]`` is set and ``BLOCK_K`` divides ``H``.
    """
    bk = config["BLOCK_K"]
    even_k = bool(config.get("even_k", 0)) and hidden.shape[1] % bk == 0
    if config.get("tma", 0) and _tma_device_ok(hidden.device):
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor
        except ImportError:
            TensorDescriptor = None  # noqa: N806
        elem = hidden.element_size()
        aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * elem) % 16 == 0 for t in (hidden, weight))
        if TensorDescriptor is not None and aligned and bk * elem >= 16 and hidden.shape[0] > 0:
            try:
                h_desc = TensorDescriptor(hidden, list(hidden.shape), list(hidden.stride()), [config["BLOCK_N"], bk])
                w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [config["BLOCK_V"], bk])
                return h_desc, w_desc, True, False
            except (AssertionError, ValueError, TypeError):  # a block shape this Triton refuses
                pass
    return hidden, weight, False, even_k


@functools.lru_cache(maxsize=2)
def _out_dtype_works(op: str) -> bool:
    """Whether cuBLAS ``torch.mm`` / ``torch.addmm`` (``op``) take ``out_dtype=float32`` for bf16 inputs here."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        c = torch.ones(16, 16, device="cuda", dtype=torch.float32)
        if op == "addmm":
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)  # the call the dh accumulation makes
            return bool(c.eq(17).all())
        torch.mm(a, a, out_dtype=torch.float32, out=c)
        return bool(c.eq(16).all())
    except (RuntimeError, TypeError):
        return False


def matmul_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` into the fp32 tensor ``out``, with fp32 accumulation for low-precision ``a, b``."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda and not accumulate and _out_dtype_works("mm"):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif a.is_cuda and _out_dtype_works("addmm"):  # beta=0 ignores out's old contents
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    elif accumulate:  # CPU / old torch: products rounded to the input dtype first
        out += torch.mm(a, b).to(out.dtype)
    else:
        out.copy_(torch.mm(a, b))


def logits_chunk_fp32(buf: torch.Tensor, hidden: torch.Tensor, w_chunk: torch.Tensor) -> torch.Tensor:
    """Raw logits ``hidden @ w_chunk.T`` in fp32 in the front of the flat buffer ``buf``, as ``[N, Vc]``."""
    n, vc = hidden.shape[0], w_chunk.shape[0]
    z = buf[: n * vc].view(n, vc)
    matmul_fp32(z, hidden, w_chunk.t(), accumulate=False)  # fp32 inputs follow torch's TF32 setting
    return z


def chunk_columns(n: int, bytes_per_elem: int, budget: int, block: int, v: int) -> int:
    """Columns per vocabulary chunk: a multiple of ``block`` whose ``[n, Vc]`` buffer fits ``budget``."""
    vc = max(block, (budget // (max(n, 1) * bytes_per_elem)) // block * block)
    return min(vc, triton.cdiv(v, block) * block)


def partial_sums(splits: int, n: int, device: torch.device) -> list[torch.Tensor]:
    """Four fp32 ``[splits, n]`` buffers (``m``, ``s``, ``t``, ``zy``), each its own allocation.

    Slices of one ``[4, splits, n]`` tensor would start at offsets that are 16-byte aligned for some ``n`` and
    not for others; Triton specializes pointer arguments on that alignment, so each new token count could
    compile the kernel again. Separate allocations always start aligned.
    """
    return [torch.empty((splits, n), dtype=torch.float32, device=device) for _ in range(4)]


def _forward_cublas(hidden, weight, bias, targets, inv_t, config):
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    bv = config.get("RED_BLOCK_V", 256)
    bn = config.get("RED_BLOCK_N", 8)
    vc = chunk_columns(n, 4, config.get("fwd_chunk_bytes", 32 << 20), bv, v)
    buf = torch.empty(n * min(vc, v), dtype=torch.float32, device=dev)
    stats = partial_sums(1, n, dev)
    stats[0].fill_(float("-inf"))
    for t in stats[1:]:
        t.zero_()
    for v0 in range(0, v, vc):
        v1 = min(v0 + vc, v)
        z = logits_chunk_fp32(buf, hidden, weight[v0:v1])
        _reduce_chunk_kernel[(triton.cdiv(n, bn),)](
            z, hidden if bias is None else bias, targets, stats[0], stats[1], stats[2], stats[3],
            n, v, v0, v1 - v0, z.stride(0), inv_t,
            HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_V=bv, num_warps=4,
        )  # fmt: skip
    return stats


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    config: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernel; return fp32 ``(logp, entropy, lse)`` per row (masked rows not zeroed).

    Args:
        hidden: ``[N, H]`` contiguous, same dtype as ``weight``.
        weight: ``[V, H]`` contiguous.
        bias: ``[V]`` or None.
        targets: ``[N]`` ids; any id outside ``[0, V)`` gets target logit 0.
        inv_t: ``1 / temperature``.
        config: ``BLOCK_N``, ``BLOCK_V``, ``BLOCK_K``, ``num_warps``, ``num_stages``, optional
            ``tma`` / ``even_k`` / ``cublas`` / ``flatten`` flags (see the module docstring).
    """
    n, hdim = hidden.shape
    v = weight.shape[0]
    if config.get("cublas", 0):
        part = _forward_cublas(hidden, weight, bias, targets, inv_t, config)
    else:
        bn, bv = config["BLOCK_N"], config["BLOCK_V"]
        n_blocks, v_tiles = triton.cdiv(n, bn), triton.cdiv(v, bv)
        splits = pick_splits(n_blocks, v_tiles, num_sms(hidden.device) * config.get("ctas_per_sm", 1))
        per = triton.cdiv(v_tiles, splits)
        splits = triton.cdiv(v_tiles, per)
        part = partial_sums(splits, n, hidden.device)
        h_src, w_src, tma, even_k = tile_sources(hidden, weight, config)
        _forward_kernel[(n_blocks, splits)](
            h_src, w_src, hidden if bias is None else bias, targets,
            *part,
            n, v, hdim, hidden.stride(0), weight.stride(0), inv_t, per,
            HAS_BIAS=bias is not None,
            UPCAST=interpreting(),
            IEEE=hidden.dtype == torch.float32,
            TMA=tma, EVEN_K=even_k, FLATTEN=bool(config.get("flatten", 0)),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip
    m, s, t, zy = part
    m_max = m.amax(0)
    scale = torch.exp(m - m_max)
    s_tot = (s * scale).sum(0)
    lse = m_max + torch.log(s_tot)
    entropy = lse - (t * scale).sum(0) / s_tot
    logp = zy.sum(0) - lse
    return logp, entropy, lse
