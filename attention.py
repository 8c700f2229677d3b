"""Flash attention in Triton, forward and backward (the FlashAttention-2
algorithm, Dao 2023), with a PyTorch fallback behind the same interface.

    flash_attention(q, k, v, scale=None) -> o       # q, k, v, o: (B, H, N, D)

Full (non-causal) attention, which is what a video DiT uses. Any N >= 1 (the
last blocks are masked), D in {16, 32, 64, 128}, fp32 / fp16 / bf16, strided
inputs. CUDA tensors go through the Triton kernels; on CPU the kernels run
only under TRITON_INTERPRET=1 (that is how the tests check them), otherwise
PyTorch's scaled_dot_product_attention answers.

The algorithm, per (batch, head):
  forward   for a block of queries, stream over blocks of keys/values keeping
            a running max m, running sum l and an unnormalised output acc
            (online softmax); never materialise the N x N matrix. Save
            lse = m + log(l) per query for the backward.
  backward  preprocess: delta_i = sum_d dO_id * O_id  (= rowsum(P * dP)).
            dK, dV: for a block of keys, stream over query blocks, rebuilding
            P = exp(S - lse) from the saved lse: dV += P^T dO,
            dS = P * (dO V^T - delta), dK += dS^T Q.
            dQ: for a block of queries, stream over key blocks: dQ += dS K.
The two backward loops run as two roles of one launch (programs for key blocks,
then for query blocks), not as one loop with atomics: deterministic and simpler.

`python attention.py` checks the kernels against PyTorch and, on a GPU, times
them against every SDPA backend.
"""

import os
import sys

import torch
import torch.nn.functional as F


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# The kernels run CUDA tensors, and CPU ones only under Triton's interpreter;
# anywhere else Triton is not even imported (0.4 s of a CPU `python sample.py`).
HAS_TRITON = False
if torch.cuda.is_available() or interpreting():
    try:
        import triton
        import triton.language as tl
        HAS_TRITON = True
    except ImportError:  # no triton (e.g. macOS): the PyTorch path serves everything
        pass

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the fast instruction


def flash_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over the last two dims; scale defaults to D**-0.5."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, H, N, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if use_triton(q):
        return triton_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def use_triton(q):
    if not HAS_TRITON or q.shape[-1] not in HEAD_DIMS or q.dtype not in DTYPES or q.shape[2] == 0:
        return False
    return q.is_cuda or (q.device.type == "cpu" and interpreting())


