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
# "neginf" (per head, with -inf keys and one head whose keys are all -inf); importance: True
# ("cls"), False (None) or "colsum".
CASES = [
    (1, 2, 1, 16, None, None, True),          # N = 1
    (1, 3, 197, 64, 138, "batch", True),      # EViT DeiT-S block 4: 197 -> 1 + 137
    (2, 2, 50, 80, "perm", "head", True),     # K = N shuffled, d = 80
    (2, 2, 23, 32, 1, "batch", True),         # K = 1
    (2, 3, 37, 16, 20, "neginf", True),       # -inf keys, all--inf rows
    (2, 2, 64, 32, None, "head", False),      # per-head bias (ToMe-like), all tokens
    (1, 2, 130, 16, None, None, False),       # plain attention over more than one tile
    (1, 1, 71, 24, 33, "batch", False),       # odd sizes, d = 24
    (2, 2, 45, 32, 29, "neginf", "colsum"),   # GTP-ViT column sums (no gradient)
    (1, 3, 90, 16, None, "head", "colsum"),   # column sums over more than one key tile
]


def _ids(case):
    B, h, N, d, keep, bias, imp = case
    return f"B{B}-h{h}-N{N}-d{d}-keep{keep}-bias{bias}-imp{_mode(imp)}"


def _mode(imp):
    """CASES importance field -> the return_importance argument."""
    return {True: "cls", False: None}.get(imp, imp)


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
    out, imp, col = [], [], []
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
        col.append(p.sum(1).mean(0))  # sum over queries i of P[h, i, j], mean over heads
    return torch.stack(out), torch.stack(imp), torch.stack(col)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_naive_spec(case):
    (q, k, v), bias, idx = _inputs(case, torch.float64, "cpu")
    o, imp = R.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="cls")
    eo, eimp, ecol = naive_token_attention(q, k, v, idx, bias, case[3] ** -0.5)
    torch.testing.assert_close(o, eo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(imp, eimp, rtol=1e-12, atol=1e-12)
    _, col = R.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="colsum")
    torch.testing.assert_close(col, ecol, rtol=1e-12, atol=1e-12)
    assert not col.requires_grad  # documented: the column sums carry no gradient
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
    mode = _mode(case[6])
    want_imp = mode is not None
    (q, k, v), bias, idx = _inputs(case, dtype, device)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    kw = dict(keep_idx=idx, return_importance=mode)

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
          if mode == "cls" else None)
    if mode == "colsum":
        assert not imp.requires_grad and not ref_imp.requires_grad
        imp = ref_imp = None
        lowp = (lowp[0], None) if lowp is not None else None

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
    """Skip (visibly) where the backend refuses by design: outside the declared capability for that shape."""
    try:
        T._backend("x", "triton", q, None, needs_grad=True)
    except backends.BackendError as exc:
        assert "outside the declared capability of triton" in str(exc), exc
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
    with pytest.raises(backends.BackendError, match="float32 head_dim 80 is outside the declared "
                                                    "capability of triton token attention's backward"):
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
    (dict(return_importance="rollout"), ValueError,
     "return_importance must be None, 'cls' or 'colsum'"),
    (dict(max_seqlen=4), ValueError, "max_seqlen is only used with cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)), ValueError,
     r"q must be packed 3-D \(T, heads, head_dim\) with cu_seqlens"),
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
    assert T._backend("x", "auto", q, None) == "eager"  # CPU tensors: vitkern.eager.token
    assert T._backend("x", "reference", q, None) == "reference"
    assert T._backend("x", "triton", q, None) == "triton"
    with pytest.raises(backends.BackendError) as info:
        x = q.double()
        T.token_attention(x, x, x, backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 not supported by triton" in msg
    assert "cuda:" in msg and "eager:" in msg and "reference:" in msg
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
                          (q, k, v, idx, bias, None, 0.25, "cls", 0))


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


# --------------------------------------------------------------------------------------------
# ragged batches (cu_seqlens, packed (T, heads, d) tokens)
# --------------------------------------------------------------------------------------------

