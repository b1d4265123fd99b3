"""Token attention (EViT / ToMe / token dropping): reference, Triton kernels, checks, dispatch."""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close
from vitkern import backends
from vitkern.ops import token as T
from vitkern.reference import token as R

# (B, heads, N, d, keep, bias, importance); keep: None (all tokens), an int K (random distinct
# tokens, CLS first) or "perm" (K = N, shuffled); bias: None, "batch" (B, N), "head" (B, h, N),
# "neginf" (per head, with -inf keys and one head whose keys are all -inf).
CASES = [
    (1, 2, 1, 16, None, None, True),          # N = 1
    (1, 3, 197, 64, 138, "batch", True),      # EViT DeiT-S block 4: 197 -> 1 + 137
    (2, 2, 50, 80, "perm", "head", True),     # K = N shuffled, d = 80
    (2, 2, 23, 32, 1, "batch", True),         # K = 1
    (2, 3, 37, 16, 20, "neginf", True),       # -inf keys, all--inf rows
    (2, 2, 64, 32, None, "head", False),      # per-head bias (ToMe-like), all tokens
    (1, 2, 130, 16, None, None, False),       # plain attention over more than one tile
    (1, 1, 71, 24, 33, "batch", False),       # odd sizes, d = 24
]


def _ids(case):
    B, h, N, d, keep, bias, imp = case
    return f"B{B}-h{h}-N{N}-d{d}-keep{keep}-bias{bias}-imp{int(imp)}"