def triton_attention(q, k, v, scale=None):
    """The Triton path, always (no fallback): for tests and benchmarks."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, scale)


if HAS_TRITON:
    # Autotuning over tile sizes, warps and pipeline stages on the GPU, keyed on
    # (N, D). The interpreter gets one small tile: it is slow and has no warps.
    def tile_configs(bwd=False):
        if interpreting():
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        sizes = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 128, 8, 2)]
        if bwd:
            sizes = [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 4), (64, 32, 4, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sizes]

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        if PRECISION == "upcast":  # see precision_of
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _load_tile(ptr, rows, offs_d, stride_n, stride_d, N):
        """The (len(rows), D) tile of an (N, D) matrix; rows past N read as zeros."""
        return tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=rows[:, None] < N, other=0.0)

    @triton.jit
    def _load_tile_t(ptr, rows, offs_d, stride_n, stride_d, N):
        """The same tile transposed, (D, len(rows)), read directly in that layout."""
        return tl.load(ptr + rows[None, :] * stride_n + offs_d[:, None] * stride_d,
                       mask=rows[None, :] < N, other=0.0)

    @triton.autotune(configs=tile_configs(), key=["N", "HEAD_DIM"])
    @triton.jit
    def _forward_kernel(Q, K, V, O, LSE, qk_scale,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                        H, N, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program: BLOCK_M queries of one (batch, head).
        qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        q = _load_tile(Q, offs_m, offs_d, sqn, sqd, N)

        # Online softmax state, in base 2 (qk_scale includes log2 e).
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            k_t = _load_tile_t(K, cols, offs_d, skn, skd, N)
            s = _dot(q, k_t, PRECISION) * qk_scale        # (BLOCK_M, BLOCK_N)
            s = tl.where(cols[None, :] < N, s, float("-inf"))              # masked tail keys
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)                                   # rescales the old state
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_tile(V, cols, offs_d, svn, svd, N)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new

        # Normalise once at the end; keep lse (base 2) for the backward.
        acc = acc / l_i[:, None]
        tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)
        O += b * sob + h * soh
        tl.store(O + offs_m[:, None] * son + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < N)

    @triton.jit
    def _backward_preprocess(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod,
                             H, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        # delta_i = sum_d dO_id * O_id, one value per query.
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, son, sod, N)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, N)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, qk_scale, pid_n, pid_bh,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, H, N,
                    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # BLOCK_N keys/values of one (batch, head), all queries.
        b, h = pid_bh // H, pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        Q += b * sqb + h * sqh
        DO += b * sdob + h * sdoh
        v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, N)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        if PRECISION == "ieee":
            k_t = _load_tile_t(K + b * skb + h * skh, offs_n, offs_d, skn, skd, N)
        else:
            k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, N)
        for start_m in range(0, N, BLOCK_M):
            rows = start_m + offs_m
            if PRECISION == "ieee":
                # fp32: S^T from the forward's very product q k^T, transposed. k q^T
                # rounds differently, and at logits ~1e4 that rounding shows in dV.
                q = _load_tile(Q, rows, offs_d, sqn, sqd, N)
                s_t = tl.trans(_dot(q, k_t, PRECISION))
            else:
                # fp16/bf16 round far coarser than that: k q^T directly, which saves
                # moving an fp32 tile through shared memory (~30% of the backward).
                q_t = _load_tile_t(Q, rows, offs_d, sqn, sqd, N)
                s_t = _dot(k, q_t, PRECISION)
                q = tl.trans(q_t)
            do = _load_tile(DO, rows, offs_d, sdon, sdod, N)
            lse = tl.load(LSE + pid_bh * N + rows, mask=rows < N, other=float("inf"))  # padded rows: P = 0
            delta = tl.load(DELTA + pid_bh * N + rows, mask=rows < N, other=0.0)
            p_t = tl.exp2(s_t * qk_scale - lse[None, :])   # P^T from the saved lse: (BLOCK_N, BLOCK_M)
            p_t = tl.where(offs_n[:, None] < N, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION)
            dp_t = _dot(v, tl.trans(do), PRECISION)        # (dO V^T)^T
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PRECISION)
        grad_offsets = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd
        tl.store(DK + grad_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < N)
        tl.store(DV + grad_offsets, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < N)

    @triton.jit
    def _dq_block(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, qk_scale, pid_m, pid_bh,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, H, N,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # BLOCK_M queries of one (batch, head), all keys.
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        K += b * skb + h * skh
        V += b * svb + h * svh
        q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, N)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=offs_m < N, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=offs_m < N, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            k_t = _load_tile_t(K, cols, offs_d, skn, skd, N)
            v_t = _load_tile_t(V, cols, offs_d, svn, svd, N)
            p = tl.exp2(_dot(q, k_t, PRECISION) * qk_scale - lse[:, None])
            p = tl.where(cols[None, :] < N, p, 0.0)
            ds = p * (_dot(do, v_t, PRECISION) - delta[:, None])
            dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), PRECISION)
        tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd,
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < N)

    @triton.autotune(configs=tile_configs(bwd=True), key=["N", "HEAD_DIM"])
    @triton.jit
    def _backward_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, qk_scale,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, H, N,
                         HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Both gradients in one launch: the first cdiv(N, BLOCK_N) programs of axis 0
        # each own a block of keys (dK, dV), the rest a block of queries (dQ). At small
        # shapes the launches, not the arithmetic, are what costs (docs/results.md).
        sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
        pid, pid_bh = tl.program_id(0), tl.program_id(1)
        key_blocks = tl.cdiv(N, BLOCK_N)
        if pid < key_blocks:
            _dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, qk_scale, pid, pid_bh,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, H, N, HEAD_DIM, PRECISION, BLOCK_M, BLOCK_N)
        else:
            _dq_block(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, qk_scale, pid - key_blocks, pid_bh,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      sdob, sdoh, sdon, sdod, sgb, sgh, sgn, sgd, H, N, HEAD_DIM, PRECISION, BLOCK_M, BLOCK_N)


def precision_of(dtype):
    """fp32 inputs: exact fp32 dot products. TF32 (10-bit mantissa) is fine for
    a forward pass but gives visibly wrong fp32 gradients (a known pitfall of
    the tutorial kernels). fp16/bf16 use the tensor cores as they are, except
    in Triton's CPU interpreter, whose tl.dot misreads bf16 operands (3.7.1):
    there bf16 tiles are cast to fp32 first, which computes the same thing
    (a bf16 x bf16 product is exact in fp32, and the GPU accumulates in fp32)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else "tf32"


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, N, D = q.shape
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
        _forward_kernel[grid](q, k, v, o, lse, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(),
                              *o.stride(), H, N, HEAD_DIM=D, PRECISION=precision_of(q.dtype))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        # Gradients are written contiguous, whatever the inputs' strides.
        dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
        delta = torch.empty_like(lse)
        block = 16 if interpreting() else 64
        _backward_preprocess[(triton.cdiv(N, block), B * H)](o, do, delta, *o.stride(), *do.stride(),
                                                             H, N, HEAD_DIM=D, BLOCK_M=block)
        common = dict(H=H, N=N, HEAD_DIM=D, PRECISION=precision_of(q.dtype))
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride())
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) + triton.cdiv(N, meta["BLOCK_M"]), B * H)
        _backward_kernel[grid](q, k, v, do, dq, dk, dv, lse, delta, ctx.scale, ctx.scale * LOG2E, *strides, **common)
        return dq, dk, dv, None