# (heads, d, sequence lengths, T (tokens in the packed map; None = sum of lengths, no keep_idx),
#  bias: None, "tok" (T,), "head" (T, h) with -inf keys and one sequence's head fully -inf,
#  importance)
VARLEN_CASES = [
    (2, 16, [5, 0, 1, 14], None, "tok", "cls"),         # empty + single-token sequences
    (3, 32, [0, 7, 1, 0, 40], 80, "head", "cls"),       # keep_idx into 80 packed tokens, -inf
    (2, 24, [33, 2, 1], 50, "tok", "colsum"),           # column sums per sequence
    (1, 16, [1], None, None, "cls"),                    # one sequence of one token
    (2, 16, [70, 65], None, None, None),                # sequences longer than a tile
    (2, 80, [9, 0, 17], 40, "tok", "cls"),              # d = 80 (ViT-H), kept rows
]


def _vids(case):
    h, d, lens, T_, bias, imp = case
    return f"h{h}-d{d}-lens{'_'.join(map(str, lens))}-T{T_}-bias{bias}-imp{imp}"


def _varlen_inputs(case, dtype, device, seed=0):
    """Leaves (h, T, d) for q, k, v (the op sees non-contiguous (T, h, d) transposes), key_bias,
    keep_idx (R,) or None, cu_seqlens int32."""
    h, d, lens, T_, bias, _ = case
    g = torch.Generator().manual_seed(seed)
    R_ = sum(lens)
    n_tok = R_ if T_ is None else T_
    leaves = [torch.randn(h, n_tok, d, generator=g, dtype=torch.float64).to(device, dtype)
              .requires_grad_() for _ in range(3)]
    idx = None if T_ is None else torch.randperm(n_tok, generator=g)[:R_].to(device)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32).to(device)
    key_bias = None
    if bias == "tok":
        key_bias = torch.randn(n_tok, generator=g, dtype=torch.float64)
    elif bias == "head":
        key_bias = torch.randn(n_tok, h, generator=g, dtype=torch.float64)
        key_bias[torch.rand(n_tok, h, generator=g) < 0.3] = float("-inf")
        rows = idx[cu[1]:cu[2]] if idx is not None else torch.arange(int(cu[1]), int(cu[2]))
        key_bias[rows.cpu(), 1] = float("-inf")  # sequence 1, head 1: every key masked
    if key_bias is not None:
        key_bias = key_bias.to(device, dtype).requires_grad_()
    return leaves, key_bias, idx, cu


def naive_varlen(q, k, v, idx, cu, key_bias, scale):
    """The spec of the packed layout: per sequence, gather its rows into a (1, h, L, d) batch
    and apply the dense definition (naive_token_attention)."""
    outs, cls, col = [], [], []
    bounds = cu.tolist()
    for a, e in zip(bounds[:-1], bounds[1:]):
        rows = torch.arange(a, e) if idx is None else idx[a:e].cpu()
        if not len(rows):
            continue
        qs, ks, vs = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        kb = None if key_bias is None else (key_bias[rows][None] if key_bias.dim() == 1
                                            else key_bias[rows].t()[None])
        o, c, cs = naive_token_attention(qs, ks, vs, None, kb, scale)
        outs.append(o[0].transpose(0, 1))
        cls.append(c[0])
        col.append(cs[0])
    return torch.cat(outs), torch.cat(cls), torch.cat(col)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_vids)