def _inputs(case, dtype, device, seed=0):
    """q, k, v, key_bias (leaves requiring grad) and keep_idx for one case."""
    B, h, N, d, keep, bias, _ = case
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, h, N, d, generator=g, dtype=torch.float64).to(device, dtype)
           .requires_grad_() for _ in range(3)]
    keep_idx = None
    if keep == "perm":
        keep_idx = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    elif keep is not None:  # CLS (token 0) first, then K - 1 random distinct image tokens
        rest = [torch.randperm(N - 1, generator=g)[:keep - 1] + 1 for _ in range(B)]
        keep_idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), r]) for r in rest])
    key_bias = None
    if bias is not None:
        shape = (B, N) if bias == "batch" else (B, h, N)
        key_bias = torch.randn(shape, generator=g, dtype=torch.float64)
        if bias == "neginf":
            key_bias[torch.rand(shape, generator=g) < 0.3] = float("-inf")
            key_bias[0, 1] = float("-inf")  # batch 0, head 1: every key masked
        key_bias = key_bias.to(device, dtype).requires_grad_()
    if keep_idx is not None:
        keep_idx = keep_idx.to(device)
    return qkv, key_bias, keep_idx


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def naive_token_attention(q, k, v, keep_idx, key_bias, scale):
    """The spec, per batch item: select kept rows, explicit max-shifted softmax (fp64)."""
    B, h, N, d = q.shape
    out, imp = [], []
    for b in range(B):
        sel = torch.arange(N) if keep_idx is None else keep_idx[b].cpu()
        qb, kb, vb = (t[b].index_select(1, sel) for t in (q, k, v))
        logits = torch.einsum("hid,hjd->hij", qb, kb) * scale
        if key_bias is not None:
            bb = key_bias[b].index_select(-1, sel)
            logits = logits + (bb[None, None, :] if bb.dim() == 1 else bb[:, None, :])
        mx = logits.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        e = torch.exp(logits - mx)
        den = e.sum(-1, keepdim=True)
        p = torch.where(den > 0, e / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
        out.append(p @ vb)
        imp.append(p[:, 0, :].mean(0))
    return torch.stack(out), torch.stack(imp)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_naive_spec(case):
    (q, k, v), bias, idx = _inputs(case, torch.float64, "cpu")
    o, imp = R.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="cls")
    eo, eimp = naive_token_attention(q, k, v, idx, bias, case[3] ** -0.5)
    torch.testing.assert_close(o, eo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(imp, eimp, rtol=1e-12, atol=1e-12)
    if case[5] == "neginf":  # the all--inf head outputs exact zeros, importance 0 there
        assert (o[0, 1] == 0).all()
    assert not torch.isnan(o).any()


@pytest.mark.parametrize("bias", ["batch", "head", "neginf"])
def test_reference_gradcheck(bias):
    case = (2, 2, 6, 4, 4, bias, True)
    (q, k, v), key_bias, idx = _inputs(case, torch.float64, "cpu")
    if bias == "neginf":  # finite differences cannot move a -inf: differentiate the rest only
        kb = key_bias.detach()
        fn = lambda q, k, v: R.token_attention(  # noqa: E731
            q, k, v, keep_idx=idx, key_bias=kb, return_importance="cls")
        assert torch.autograd.gradcheck(fn, (q, k, v))
    else:
        fn = lambda q, k, v, b: R.token_attention(  # noqa: E731
            q, k, v, keep_idx=idx, key_bias=b, return_importance="cls")
        assert torch.autograd.gradcheck(fn, (q, k, v, key_bias))


def test_reference_all_neginf_rows_have_zero_grads():
    (q, k, v), bias, idx = _inputs((1, 2, 9, 8, None, "head", True), torch.float64, "cpu")
    with torch.no_grad():
        bias[0, 0] = float("-inf")
    o, imp = R.token_attention(q, k, v, key_bias=bias, return_importance="cls")
    (o.sum() + imp.sum()).backward()
    assert (o[0, 0] == 0).all() and not torch.isnan(q.grad).any()
    assert (q.grad[0, 0] == 0).all() and (k.grad[0, 0] == 0).all() and (bias.grad[0, 0] == 0).all()


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and every gradient
# --------------------------------------------------------------------------------------------


def _check_against_reference(case, device, dtype, *, grad_out=True, grad_imp=True):
    """Kernel outputs and grads vs the fp64 reference, bounded by PyTorch's own low-precision
    error; the loss weighs o and the importance so that both gradients paths matter."""
    want_imp = case[6]
    (q, k, v), bias, idx = _inputs(case, dtype, device)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    kw = dict(keep_idx=idx, return_importance="cls" if want_imp else None)

    def run(fn, ins, **extra):
        b = ins[3] if bias is not None else None
        res = fn(*ins[:3], key_bias=b, **kw, **extra)
        return res if want_imp else (res, None)

    out, imp = run(T.token_attention, leaves, backend="triton")
    ref_in = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_idx = None if idx is None else idx.cpu()
    kw_ref = dict(kw, keep_idx=ref_idx)
    ref_o, ref_imp = (lambda r: r if want_imp else (r, None))(
        R.token_attention(*ref_in[:3], key_bias=ref_in[3] if bias is not None else None,
                          **kw_ref))
    lowp = None
    if dtype != torch.float32:
        lowp_in = [t.detach().clone().requires_grad_() for t in leaves]
        lowp = run(R.token_attention, lowp_in)
    assert_close(out.cpu(), ref_o, None if lowp is None else lowp[0].cpu(), name="out")
    if want_imp:
        assert imp.shape == (q.shape[0], out.shape[2])
        assert_close(imp.cpu(), ref_imp, None if lowp is None else lowp[1].cpu(),
                     name="importance")

    g = torch.Generator().manual_seed(1)
    go = torch.randn(ref_o.shape, generator=g, dtype=torch.float64) * float(grad_out)
    gi = (torch.randn(ref_imp.shape, generator=g, dtype=torch.float64) * 10.0 * float(grad_imp)
          if want_imp else None)

    def loss(o, i):
        total = (o * go.to(o.device, o.dtype)).sum()
        if i is not None:
            total = total + (i * gi.to(i.device, i.dtype)).sum()
        return total

    names = ["dq", "dk", "dv", "dkey_bias"][:len(leaves)]
    grads = torch.autograd.grad(loss(out, imp), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_imp), ref_in)
    lowp_grads = (torch.autograd.grad(loss(*lowp), lowp_in) if lowp is not None
                  else [None] * len(leaves))
    for name, gr, rg, lg in zip(names, grads, ref_grads, lowp_grads):
        assert_close(gr.cpu(), rg, None if lg is None else lg.cpu(), name=name)


_DEV = dict(ids=lambda x: str(x).split(".")[-1])


