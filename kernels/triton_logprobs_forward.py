"""Triton forward: per-row log-sum-exp, entropy and target logit, one vocabulary tile at a time.

A program owns ``BLOCK_N`` tokens and a contiguous range of vocabulary tiles (a "split"). For each
``[BLOCK_N, BLOCK_V]`` tile it computes the logits with ``tl.dot`` over ``H`` and folds them into
three running sums (online softmax): the max ``m``, ``s = sum exp(z - m)`` and
``t = sum exp(z - m) * z``. The splits' partial sums are merged in torch (``S`` numbers per row),
which gives ``lse = m + log s`` and ``entropy = lse - t / s``. No ``[N, V]`` tensor is ever built.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    offs_n,
    offs_v,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_t,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(h[offs_n] @ w[offs_v].T + b[offs_v]) * inv_t`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_n[:, None] < N
    col_ok = offs_v[:, None] < V
    h_ptrs = h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :]
    w_ptrs = w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :]
    for k0 in range(0, H, BLOCK_K):
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
def _forward_kernel(
    h_ptr,
    w_ptr,
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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = logit_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_t,
            HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        col_ok = offs_v[None, :] < V
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every split starts with a real column
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        t = t * alpha + tl.sum(p * tl.where(col_ok, z, 0.0), axis=1)
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + offs_n
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


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
        config: ``BLOCK_N``, ``BLOCK_V``, ``BLOCK_K``, ``num_warps``, ``num_stages``.
    """
    n, hdim = hidden.shape
    v = weight.shape[0]
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    n_blocks, v_tiles = triton.cdiv(n, bn), triton.cdiv(v, bv)
    splits = pick_splits(n_blocks, v_tiles, num_sms(hidden.device) * config.get("ctas_per_sm", 1))
    per = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, per)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    _forward_kernel[(n_blocks, splits)](
        hidden, weight, hidden if bias is None else bias, targets,
        part[0], part[1], part[2], part[3],
        n, v, hdim, hidden.stride(0), weight.stride(0), inv_t, per,
        HAS_BIAS=bias is not None,
        UPCAST=interpreting(),
        IEEE=hidden.dtype == torch.float32,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    m, s, t, zy = part.unbind(0)
    m_max = m.amax(0)
    scale = torch.exp(m - m_max)
    s_tot = (s * scale).sum(0)
    lse = m_max + torch.log(s_tot)
    entropy = lse - (t * scale).sum(0) / s_tot
    logp = zy.sum(0) - lse
    return logp, entropy, lse
