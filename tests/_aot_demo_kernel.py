"""A small demo kernel used only to test the AOT compile harness (``vitkern.triton_kernels.aot``).

``demo_scores_softmax_kernel`` computes one row block of ``softmax(scale * A @ B)`` with an fp16
``tl.dot`` (fp32 accumulation) tiled over K, i.e. the score/softmax half of an attention forward.
It exercises the things the real kernels use: pointer, integer and fp32 scalar arguments (with
the launch-time specialisations spelled out, see ``DEMO_SIGNATURE``), constexpr block sizes,
``tl.dot`` and standard-library reductions.

``aot_cases()`` lists tile candidates that fit (the tests wrap them in ``AotSpec``s, as the kernel
modules' ``aot_specs()`` do);
``spill_case()`` is a deliberately register-hungry config (a 64x128 fp32 accumulator held by a
single warp: 256 accumulator values per thread against a 255-register limit), which must spill.
"""
import triton
import triton.language as tl

from vitkern.triton_kernels.aot import AotCase

# What a launch on contiguous fp16 tensors with M, N, K multiples of 16 specialises to: python ints
# below 2**31 are i32, multiples of 16 carry the divisibility hint (":16"), and the unit inner
# strides are folded to the constant 1 by the JIT, so they go in constexprs.
DEMO_SIGNATURE = {
    "A": "*fp16", "B": "*fp16", "Out": "*fp16",
    "M": "i32", "N": "i32", "K": "i32",
    "stride_am": "i32:16", "stride_bk": "i32:16", "stride_om": "i32:16",
    "scale": "fp32",
}
UNIT_STRIDES = {"stride_ak": 1, "stride_bn": 1, "stride_on": 1}


@triton.jit
def demo_scores_softmax_kernel(
    A, B, Out,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_om, stride_on,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    s = acc * scale
    s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, p.to(tl.float16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _case(bm, bn, bk, num_warps, num_stages):
    return AotCase(
        name=f"demo.scores_softmax[BM={bm},BN={bn},BK={bk},w{num_warps},s{num_stages}]",
        fn=demo_scores_softmax_kernel,
        signature=dict(DEMO_SIGNATURE),
        constexprs={**UNIT_STRIDES, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
        num_warps=num_warps,
        num_stages=num_stages,
    )


def aot_cases():
    """Sane configs: must compile without spills on sm_80 and sm_90."""
    return [_case(64, 64, 32, 4, 2)]


def spill_case():
    """Deliberately register-hungry: 64x128 fp32 accumulator on one warp (256 regs/thread); must spill."""
    return _case(64, 128, 16, 1, 1)