def test_reference_varlen_matches_naive_spec(case):
    leaves, bias, idx, cu = _varlen_inputs(case, torch.float64, "cpu")
    q, k, v = (t.transpose(0, 1) for t in leaves)
    eo, ecls, ecol = naive_varlen(q, k, v, idx, cu, bias, case[1] ** -0.5)
    o, cls = R.token_attention(q, k, v, keep_idx=idx, cu_seqlens=cu, key_bias=bias,
                               return_importance="cls")
    _, col = R.token_attention(q, k, v, keep_idx=idx, cu_seqlens=cu, key_bias=bias,
                               return_importance="colsum")
    assert o.shape == (sum(case[2]), case[0], case[1]) and cls.shape == (sum(case[2]),)
    for a, b in ((o, eo), (cls, ecls), (col, ecol)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if case[4] == "head":  # the fully masked (sequence, head) outputs exact zeros
        assert (o[int(cu[1]):int(cu[2]), 1] == 0).all()


def test_reference_varlen_gradcheck():
    leaves, bias, idx, cu = _varlen_inputs((2, 2, [2, 0, 1, 2], 7, "tok", "cls"), torch.float64,
                                           "cpu")
    fn = lambda q, k, v, b: R.token_attention(  # noqa: E731
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), keep_idx=idx, cu_seqlens=cu,
        key_bias=b, return_importance="cls")
    # fast mode (random projections of the Jacobian): the per-sequence math is the dense
    # reference's, which the full gradcheck above covers; this checks the packing around it
    assert torch.autograd.gradcheck(fn, (*leaves, bias), fast_mode=True)


def _check_varlen(case, device, dtype):
    """Kernel o, importance and every gradient (q, k, v, key_bias, through o and the CLS
    importance) vs the fp64 reference, bounded by PyTorch's own low-precision error."""
    mode = case[5]
    leaves, bias, idx, cu = _varlen_inputs(case, dtype, device)
    if bias is not None:
        leaves = leaves + [bias]

    def run(fn, ins, cu_, idx_, **extra):
        q, k, v = (t.transpose(0, 1) for t in ins[:3])
        res = fn(q, k, v, keep_idx=idx_, cu_seqlens=cu_, key_bias=ins[3] if len(ins) > 3 else None,
                 return_importance=mode, **extra)
        return res if mode else (res, None)

    out, imp = run(T.token_attention, leaves, cu, idx, backend="triton")
    ref_in = [t.detach().double().cpu().requires_grad_() for t in leaves]
    cpu_args = (cu.cpu(), None if idx is None else idx.cpu())
    ref_o, ref_imp = run(R.token_attention, ref_in, *cpu_args)
    lowp_in = [t.detach().cpu().clone().requires_grad_() for t in leaves]
    lowp = run(R.token_attention, lowp_in, *cpu_args) if dtype != torch.float32 else None
    assert out.shape == ref_o.shape and out.dtype == dtype
    assert_close(out.cpu(), ref_o, None if lowp is None else lowp[0], name="out")
    if mode:
        assert imp.shape == ref_imp.shape
        assert_close(imp.cpu(), ref_imp, None if lowp is None else lowp[1], name=mode)
    if mode == "colsum":
        assert not imp.requires_grad
    g = torch.Generator().manual_seed(1)
    go = torch.randn(ref_o.shape, generator=g, dtype=torch.float64)
    gi = torch.randn(ref_o.shape[0], generator=g, dtype=torch.float64) * 10.0

    def loss(o, i):
        total = (o * go.to(o.device, o.dtype)).sum()
        if mode == "cls":
            total = total + (i * gi.to(i.device, i.dtype)).sum()
        return total

    grads = torch.autograd.grad(loss(out, imp), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_imp), ref_in)
    lowp_grads = (torch.autograd.grad(loss(*lowp), lowp_in) if lowp is not None
                  else [None] * len(leaves))
    for name, gr, rg, lg in zip(["dq", "dk", "dv", "dkey_bias"], grads, ref_grads, lowp_grads):
        assert gr.shape == rg.shape, name
        assert_close(gr.cpu(), rg, lg, name=name)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, **_DEV)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_vids)
def test_triton_varlen(case, device, dtype):
    _skip_if_refused(torch.empty(1, 1, 1, case[1], dtype=dtype, device=device))
    _check_varlen(case, device, dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], **_DEV)