def _skip_if_refused(q):
    """Skip (visibly) where the backend refuses by design: no spill-free tiles for that shape."""
    try:
        T._backend("x", "triton", q, None, needs_grad=True)
    except backends.BackendError as exc:
        assert "no spill-free triton tiles" in str(exc), exc
        pytest.skip(str(exc).splitlines()[2].strip())


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, **_DEV)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_token_attention(case, device, dtype):
    _skip_if_refused(torch.empty(1, 1, 1, case[3], dtype=dtype, device=device))
    _check_against_reference(case, device, dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], **_DEV)
def test_triton_forward_only_where_backward_is_refused(device, dtype):
    """float32 head_dim 80: inference runs on triton, a graph that needs grads is refused."""
    (q, k, v), bias, idx = _inputs((2, 2, 50, 80, 31, "head", True), dtype, device)
    with torch.no_grad():
        o, imp = T.token_attention(q, k, v, keep_idx=idx, key_bias=bias,
                                   return_importance="cls", backend="triton")
    ro, rimp = R.token_attention(*(t.detach().double().cpu() for t in (q, k, v)),
                                 keep_idx=idx.cpu(), key_bias=bias.detach().double().cpu(),
                                 return_importance="cls")
    assert_close(o.cpu(), ro, name="out")
    assert_close(imp.cpu(), rimp, name="importance")
    with pytest.raises(backends.BackendError, match="float32 head_dim 80 backward"):
        T.token_attention(q, k, v, keep_idx=idx, backend="triton")


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, **_DEV)
def test_triton_gradient_through_importance_only(device, dtype):
    """o unused: the only gradient is the importance's (EViT token fusion)."""
    _check_against_reference((2, 2, 41, 32, 17, "head", True), device, dtype, grad_out=False)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], **_DEV)
def test_triton_reads_strided_projection_views(device, dtype):
    """q, k, v as permuted views of one packed (B, N, 3, heads, d) projection: no copies."""
    B, N, h, d = 2, 29, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3 * h * d, generator=g).to(device, dtype)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    idx = torch.stack([torch.randperm(N, generator=g)[:11] for _ in range(B)]).to(device)
    bias = torch.randn(B, 2 * N, generator=g).to(device, dtype)[:, ::2]  # strided bias too
    out = T.token_attention(q, k, v, keep_idx=idx.to(torch.int32), key_bias=bias,
                            backend="triton")
    ref = R.token_attention(*(t.double().cpu() for t in (q, k, v)), keep_idx=idx.cpu(),
                            key_bias=bias.double().cpu())
    assert_close(out.cpu(), ref)
    assert out.transpose(1, 2).is_contiguous()  # folds back into channels as a view


