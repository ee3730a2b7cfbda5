"""Triton kernels for token log-probs straight from hidden states: LM head + log-softmax + gather.

The ``[N, V]`` logits are never written to memory. With ``z = (x @ W.T + b) / T``:

Forward (two kernels):

* ``_fwd_kernel``: program ``(row tile, vocabulary split)`` computes the logits tiles of its
  split (``tl.dot`` over ``H`` with an fp32 accumulator), and keeps, per row and relative
  to the running max ``m``: ``s = sum(exp(z - m))``, ``t = sum(exp(z - m) * (z - m))``
  (entropy) and the label's logit. Writes these four fp32 values per row and split.
* ``_combine_kernel``: merges the splits in a fixed order into ``logp = z[label] - m - log s``,
  ``entropy = log s - t / s`` and the per-row stats ``(m, log s)`` kept for backward.

Backward, per vocabulary chunk of ``C`` columns (three kernels):

* ``_dlogits_kernel``: recomputes a logits tile and writes
  ``dz = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T`` into an ``[N, C]`` workspace
  (the inputs' dtype, the operand of the next GEMMs), plus per-row-tile fp32 column sums
  of ``dz`` for the bias gradient.
* ``_dhidden_kernel``: ``grad_hidden += dz @ W[chunk]``; each program owns an output tile
  and reads/adds the running fp32 sum (the output itself for fp32 inputs, an fp32
  ``[N, H]`` buffer otherwise; no buffer with one chunk).
* ``_dweight_kernel``: ``grad_weight[chunk] = dz.T @ x``; each program owns an output tile
  and loops over all rows. Chunks own disjoint rows of ``grad_weight``.

Every output element is written by one program in a fixed order: no atomics, bitwise
deterministic. The chunk is chosen so that the workspace holds at most
``WORKSPACE_ELEMS`` elements (at least one vocabulary tile per row).

Why a ``dz`` workspace: ``grad_hidden`` sums over the vocabulary and ``grad_weight`` over
the rows, so a single recompute pass feeding both needs atomics or ``[tile, H]``
accumulators, which do not fit in registers for ``H`` in the thousands. Writing ``dz`` one
chunk at a time keeps the memory bounded and lets both gradient GEMMs run as plain
tiled GEMMs; the extra traffic (write ``dz`` once, read it twice) is small next to the
GEMMs for ``H >= 1024``. Work: forward 1 GEMM, backward 3 (recompute, two gradients).

``tl.dot`` on bf16 operands returns garbage under the Triton interpreter, so the operands
are cast to fp32 only when ``INTERPRET`` (products of bf16/fp16 values are exact in fp32,
so this models the tensor-core result); compiled runs keep bf16/fp16 tensor-core dots.
fp32 inputs use ``input_precision="ieee"`` unless ``torch.get_float32_matmul_precision()``
allows TF32, as ``torch.matmul`` does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastrlhf.backend import triton_interpreter

_NEG_INF = tl.constexpr(float("-inf"))

WORKSPACE_ELEMS = 2**26
"""Most elements of the backward's ``dz`` workspace (128 MiB in bf16) before it is chunked:
at N = 8192, V = 151936 that is 5 % of the logits the op never writes, in chunks of 8192
vocabulary columns (GEMMs still large enough to run at tensor-core speed)."""


@triton.jit
def _grouped(pid, num_a, num_b, GROUP: tl.constexpr):
    """Tile ``(a, b)`` of program ``pid``, with ``GROUP`` consecutive ``a`` tiles per column
    of programs so that programs running together share operand tiles in L2."""
    width = GROUP * num_b
    first = (pid // width) * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk, inv_temp,
                 HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``z = (x[rows] @ w[cols].T + b[cols]) * inv_temp``;
    ``-inf`` where ``col_ok`` is false. ``rows``/``cols`` are int64."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * sxn + ks[None, :] * sxk
    w_ptrs = w_ptr + cols[None, :] * swv + ks[:, None] * swk
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = ks < H - k
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRET:  # bf16 tl.dot is wrong under the interpreter; fp32 products are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, _NEG_INF)


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, part_ptr,
    N, V, H, sxn, sxk, swv, swk, inv_temp, splits, tiles_per_split, step,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Consecutive programs share a row tile (x in L2); programs of one split walk the
    # same vocabulary tiles at the same time (W in L2).
    pid = tl.program_id(0)
    split = pid % splits
    rows = (pid // splits).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], _NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_label = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk,
                         inv_temp, HAS_BIAS, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row of -inf so far: keep exp finite
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        if WITH_ENTROPY:
            t = alpha * (t + tl.where(s > 0, m - shift, 0.0) * s)
            t += tl.sum(e * tl.where(e > 0, z - shift[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == labels[:, None]) & col_ok[None, :]
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)
    # part is [4, splits, N] (step = splits * N): m, s, t, z_label
    out = part_ptr + split.to(tl.int64) * N + rows
    row_ok = rows < N
    tl.store(out, m, mask=row_ok)
    tl.store(out + step, s, mask=row_ok)
    tl.store(out + 2 * step, t, mask=row_ok)
    tl.store(out + 3 * step, z_label, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_ptr, labels_ptr, logp_ptr, ent_ptr, stats_ptr, N, V, splits, step, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    m = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    t = tl.zeros([BLOCK_R], dtype=tl.float32)
    z_label = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (sp < splits)[None, :]
        ptrs = part_ptr + sp[None, :].to(tl.int64) * N + rows[:, None]
        m_b = tl.load(ptrs, mask=ok, other=_NEG_INF)
        s_b = tl.load(ptrs + step, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(m_b, axis=1))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = tl.exp(m - shift)
        beta = tl.exp(m_b - shift[:, None])
        if WITH_ENTROPY:
            t_b = tl.load(ptrs + 2 * step, mask=ok, other=0.0)
            t = alpha * (t + tl.where(s > 0, m - shift, 0.0) * s)
            t += tl.sum(beta * (t_b + tl.where(s_b > 0, m_b - shift[:, None], 0.0) * s_b), axis=1)
        s = s * alpha + tl.sum(beta * s_b, axis=1)
        m = m_new
        z_label += tl.sum(tl.load(ptrs + 3 * step, mask=ok, other=0.0), axis=1)
    s = tl.where(row_ok, s, 1.0)  # rows past N: no log(0) warnings
    log_s = tl.log(s)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    keep = label != ignore_index
    # Clamps keep NaN (the default drops it: NaN/+inf logits would give 0, not NaN)
    logp = tl.minimum((z_label - m) - log_s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where((label >= 0) & (label < V), logp, float("nan"))
    tl.store(logp_ptr + rows, tl.where(keep, logp, 0.0), mask=row_ok)
    tl.store(stats_ptr + 2 * rows, m, mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, log_s, mask=row_ok)
    if WITH_ENTROPY:
        ent = tl.maximum(log_s - t / s, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ent_ptr + rows, tl.where(keep, ent, 0.0), mask=row_ok)


@triton.jit
def _dlogits_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr, dbias_ptr,
    N, V, H, v_start, width, sxn, sxk, swv, swk, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz of columns ``[v_start, v_start + width)`` into ``dz [N, width]`` (row stride ``width``)."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(width, BLOCK_V), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    row_ok = rows < N
    col_ok = local < width
    z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk,
                     inv_temp, HAS_BIAS, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    keep = label != ignore_index
    g_logp = tl.where(keep, tl.load(glogp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    m = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    logq = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(logq)
    g = tl.where(cols[None, :] == label[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if WITH_ENTROPY:
        g_ent = tl.where(keep, tl.load(gent_ptr + rows, mask=row_ok, other=0.0), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g -= g_ent[:, None] * p * tl.where(p > 0, logq + ent[:, None], 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g * inv_temp, 0.0)  # padding rows/columns: no exp() overflow leaks into sums
    tl.store(dz_ptr + rows[:, None] * width + local[None, :], g.to(dz_ptr.dtype.element_ty), mask=ok)
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n.to(tl.int64) * width + local, tl.sum(g, axis=0), mask=col_ok)


@triton.jit
def _dhidden_kernel(
    dz_ptr, w_ptr, acc_ptr, out_ptr, N, H, v_start, width, swv, swk,
    LOAD_ACC: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = (acc if LOAD_ACC else 0) + dz @ w[v_start:v_start + width]``; ``acc``/``out`` are [N, H]."""
    pid_n, pid_h = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_H), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    h_ok = hs < H
    a_ptrs = dz_ptr + rows[:, None] * width + ks[None, :]
    b_ptrs = w_ptr + (v_start + ks[:, None]).to(tl.int64) * swv + hs[None, :] * swk
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for k in range(0, width, BLOCK_K):
        k_ok = ks < width - k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if INTERPRET:  # see the module docstring
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * swv
    offs = rows[:, None] * H + hs[None, :]
    ok = row_ok[:, None] & h_ok[None, :]
    if LOAD_ACC:
        acc += tl.load(acc_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dweight_kernel(
    dz_ptr, x_ptr, dw_ptr, N, H, v_start, width, sxn, sxk,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dw[v_start:v_start + width] = dz.T @ x`` (``dw`` is a contiguous [V, H])."""
    pid_v, pid_h = _grouped(tl.program_id(0), tl.cdiv(width, BLOCK_V), tl.cdiv(H, BLOCK_H), GROUP)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    v_ok = local < width
    h_ok = hs < H
    a_ptrs = dz_ptr + ks[None, :] * width + local[:, None]  # dz.T tile [BLOCK_V, BLOCK_K]
    b_ptrs = x_ptr + ks[:, None] * sxn + hs[None, :] * sxk
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    for k in range(0, N, BLOCK_K):
        k_ok = ks < N - k
        a = tl.load(a_ptrs, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if INTERPRET:  # see the module docstring
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * width
        b_ptrs += BLOCK_K * sxn
    offs = (v_start + local[:, None]) * H + hs[None, :]
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=v_ok[:, None] & h_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _config(dtype: torch.dtype) -> dict:
    """Tile sizes. Compiled: 128x128 output tiles (wgmma/mma friendly), K step 64 for 16-bit
    inputs and 32 for fp32 (3 pipeline stages stay within an A100's shared memory).
    Interpreter: smaller tiles, still >= 16 per dim as ``tl.dot`` requires."""
    if triton_interpreter():
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64 if dtype.itemsize == 2 else 32,
            "num_warps": 8, "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _common(dtype: torch.dtype) -> dict:
    return {"INTERPRET": triton_interpreter(), "PRECISION": _precision(dtype)}


def linear_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, with_entropy):
    """Launch the forward. ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or ``None``,
    ``labels [N]``. Returns ``(logp [N], entropy [N] or [0], stats [N, 2])``, fp32.

    Allocates the outputs and ``[4, splits, N]`` fp32 partial statistics (``splits`` is
    at most twice the number of SMs divided by the row tiles, at least 8 when the
    vocabulary has that many tiles).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    stats = logp.new_empty((N, 2))
    if N == 0:
        return logp, ent, stats
    bias = bias.contiguous() if bias is not None else None
    labels = labels.contiguous()  # read as labels[row]: a strided [N] view would be misread
    cfg = _config(hidden.dtype)
    row_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    splits = min(v_tiles, max(8, triton.cdiv(2 * _sm_count(hidden.device), row_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    part = logp.new_empty((4, splits, N))
    _fwd_kernel[(row_tiles * splits,)](
        hidden, weight, bias if bias is not None else hidden, labels, part,
        N, V, H, *hidden.stride(), *weight.stride(), 1.0 / temperature, splits, tiles_per_split,
        splits * N,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **_common(hidden.dtype), **cfg)
    _combine_kernel[(triton.cdiv(N, 64),)](
        part, labels, logp, ent, stats, N, V, splits, splits * N, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_R=64, BLOCK_S=16)
    return logp, ent, stats


def linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                        temperature, ignore_index, need_hidden, need_weight, need_bias):
    """Launch the backward; returns ``(grad_hidden, grad_weight, grad_bias)`` in the dtypes
    of ``hidden``/``weight``/``bias`` (an empty tensor for a gradient not needed).

    Allocates the gradients, a ``dz`` workspace of at most ``max(WORKSPACE_ELEMS, N * 128)``
    elements in the inputs' dtype, ``[row tiles, chunk]`` fp32 bias partial sums, and an
    fp32 ``[N, H]`` sum of ``grad_hidden`` when the inputs are 16-bit and the vocabulary
    takes more than one chunk.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    gh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    gb = bias.new_empty(V) if need_bias else hidden.new_empty(0)
    if N == 0:
        return gh, gw.zero_(), gb.zero_()
    bias = bias.contiguous() if bias is not None else None
    labels = labels.contiguous()  # read as labels[row]: a strided [N] view would be misread
    cfg = _config(hidden.dtype)
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    common = _common(hidden.dtype)
    chunk = min(triton.cdiv(V, BV), max(1, WORKSPACE_ELEMS // (N * BV))) * BV
    n_chunks = triton.cdiv(V, chunk)
    row_tiles = triton.cdiv(N, BN)
    dz = hidden.new_empty((N, chunk))
    dbias = hidden.new_empty((row_tiles, chunk), dtype=torch.float32) if need_bias else dz
    acc = gh
    if need_hidden and n_chunks > 1 and hidden.dtype != torch.float32:
        acc = hidden.new_empty((N, H), dtype=torch.float32)
    with_entropy = grad_entropy is not None
    glogp = grad_logp.contiguous()
    gent = grad_entropy.contiguous() if with_entropy else glogp
    for c in range(n_chunks):
        v0 = c * chunk
        width = min(chunk, V - v0)
        _dlogits_kernel[(row_tiles * triton.cdiv(width, BV),)](
            hidden, weight, bias if bias is not None else hidden, labels, stats, entropy, glogp,
            gent, dz, dbias, N, V, H, v0, width, *hidden.stride(), *weight.stride(),
            1.0 / temperature, ignore_index,
            HAS_BIAS=bias is not None, NEED_BIAS=need_bias, WITH_ENTROPY=with_entropy, GROUP=8,
            **common, **cfg)
        if need_hidden:
            last = c == n_chunks - 1
            _dhidden_kernel[(row_tiles * triton.cdiv(H, BV),)](
                dz, weight, acc, gh if last else acc, N, H, v0, width, *weight.stride(),
                LOAD_ACC=c > 0, GROUP=8, BLOCK_N=BN, BLOCK_H=BV, BLOCK_K=BK, **common, **launch)
        if need_weight:
            _dweight_kernel[(triton.cdiv(width, BV) * triton.cdiv(H, BV),)](
                dz, hidden, gw, N, H, v0, width, *hidden.stride(),
                GROUP=8, BLOCK_V=BV, BLOCK_H=BV, BLOCK_K=BK, **common, **launch)
        if need_bias:
            gb[v0:v0 + width] = dbias.view(-1)[:row_tiles * width].view(row_tiles, width).sum(0)
    return gh, gw, gb