# ------------------------------------------------------------- benchmark ----

def check(q, k, v):
    """Max abs difference of output and gradients, kernel vs PyTorch SDPA."""
    grad_out = torch.randn_like(q)
    results = []
    for fn in (triton_attention, F.scaled_dot_product_attention):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out] + [x.grad for x in leaves])
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(*results)]


def time_ms(fn, backward):
    """Median ms of fn (and its backward) after warm-up, which also autotunes."""
    from triton.testing import do_bench
    if not backward:
        return do_bench(fn, warmup=50, rep=200)
    out = fn()
    grad_out = torch.randn_like(out)
    return do_bench(lambda: fn().backward(grad_out), warmup=50, rep=200)


def benchmark():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    # (name, B, H, N, D): the model's shapes (tiny, small at batch 16) and long sequences.
    shapes = [("tiny", 16, 3, 512, 32), ("small", 16, 6, 2048, 64),
              ("long", 8, 6, 512, 64), ("long", 8, 6, 2048, 64), ("long", 8, 6, 8192, 64)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16")
    print("| shape | B×H×N×D | pass | ours ms | ours TFLOP/s | best SDPA | SDPA ms | speed vs best SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        errors = check(q, k, v)
        if max(errors) > 0.1:
            raise SystemExit(f"kernel disagrees with SDPA at {name}: max errors {errors}")
        for backward in (False, True):
            flops = 4 * B * H * N * N * D * (3.5 if backward else 1.0)  # bwd = 2.5x fwd
            ours = time_ms(lambda: triton_attention(q, k, v), backward)
            timings = {}
            for backend_name, backend in backends.items():
                try:
                    with sdpa_kernel(backend):
                        timings[backend_name] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v),
                                                        backward)
                except RuntimeError:  # backend not available for this shape/device
                    pass
            best = min(timings, key=timings.get)
            print(f"| {name} | {B}×{H}×{N}×{D} | {'fwd+bwd' if backward else 'fwd'} | {ours:.3f} | "
                  f"{flops / ours / 1e9:.1f} | {best} | {timings[best]:.3f} | {timings[best] / ours:.2f}x |")


if __name__ == "__main__":
    from common import parse_flags
    opt = parse_flags(dict(seed=(0, "seed of the interpreter check's random q, k, v")), sys.argv[1:], __doc__)
    if torch.cuda.is_available() and HAS_TRITON:
        benchmark()
    elif HAS_TRITON and interpreting():
        torch.manual_seed(opt.seed)
        q, k, v = (torch.randn(2, 3, 45, 32) for _ in range(3))
        names = ("out", "dq", "dk", "dv")
        print("interpreter check vs SDPA (fp32, 2x3x45x32): " +
              ", ".join(f"{n} {e:.1e}" for n, e in zip(names, check(q, k, v))))
        print("timing needs a CUDA GPU")
    else:
        print("no CUDA GPU: nothing to time. `TRITON_INTERPRET=1 python attention.py` checks the kernels on CPU.")