def test_triton_matches_reference_on_gathered_inputs():
    """keep_idx in place == attention on an explicitly gathered copy (fp32, no bias)."""
    (q, k, v), _, idx = _inputs((2, 2, 40, 16, 13, None, False), torch.float32, "cpu")
    a = T.token_attention(q, k, v, keep_idx=idx, backend="triton")
    qg, kg, vg = (R.gather_tokens(t, idx) for t in (q, k, v))
    b = T.token_attention(qg, kg, vg, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# checks and dispatch
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_IDX = torch.tensor([[0, 3, 5], [1, 2, 7]])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 16, 8)), ValueError, "q must be 4-D"),
    (dict(k=_t(2, 2, 15, 8)), ValueError, "k must have the shape of q"),
    (dict(v=_t(2, 2, 16, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(q=torch.ones(2, 2, 16, 8, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(q="nope"), TypeError, "q must be a torch.Tensor"),
    (dict(keep_idx=torch.tensor([[0, 3, 3], [1, 2, 7]])), ValueError,
     r"duplicate indices in row 0 \(token 3 kept twice\)"),
    (dict(keep_idx=torch.tensor([[0, 3, 5], [1, 2, 16]])), ValueError,
     r"out-of-range indices \(min 0, max 16\); they must lie in \[0, N=16\)"),
    (dict(keep_idx=torch.tensor([[0, -1, 5], [1, 2, 7]])), ValueError, "out-of-range"),
    (dict(keep_idx=_IDX.float()), TypeError, "keep_idx must be an int64"),
    (dict(keep_idx=_IDX.bool()), TypeError, "keep_idx must be an int64"),
    (dict(keep_idx=[[0, 1]]), TypeError, "keep_idx must be a torch.Tensor"),
    (dict(keep_idx=_IDX[:1]), ValueError, r"keep_idx must have shape \(B=2, K\)"),
    (dict(keep_idx=_IDX[0]), ValueError, r"keep_idx must have shape \(B=2, K\)"),
    (dict(keep_idx=_IDX[:, :0]), ValueError, "keeps K=0 tokens"),
    (dict(keep_idx=torch.arange(17).expand(2, 17)), ValueError, "keeps K=17 tokens"),
    (dict(key_bias=_t(2, 15)), ValueError, r"key_bias must have shape \(B, N\)"),
    (dict(key_bias=_t(2, 3, 16)), ValueError, r"\(B, heads, N\)"),
    (dict(key_bias=torch.ones(2, 16, dtype=torch.int64)), TypeError,
     "key_bias must be a floating-point"),
    (dict(key_bias="log-size"), TypeError, "key_bias must be a torch.Tensor"),
    (dict(return_importance="colsum"), ValueError, "return_importance must be None or 'cls'"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
    (dict(k=torch.empty(2, 2, 16, 8, device="meta")), ValueError, "must be on one device"),
])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(2, 2, 16, 8), k=_t(2, 2, 16, 8), v=_t(2, 2, 16, 8), keep_idx=_IDX)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        T.token_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_dispatch_on_cpu():
    q = _t(1, 2, 16, 8)
    assert T._backend("x", "auto", q, None) == "reference"
    assert T._backend("x", "triton", q, None) == "triton"
    with pytest.raises(backends.BackendError) as info:
        x = q.double()
        T.token_attention(x, x, x, backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 not supported by triton" in msg
    assert "cuda:" in msg and "reference:" in msg
    for d in (12, 136):
        x = _t(1, 2, 16, d)
        with pytest.raises(backends.BackendError, match=f"head_dim {d} not supported by triton "
                                                        r"\(multiples of 8 up to 128\)"):
            T.token_attention(x, x, x, backend="triton")
    with pytest.raises(backends.BackendError, match="key_bias dtype torch.float64"):
        T.token_attention(q, q, q, key_bias=_t(1, 16, dtype=torch.float64), backend="triton")


def test_env_var_forces_backend(monkeypatch):
    q = _t(1, 2, 16, 8)
    monkeypatch.setenv("VITKERN_BACKEND", "reference")
    assert T._backend("x", "auto", q, None) == "reference"


def test_empty_batch_and_reference_dispatch():
    q = _t(0, 2, 16, 8)
    o, imp = T.token_attention(q, q, q, return_importance="cls")
    assert o.shape == q.shape and imp.shape == (0, 16)
    q = _t(2, 2, 16, 8)
    o = T.token_attention(q, q, q, keep_idx=_IDX, backend="reference")
    assert o.shape == (2, 2, 3, 8)


def test_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    (q, k, v), bias, idx = _inputs((2, 2, 19, 16, 7, "batch", True), torch.float32, device)
    torch.library.opcheck(torch.ops.vitkern.token_fwd.default,
                          (q, k, v, idx, bias, 0.25, True))


def test_torch_compile_fullgraph_no_recompile():
    import torch._dynamo

    device = "cuda" if HAS_CUDA else "cpu"
    torch._dynamo.reset()

    def fn(q, k, v, idx, bias):
        o, imp = T.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="cls",
                                   backend="triton")
        return o.sum() + imp.sum()

    compiled = torch.compile(fn, fullgraph=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for seed in range(2):
            (q, k, v), bias, idx = _inputs((2, 2, 19, 16, 7, "batch", True), torch.float32,
                                           device, seed=seed)
            out = compiled(q, k, v, idx, bias)
            out.backward()
            torch.testing.assert_close(out, fn(q, k, v, idx, bias), rtol=1e-5, atol=1e-5)
            assert bias.grad is not None and q.grad is not None