def test_triton_varlen_ragged_drop_from_dense_projection(device, dtype):
    """TinyDrop-style: images keep different token counts of one dense (B, N) qkv projection;
    q, k, v are (B·N, h, d) strided views of it (no copies), indices b·N + j."""
    B, N, h, d = 3, 21, 2, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, N, 3 * h * d, generator=g).to(device, dtype)
    q, k, v = qkv.view(B * N, 3, h, d).unbind(1)
    assert not q.is_contiguous()
    keeps = [torch.randperm(N, generator=g)[:n] + b * N for b, n in enumerate((4, 21, 1))]
    idx = torch.cat(keeps).to(device)
    cu = torch.tensor([0, 4, 25, 26], dtype=torch.int32, device=device)
    o, imp = T.token_attention(q, k, v, keep_idx=idx, cu_seqlens=cu, max_seqlen=21,
                               return_importance="cls", backend="triton")
    for b, rows in enumerate(keeps):  # each image: dense attention over its kept tokens
        sel = rows - b * N
        qd, kd, vd = (t.view(B, N, h, d)[b, sel].transpose(0, 1)[None].double().cpu()
                      for t in (q, k, v))
        ro, rimp = R.token_attention(qd, kd, vd, return_importance="cls")
        a, e = int(cu[b]), int(cu[b + 1])
        assert_close(o[a:e].cpu(), ro[0].transpose(0, 1), name=f"o[{b}]")
        assert_close(imp[a:e].cpu(), rimp[0], name=f"importance[{b}]")


_CU = torch.tensor([0, 3, 3, 8], dtype=torch.int32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
     "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError,
     "never decrease"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     r"end at T = q.shape\[0\] = 8"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4]), keep_idx=torch.tensor([0, 2, 5])), ValueError,
     r"end at keep_idx.shape\[0\] = 3"),
    (dict(cu_seqlens=_CU.float()), ValueError, "cu_seqlens must be a 1-D int32"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "S \\+ 1 >= 2"),
    (dict(cu_seqlens=[0, 3, 8]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(max_seqlen=4), ValueError,
     r"max_seqlen=4 is shorter than the longest sequence in cu_seqlens \(5\)"),
    (dict(max_seqlen=-1), ValueError, "max_seqlen must be a non-negative int"),
    (dict(keep_idx=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])), ValueError,
     r"keep_idx must have shape \(R,\) with cu_seqlens"),
    (dict(keep_idx=torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])), ValueError, "duplicate indices"),
    (dict(keep_idx=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])), ValueError, "out-of-range"),
    (dict(key_bias=_t(8, 3)), ValueError, r"key_bias must have shape \(T,\)=\(8,\) or "
                                          r"\(T, heads\)=\(8, 2\) with cu_seqlens"),
    (dict(key_bias=_t(2, 8)), ValueError, "with cu_seqlens"),
    (dict(q=_t(1, 2, 8, 4)), ValueError,
     r"q must be packed 3-D \(T, heads, head_dim\) with cu_seqlens"),
    (dict(v=_t(8, 2, 5)), ValueError, "v must have the shape of q"),
])
def test_varlen_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(8, 2, 4), k=_t(8, 2, 4), v=_t(8, 2, 4), cu_seqlens=_CU)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        T.token_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_varlen_all_sequences_empty():
    q = _t(5, 2, 8)
    o, imp = T.token_attention(q, q, q, keep_idx=torch.zeros(0, dtype=torch.long),
                               cu_seqlens=torch.zeros(3, dtype=torch.int32),
                               return_importance="cls")
    assert o.shape == (0, 2, 8) and imp.shape == (0,)


