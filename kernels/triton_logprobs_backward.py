"""Triton backward: logit gradients for one vocabulary chunk, then two cuBLAS matmuls per chunk.

When dh is needed, the tokens are processed in row groups of at most ``dh_acc_bytes / (4 * H)``
rows (a multiple of ``BLOCK_N``, at least ``BLOCK_N``, balanced; a single group when that covers
``N``), and inside a group the vocabulary in chunks of ``Vc`` rows (outer loop: groups, inner:
chunks). For each (group, chunk) the kernel recomputes the logit tiles, turns them into
``dz = (-p * (g_logp + g_ent * (log p + H)) + g_logp * onehot(y)) / T`` using the per-row ``lse``
and entropy saved by the forward, and writes ``dz`` ``[rows, Vc]`` in the input dtype. Then

* ``dW[chunk] (+)= dz.T @ h[group]``: written straight into its rows of ``dW`` for the first
  group and added with ``addmm(beta=1)`` for the others, in the weight's dtype (one rounding per
  group; fp32 when the caller's weight is fp32), so no fp32 ``[V, H]`` accumulator and no atomics;
* ``dh[group] += dz @ W[chunk]``: accumulated in an fp32 ``[rows, H]`` buffer across the chunks,
  then written into the group's rows of the ``dh`` output (directly into ``dh`` for fp32 inputs).

With the ``flatten`` variant the ``dz`` kernel runs persistent (about one program per SM walking
the chunk's tiles in one flattened, software-pipelined loop) instead of one program per tile.

Extra memory beyond the returned gradients: the ``dz`` chunk (at most ``dz_chunk_bytes``, which
also covers the fp32 logits chunk of the ``cublas`` variant; at least ``rows * BLOCK_V``
elements), the fp32 dh accumulator (at most ``dh_acc_bytes``; none for fp32 inputs) and an fp32
``[V]`` dbias: 32 + 24 MiB + 4V bytes with the GPU defaults, whatever ``N`` and ``H``.

Why not fully fused (dh and dW from registers through atomics, as Cut Cross-Entropy does)? The
outputs ``[tile, H]`` are far too large for registers, so each tile pair would issue
``BLOCK * H`` fp32 atomics on both sides: ``N*V*H*(1/BLOCK_N + 1/BLOCK_V)`` atomics in total,
about 3e10 at N=8192, V=151936, H=1536, which is slower than the matmuls themselves on H100.
A bounded ``dz`` chunk costs one write and two reads of ``rows * Vc`` elements and lets cuBLAS
do two thirds of the backward flops near peak.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_logprobs_forward import (
    TOKEN_COUNT_ARGS,
    chunk_columns,
    interpreting,
    logit_tile,
    logits_chunk_fp32,
    matmul_fp32,
    num_sms,
    tile_sources,
)


@triton.jit
def _dz_tile(
    h_src, w_src, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, z_ptr, dz_ptr,
    n0, v0, N, V, H, v_start, v_stop, stride_hn, stride_wv, stride_dz, inv_t,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    FROM_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Write ``dz`` of the ``[BLOCK_N, BLOCK_V]`` tile at rows ``n0`` and vocabulary ``v0``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    out_ok = row_ok[:, None] & (offs_v < v_stop)[None, :]
    if FROM_LOGITS:  # raw fp32 logits of this chunk, same layout as dz
        z_ptrs = z_ptr + offs_n[:, None] * stride_dz + (offs_v - v_start)[None, :]
        z = tl.load(z_ptrs, mask=out_ok, other=0.0)
        if HAS_BIAS:
            z = z + tl.load(b_ptr + offs_v, mask=offs_v < v_stop, other=0.0).to(tl.float32)[None, :]
        z = z * inv_t
    else:
        z = logit_tile(
            h_src, w_src, b_ptr, n0, v0, N, V, H, stride_hn, stride_wv, inv_t,
            HAS_BIAS, UPCAST, IEEE, TMA, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
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
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS)
def _dz_kernel(
    h_src,
    w_src,
    b_ptr,
    y_ptr,
    lse_ptr,
    ent_ptr,
    gl_ptr,
    ge_ptr,
    z_ptr,
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
    TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dz`` for rows ``[0, N)`` and vocabulary ``[v_start, v_stop)``; logits from ``z_ptr`` if ``FROM_LOGITS``.

    One tile per program on a ``(row blocks, vocabulary tiles)`` grid, or, when ``PERSISTENT``, a
    1-D grid of about one program per SM, each walking tiles ``pid, pid + programs, ...`` (rows
    fastest, so programs running together share ``W`` tiles) in one flattened, pipelined loop.
    """
    if PERSISTENT:
        n_blocks = tl.cdiv(N, BLOCK_N)
        num_tiles = n_blocks * tl.cdiv(v_stop - v_start, BLOCK_V)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _dz_tile(
                h_src, w_src, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, z_ptr, dz_ptr,
                (tile % n_blocks) * BLOCK_N, v_start + (tile // n_blocks) * BLOCK_V,
                N, V, H, v_start, v_stop, stride_hn, stride_wv, stride_dz, inv_t,
                HAS_BIAS, UPCAST, IEEE, TMA, EVEN_K, FROM_LOGITS, BLOCK_N, BLOCK_V, BLOCK_K,
            )  # fmt: skip
    else:
        _dz_tile(
            h_src, w_src, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, z_ptr, dz_ptr,
            tl.program_id(0) * BLOCK_N, v_start + tl.program_id(1) * BLOCK_V,
            N, V, H, v_start, v_stop, stride_hn, stride_wv, stride_dz, inv_t,
            HAS_BIAS, UPCAST, IEEE, TMA, EVEN_K, FROM_LOGITS, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip


def group_rows(n: int, hdim: int, block_n: int, dh_acc_bytes: int) -> int:
    """Rows per token group, so that the fp32 ``[rows, hdim]`` dh accumulator fits ``dh_acc_bytes``.

    At most ``dh_acc_bytes / (4 * hdim)`` rounded down to a multiple of ``block_n`` (at least
    ``block_n``), lowered so the groups have about equal size; ``n`` when one group covers it.
    """
    cap = max(block_n, (dh_acc_bytes // (4 * hdim)) // block_n * block_n)
    if cap >= n:
        return max(n, 1)
    groups = triton.cdiv(n, cap)
    return min(cap, triton.cdiv(triton.cdiv(n, groups), block_n) * block_n)


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
    dw_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(dh, dW, dbias)``, None where not needed.

    dh comes in ``hidden.dtype``, dW in ``weight.dtype`` (fp32 if ``dw_dtype`` asks for it), dbias
    in fp32.

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
        config: tile sizes, ``dz_chunk_bytes`` (bound of the ``[rows, Vc]`` chunk buffers),
            ``dh_acc_bytes`` (bound of the fp32 ``[rows, H]`` dh accumulator), variant flags.
        dw_dtype: dtype of the caller's weight; fp32/fp64 with a low-precision ``weight`` makes
            dW accumulate across token groups in fp32.
    """
    need_h, need_w, need_b = needs
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    from_logits = bool(config.get("cublas", 0))
    persistent = bool(config.get("flatten", 0)) and not from_logits
    slots = num_sms(dev) * config.get("ctas_per_sm", 1)
    low_precision = hidden.dtype != torch.float32
    # fp32 inputs accumulate dh in the output itself, but use the same groups (one code path)
    rows = group_rows(n, hdim, bn, config.get("dh_acc_bytes", 24 << 20)) if need_h else max(n, 1)
    bytes_per = hidden.element_size() + (4 if from_logits else 0)
    vc = chunk_columns(rows, bytes_per, config["dz_chunk_bytes"], bv, v)
    width = min(vc, v)
    dz_buf = torch.empty(rows * width, dtype=hidden.dtype, device=dev)
    z_buf = torch.empty(rows * width, dtype=torch.float32, device=dev) if from_logits else None
    dh_acc = torch.empty((rows, hdim), dtype=torch.float32, device=dev) if need_h and low_precision else None
    dh = torch.empty((n, hdim), dtype=hidden.dtype, device=dev) if need_h else None
    wide_dw = low_precision and dw_dtype in (torch.float32, torch.float64)
    alloc = torch.zeros if n == 0 else torch.empty  # the first group writes every row of dW and dbias
    dw = alloc(weight.shape, dtype=torch.float32 if wide_dw else weight.dtype, device=dev) if need_w else None
    db = alloc(v, dtype=torch.float32, device=dev) if need_b else None
    for gi, g0 in enumerate(range(0, n, rows)):
        g1 = min(g0 + rows, n)
        m = g1 - g0
        h_g = hidden[g0:g1]
        h_src, w_src, tma, even_k = tile_sources(h_g, weight, config)
        acc = None if dh is None else (dh[g0:g1] if dh_acc is None else dh_acc[:m])
        for ci, v0 in enumerate(range(0, v, vc)):
            v1 = min(v0 + vc, v)
            dz_c = dz_buf[: m * (v1 - v0)].view(m, v1 - v0)
            z_c = logits_chunk_fp32(z_buf, h_g, weight[v0:v1]) if from_logits else dz_c
            tiles = (triton.cdiv(m, bn), triton.cdiv(v1 - v0, bv))
            grid = (min(tiles[0] * tiles[1], slots),) if persistent else tiles
            _dz_kernel[grid](
                h_src, w_src, hidden if bias is None else bias, targets[g0:g1], lse[g0:g1], entropy[g0:g1],
                grad_logp[g0:g1], grad_ent[g0:g1], z_c, dz_c,
                m, v, hdim, v0, v1, hidden.stride(0), weight.stride(0), dz_c.stride(0), inv_t,
                HAS_BIAS=bias is not None,
                UPCAST=interpreting(),
                IEEE=hidden.dtype == torch.float32,
                TMA=tma, EVEN_K=even_k, FROM_LOGITS=from_logits, PERSISTENT=persistent,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=config["BLOCK_K"],
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )  # fmt: skip
            if need_w:
                if wide_dw:
                    matmul_fp32(dw[v0:v1], dz_c.t(), h_g, accumulate=gi > 0)
                elif gi == 0:
                    torch.mm(dz_c.t(), h_g, out=dw[v0:v1])
                else:
                    dw[v0:v1].addmm_(dz_c.t(), h_g)  # beta=1: one rounding to the weight dtype per group
            if need_h:
                matmul_fp32(acc, dz_c, weight[v0:v1], accumulate=ci > 0)
            if need_b:
                if gi == 0:
                    torch.sum(dz_c, dim=0, dtype=torch.float32, out=db[v0:v1])
                else:
                    db[v0:v1] += dz_c.sum(dim=0, dtype=torch.float32)
        if dh_acc is not None:
            dh[g0:g1].copy_(acc)
    return dh, dw, db
