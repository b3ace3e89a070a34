"""Triton backward: logit gradients for one vocabulary chunk, then two cuBLAS matmuls per chunk.

For a chunk of ``Vc`` vocabulary rows the kernel recomputes the logit tiles, turns them into
``dz = (-p * (g_logp + g_ent * (log p + H)) + g_logp * onehot(y)) / T`` using the per-row ``lse``
and entropy saved by the forward, and writes ``dz`` ``[N, Vc]`` in the input dtype. Then

* ``dW[chunk] = dz.T @ h``: a full-depth (K = N) matmul written straight into its rows of ``dW``,
  so ``dW`` needs no fp32 accumulator and no atomics;
* ``dh += dz @ W[chunk]``: accumulated in fp32 across chunks.

Why not fully fused (dh and dW from registers through atomics, as Cut Cross-Entropy does)? The
outputs ``[tile, H]`` are far too large for registers, so each tile pair would issue
``BLOCK * H`` fp32 atomics on both sides: ``N*V*H*(1/BLOCK_N + 1/BLOCK_V)`` atomics in total,
about 3e10 at N=8192, V=151936, H=1536, which is slower than the matmuls themselves on H100.
A bounded ``dz`` chunk (``dz_chunk_bytes``) costs one write and two reads of ``N * Vc`` elements
and lets cuBLAS do two thirds of the backward flops near peak.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_logprobs_forward import interpreting, logit_tile


@triton.jit
def _dz_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    ent_ptr,
    gl_ptr,
    ge_ptr,
    dz_ptr,
    N,
    V,
    H,
    v_start,
    v_stop,
    stride_hn,
    stride_wv,
    stride_dz,
    inv_t,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    z = logit_tile(
        h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_t,
        HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + offs_n, mask=row_ok, other=0.0)  # zero on masked rows
    ge = tl.load(ge_ptr + offs_n, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = -p * (gl[:, None] + ge[:, None] * (logp + ent[:, None]))
    dz = tl.where(offs_v[None, :] == y[:, None], dz + gl[:, None], dz) * inv_t
    ptrs = dz_ptr + offs_n[:, None] * stride_dz + (offs_v - v_start)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_v < v_stop)[None, :])


@functools.lru_cache(maxsize=1)
def _mm_out_dtype_works() -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` (bf16/fp16 in, fp32 accumulate) runs here."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        c = torch.ones(16, 16, device="cuda", dtype=torch.float32)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)  # exactly the call _accumulate_dh makes
        return bool(c.eq(17).all())
    except (RuntimeError, TypeError):
        return False


def _accumulate_dh(dh_acc: torch.Tensor, dz: torch.Tensor, w_chunk: torch.Tensor) -> None:
    """``dh_acc += dz @ w_chunk`` with an fp32 accumulator and low-precision operands."""
    if dz.dtype == dh_acc.dtype:
        dh_acc.addmm_(dz, w_chunk)
    elif dz.is_cuda and _mm_out_dtype_works():
        torch.addmm(dh_acc, dz, w_chunk, out_dtype=torch.float32, out=dh_acc)
    else:
        dh_acc += torch.mm(dz, w_chunk).float()


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor,
    inv_t: float,
    needs: tuple[bool, bool, bool],
    config: dict[str, int],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(dh, dW, dbias)`` in fp32 for dh/dbias and in ``weight.dtype`` for dW (None if unneeded).

    Args:
        hidden: ``[N, H]`` contiguous, same dtype as ``weight``.
        weight: ``[V, H]`` contiguous.
        bias: ``[V]`` or None.
        targets: ``[N]`` ids.
        lse: fp32 ``[N]`` log-sum-exp of the scaled logits, from the forward.
        entropy: fp32 ``[N]`` from the forward.
        grad_logp: fp32 ``[N]`` upstream gradient of logp, already zero on masked rows.
        grad_ent: fp32 ``[N]`` upstream gradient of the entropy, already zero on masked rows.
        inv_t: ``1 / temperature``.
        needs: whether dh, dW, dbias are wanted.
        config: tile sizes plus ``dz_chunk_bytes`` (the ``[N, Vc]`` buffer's size bound).
    """
    need_h, need_w, need_b = needs
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    elem = hidden.element_size()
    vc = max(bv, (config["dz_chunk_bytes"] // (max(n, 1) * elem)) // bv * bv)
    vc = min(vc, triton.cdiv(v, bv) * bv)
    dz = torch.empty((n, vc), dtype=hidden.dtype, device=dev)
    dh = torch.zeros((n, hdim), dtype=torch.float32, device=dev) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(v, dtype=torch.float32, device=dev) if need_b else None
    for v0 in range(0, v, vc):
        v1 = min(v0 + vc, v)
        dz_c = dz[:, : v1 - v0]
        _dz_kernel[(triton.cdiv(n, bn), triton.cdiv(v1 - v0, bv))](
            hidden, weight, hidden if bias is None else bias, targets, lse, entropy, grad_logp, grad_ent,
            dz_c, n, v, hdim, v0, v1, hidden.stride(0), weight.stride(0), dz.stride(0), inv_t,
            HAS_BIAS=bias is not None,
            UPCAST=interpreting(),
            IEEE=hidden.dtype == torch.float32,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=config["BLOCK_K"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip
        if need_w:
            torch.mm(dz_c.t(), hidden, out=dw[v0:v1])
        if need_h:
            _accumulate_dh(dh, dz_c, weight[v0:v1])
        if need_b:
            torch.sum(dz_c, dim=0, dtype=torch.float32, out=db[v0:v1])
    return dh, dw, db