def test_torch_compile_varlen_fullgraph_no_recompile():
    """Varlen inside torch.compile: max_seqlen passed as an int, no graph break, no recompile."""
    import torch._dynamo

    device = "cuda" if HAS_CUDA else "cpu"
    torch._dynamo.reset()

    def fn(q, k, v, idx, cu, bias):
        o, imp = T.token_attention(q, k, v, keep_idx=idx, cu_seqlens=cu, max_seqlen=7,
                                   key_bias=bias, return_importance="cls", backend="triton")
        return o.sum() + imp.sum()

    compiled = torch.compile(fn, fullgraph=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for seed in range(2):
            leaves, bias, idx, cu = _varlen_inputs((2, 16, [5, 0, 7], 20, "tok", "cls"),
                                                   torch.float32, device, seed=seed)
            q, k, v = (t.transpose(0, 1) for t in leaves)
            out = compiled(q, k, v, idx, cu, bias)
            out.backward()
            torch.testing.assert_close(out, fn(q, k, v, idx, cu, bias), rtol=1e-5, atol=1e-5)
            assert bias.grad is not None and leaves[0].grad is not None
    with pytest.raises(Exception, match="pass max_seqlen"):
        torch.compile(lambda q, cu: T.token_attention(q, q, q, cu_seqlens=cu),
                      fullgraph=True, backend="aot_eager")(q.detach(), cu)


def test_opcheck_varlen():
    device = "cuda" if HAS_CUDA else "cpu"
    leaves, bias, idx, cu = _varlen_inputs((2, 16, [3, 0, 1, 5], 12, "tok", "cls"),
                                           torch.float32, device)
    q, k, v = (t.detach().transpose(0, 1).requires_grad_() for t in leaves)
    torch.library.opcheck(torch.ops.vitkern.token_fwd.default,
                          (q, k, v, idx, bias, cu, 0.25, "cls", 5))


# --------------------------------------------------------------------------------------------
# benchmark module smoke test (tiny shapes, few reps)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Like `python -m vitkern.bench` on a CPU: one torch thread (a shared machine's busy cores
    make multi-threaded timings crawl)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_token_smoke(one_thread):
    from vitkern.bench import bench_token, harness
    from vitkern.bench.shapes import TokenCase, token_cases

    assert len(token_cases()) == 9 and {c.N for c in token_cases()} == {197, 577, 1025}
    dev = torch.device("cpu")
    ctx = harness.Context(device=dev, dev=harness.device_info(dev), quick=True,
                          modes=("fwd", "fwd+bwd"), backends=("auto",), log=lambda m: None)
    case = TokenCase("tiny", N=17, heads=2, head_dim=16, keep=0.5)
    tasks = bench_token.plan([case], [torch.float32], ("kept", "cls"))
    records = [r for t in tasks for r in bench_token.run_task(t, ctx)]
    assert not ctx.failures, ctx.failures
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["group"] for r in ok} == {"kept", "cls"}
    for r in ok:
        assert r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0 and r["check"]["ok"]
        if r["kind"] == "vitkern":
            assert set(r["speedup"]) >= {"gather+sdpa"} or "unfused+probs (EViT)" in r["speedup"]
    model_case = bench_token.TOKEN_MODEL_CASES[0]
    model_recs = bench_token.run_task(harness.Task(bench_token.FAMILY, model_case, torch.float32,
                                                   "model"), ctx)
    assert not ctx.failures, ctx.failures
    vk = [r for r in model_recs if r["kind"] == "vitkern"]
    assert vk and all(r["status"] == "ok" and r["images_per_s"] > 0 for r in vk)
    assert "timm" in vk[0]["speedup"]


def test_index_values_checked_without_a_device_sync(monkeypatch):
    """Index values (range, uniqueness, prefix sums) are checked for CPU tensors, and on a GPU
    only with VITKERN_DEBUG=1: reading them back is a device sync an op must not do per call.
    With the check off (as on a GPU), the call reads no tensor value back to the host."""
    from vitkern.ops import _common

    cpu, meta = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long, device="meta")
    monkeypatch.delenv("VITKERN_DEBUG", raising=False)
    assert _common.check_values(cpu) and not _common.check_values(meta)
    monkeypatch.setenv("VITKERN_DEBUG", "1")
    assert _common.check_values(meta)
    monkeypatch.delenv("VITKERN_DEBUG")

    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    keep = torch.tensor([[0, 4, 2, 7], [0, 1, 8, 3]])
    with pytest.raises(ValueError, match="out-of-range"):
        T.token_attention(q, k, v, keep_idx=keep + 5, backend="reference")
    monkeypatch.setattr(T, "check_values", lambda t: False)

    def no_sync(*args, **kwargs):
        raise AssertionError("a tensor value was read back to the host (a device sync)")

    for name in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    T.token_attention(q, k, v, keep_idx=keep, return_importance="cls", backend="reference")
    packed = q.transpose(1, 2).reshape(18, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    T._check_varlen("token_attention", packed, packed, packed, None, cu, 5, None, None)
