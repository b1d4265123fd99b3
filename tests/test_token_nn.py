"""vitkern.tokens against straightforward per-image definitions of EViT and ToMe (from the spec)."""
from __future__ import annotations

import math

import pytest
import torch

from vitkern import tokens as tok


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# EViT
# --------------------------------------------------------------------------------------------


def evit_spec(x, cls_attn, keep_rate, fuse):
    """EViT as the paper / spec states it, one image at a time: keep ceil(rate·(N-1)) image tokens
    with the largest CLS attention (ordered by it), CLS first; the others summed with their
    attention weights into one token appended last."""
    B, N, C = x.shape
    left = math.ceil(keep_rate * (N - 1))
    if left == N - 1:  # nothing to drop: EViT skips the reorganisation
        return x
    outs = []
    for b in range(B):
        a = cls_attn[b, 1:]  # image tokens only
        order = sorted(range(N - 1), key=lambda j: -a[j].item())
        kept, dropped = order[:left], order[left:]
        rows = [x[b, 0]] + [x[b, 1 + j] for j in kept]
        if fuse and dropped:
            rows.append(sum(a[j] * x[b, 1 + j] for j in dropped))
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("N,rate,fuse", [(17, 0.7, True), (17, 0.7, False), (50, 0.5, True),
                                         (9, 1.0, True), (2, 0.3, True)])
def test_evit_select_matches_spec(N, rate, fuse):
    x = _rand(3, N, 8).requires_grad_()
    attn = _rand(3, N, seed=1).softmax(-1).requires_grad_()
    out, keep_idx = tok.evit_select(x, attn, rate, fuse=fuse)
    ref = evit_spec(x, attn, rate, fuse)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert keep_idx.shape == (3, 1 + math.ceil(rate * (N - 1)))
    assert (keep_idx[:, 0] == 0).all()
    # EViT's fusion trains through the CLS attention: gradients match the spec too
    w = _rand(*ref.shape, seed=2)
    g = torch.autograd.grad((out * w).sum(), (x, attn), allow_unused=True)
    rg = torch.autograd.grad((ref * w).sum(), (x, attn), allow_unused=True)
    for a, b in zip(g, rg):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if fuse and out.shape[1] > keep_idx.shape[1]:
        assert attn.grad is None and g[1].abs().sum() > 0


def test_topk_tokens_orders_and_complement():
    s = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2]])
    keep, drop = tok.topk_tokens(s, 3)
    assert keep.tolist() == [[0, 4, 2, 3]] and drop.tolist() == [[5, 1]]
    keep, drop = tok.topk_tokens(s, 3, order="index")
    assert keep.tolist() == [[0, 2, 3, 4]] and drop.tolist() == [[1, 5]]
    keep, drop = tok.topk_tokens(s, 0.5, num_prefix=2)  # ceil(0.5 * 4) = 2 of tokens 2..5
    assert keep.tolist() == [[0, 1, 4, 2]] and drop.tolist() == [[3, 5]]
    with pytest.raises(ValueError, match="order must be 'score'"):
        tok.topk_tokens(s, 2, order="random")
    with pytest.raises(ValueError, match=r"keep rate must lie in \(0, 1\]"):
        tok.topk_tokens(s, 1.5)
    with pytest.raises(ValueError, match=r"scores must be \(B, N\)"):
        tok.topk_tokens(s[0], 2)


def test_gather_scatter_keep_order_and_roundtrip():
    x = _rand(2, 7, 3)
    idx = torch.tensor([[0, 5, 2], [0, 1, 6]])
    g = tok.gather_tokens(x, idx)
    assert torch.equal(g[0, 1], x[0, 5]) and torch.equal(g[1, 2], x[1, 6])
    y = tok.scatter_tokens(torch.zeros_like(x), idx, g)
    for b in range(2):
        for j in range(7):
            expect = x[b, j] if j in idx[b].tolist() else torch.zeros(3, dtype=x.dtype)
            assert torch.equal(y[b, j], expect)


# --------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------


def tome_spec(x, metric, r, size, num_prefix):
    """ToMe bipartite soft matching + size-weighted merge as the spec states it, per image:
    A = even positions, B = odd; each A token's best B partner by cosine similarity; the r A
    tokens with the best matches merge into their partners (sums weighted by size); output
    [kept A tokens (by position with CLS, else by decreasing score), all B]. ToMe protects one
    class token; more prefix tokens (registers, distillation) are protected the same way: never
    merged, kept first in order, the other tokens keeping the A / B split of their positions."""
    B, N, C = x.shape
    p = num_prefix
    r = min(r, (N - p) // 2)
    if r <= 0:  # nothing to merge: ToMe leaves the tokens as they are
        return x, size
    outs, sizes = [], []
    for b in range(B):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        A, Bs = list(range(p + p % 2, N, 2)), list(range(p + 1 - p % 2, N, 2))
        best = {}
        for a in A:
            sims = [(m[a] @ m[bb]).item() for bb in Bs]
            j = max(range(len(Bs)), key=lambda t: sims[t])
            best[a] = (sims[j], Bs[j])
        ranked = sorted(A, key=lambda a: -best[a][0])
        merged, kept = ranked[:r], ranked[r:]
        if p:
            kept = list(range(p)) + sorted(kept)
        acc = {bb: (x[b, bb] * size[b, bb], size[b, bb].clone()) for bb in Bs}
        for a in merged:
            t = best[a][1]
            acc[t] = (acc[t][0] + x[b, a] * size[b, a], acc[t][1] + size[b, a])
        rows = [(x[b, a], size[b, a]) for a in kept] + [(acc[bb][0] / acc[bb][1], acc[bb][1])
                                                       for bb in Bs]
        outs.append(torch.stack([p for p, _ in rows]))
        sizes.append(torch.stack([s for _, s in rows]))
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("N,r,num_prefix", [(17, 5, 1), (16, 3, 0), (11, 20, 1), (17, 5, 2),
                                            (16, 4, 5), (9, 3, 3), (4, 1, 4), (9, 0, 1)])
def test_tome_merge_matches_spec(N, r, num_prefix):
    x = _rand(2, N, 6)
    metric = _rand(2, N, 4, seed=1)
    size = _rand(2, N, 1, seed=2).abs() + 1.0  # sizes carried from earlier layers
    # ToMe's own form (class_token) for 0 or 1 prefix token, num_prefix beyond
    how = dict(class_token=bool(num_prefix)) if num_prefix <= 1 else dict(num_prefix=num_prefix)
    out, new_size = tok.tome_merge(x, metric, r, size, **how)
    ref, ref_size = tome_spec(x, metric, r, size, num_prefix)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_size, ref_size, rtol=1e-12, atol=1e-12)
    assert out.shape[1] == N - min(r, (N - num_prefix) // 2)
    torch.testing.assert_close(out[:, :num_prefix], x[:, :num_prefix])  # prefix untouched, first
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # no patch lost or counted twice


def test_tome_sizes_start_at_one_and_accumulate():
    x = _rand(1, 21, 4)
    out, size = tok.tome_merge(x, x, 8)
    assert size.shape == (1, 13, 1) and size.sum().item() == 21
    out2, size2 = tok.tome_merge(out, out, 4, size)
    assert size2.shape == (1, 9, 1) and size2.sum().item() == 21


# --------------------------------------------------------------------------------------------
# ragged batches
# --------------------------------------------------------------------------------------------


def test_ragged_keep_and_pad_roundtrip():
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    idx, cu, mx = tok.ragged_keep(mask)
    assert idx.tolist() == [0, 2, 3, 9] and cu.tolist() == [0, 3, 3, 4] and mx == 3
    assert cu.dtype == torch.int32
    x = _rand(3, 4, 2)
    packed = x.flatten(0, 1)[idx]
    back = tok.pad_tokens(packed, idx, 3, 4)
    torch.testing.assert_close(back, x * mask[..., None])
    with pytest.raises(ValueError, match="mask must be a"):
        tok.ragged_keep(mask.float())


# --------------------------------------------------------------------------------------------
# timm VisionTransformer patching (token_drop = EViT, token_merge = ToMe)
# --------------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")
import copy  # noqa: E402


from vitkern.integrations.timm import patch_model  # noqa: E402


def _vit(seed=0, **kw):
    """A small timm ViT with its own (random) weights: 32x32 images, 8x8 patches -> 1 + 16
    tokens, 3 heads of 16 channels, 4 blocks."""
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    cfg.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**cfg).eval()


def _images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _attn_probs(attn, x, key_bias=None, drop=None):
    """timm Attention computed explicitly: (out, probabilities (B, h, N, N), keys (B, h, N, d));
    ``drop`` is applied to the probabilities (attention dropout)."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    p = logits.softmax(-1)
    if drop is not None:
        p = drop(p)
    out = attn.proj(attn.norm((p @ v).transpose(1, 2).reshape(B, N, -1)))
    return out, p, k


def _manual_forward(model, images, block_fn):
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        x = block_fn(i, blk, x)
    return model.forward_head(model.norm(x))


def test_patch_keep_rate_one_matches_original_logits():
    model = _vit()
    patched = copy.deepcopy(model)
    report = patch_model(patched, token_drop=1.0)
    assert [n for n, _ in report.tokens] == ["blocks.1", "blocks.2", "blocks.3"]
    assert "tokens   blocks.1: EViT drop" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(patched(_images()), model(_images()), rtol=1e-5, atol=1e-5)
    assert patched.state_dict().keys() == model.state_dict().keys()


def test_patch_reuses_parameter_objects():
    model = _vit()
    params = {id(p) for p in model.parameters()}
    patch_model(model, token_drop=dict(keep_rate=0.5, layers=[0, 2]))
    assert {id(p) for p in model.parameters()} == params
    assert type(model.blocks[0]).__name__ == "TokenBlock"
    assert type(model.blocks[1]).__name__ == "Block"


@pytest.mark.parametrize("patch", [dict(token_drop=dict(keep_rate=0.5, layers=[0, 2])),
                                   dict(token_merge=2)], ids=["drop", "merge"])
def test_patch_keeps_the_parameter_order(patch):
    """named_parameters() in the original order (with qk_norm and scale_norm parameters inside
    the attention): an optimizer state saved before patching lines up after it."""
    model = _vit(qk_norm=True, scale_attn_norm=True)
    before = [(n, p.shape) for n, p in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters())
    model(_images()).sum().backward()
    opt.step()
    state = opt.state_dict()
    patch_model(model, **patch)
    assert [(n, p.shape) for n, p in model.named_parameters()] == before
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(state)
    model(_images()).sum().backward()
    opt.step()  # shapes line up: no error


@pytest.mark.parametrize("fuse", [True, False])
def test_patch_evit_matches_explicit_evit(fuse):
    """keep 0.5 at blocks 1, 3: the patched model equals EViT written with explicit attention
    probabilities (what EViT's code computes) and the spec's token reorganisation."""
    model = _vit()
    layers, keep = (1, 3), 0.5

    def block_fn(i, blk, x):
        a, p, _ = _attn_probs(blk.attn, blk.norm1(x))
        x = x + a
        if i in layers:
            x = evit_spec(x, p[:, :, 0, :].mean(1), keep, fuse)
        return x + blk.mlp(blk.norm2(x))

    with torch.no_grad():
        ref = _manual_forward(model, _images(), block_fn)
        patch_model(model, token_drop=dict(keep_rate=keep, layers=layers, fuse=fuse))
        seen = []
        hook = model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
        out = model(_images())
        hook.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 17 tokens -> 1 + ceil(0.5·16) (+1 fused) -> 1 + ceil(0.5·(8 or 9)) (+1)
    assert seen == ([1 + 5 + 1] if fuse else [1 + 4])


class FixedDropout(torch.nn.Module):
    """Dropout with a mask fixed by the input's shape: training runs become comparable."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        g = torch.Generator().manual_seed(x.shape[-1])
        return x * (torch.rand(x.shape, generator=g) >= self.p) / (1 - self.p)


def test_patch_drop_with_attention_dropout():
    """attn_drop_rate > 0: patched; eval is fused and equals the original, training runs the
    eager math with dropout on the probabilities and EViT's importance after dropout."""
    model = _vit(attn_drop_rate=0.25)
    patched = copy.deepcopy(model)
    report = patch_model(patched, token_drop=dict(keep_rate=1.0))
    assert len(report.replaced) == 3 and not [r for r in report.left if "dropout" in r[2]]
    with torch.no_grad():
        torch.testing.assert_close(patched(_images()), model(_images()), rtol=1e-5, atol=1e-5)
    layers, keep = (1, 3), 0.5
    for blk in model.blocks:  # the blocks left to timm take its eager path, with this dropout
        blk.attn.attn_drop, blk.attn.fused_attn = FixedDropout(0.25), False

    def block_fn(i, blk, x):
        a, p, _ = _attn_probs(blk.attn, blk.norm1(x), drop=blk.attn.attn_drop)
        x = x + a
        if i in layers:
            x = evit_spec(x, p[:, :, 0, :].mean(1), keep, True)
        return x + blk.mlp(blk.norm2(x))

    model.train()
    ref = _manual_forward(model, _images(), block_fn)
    patch_model(model, token_drop=dict(keep_rate=keep, layers=layers))
    out = model(_images())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(model.blocks[1].attn.qkv.weight.grad).all()


def test_patch_evit_trains_through_the_cls_importance():
    model = _vit().train()
    patch_model(model, token_drop=dict(keep_rate=0.5, layers=[1]))
    model(_images()).sum().backward()
    qkv = model.blocks[1].attn.qkv.weight.grad
    assert qkv is not None and torch.isfinite(qkv).all()


@pytest.mark.parametrize("prop_attn", [True, False])
def test_patch_tome_matches_explicit_tome(prop_attn):
    model = _vit()
    r = 3
    state = {}

    def block_fn(i, blk, x):
        size = state.get("size") if i else None
        bias = size.log()[..., 0] if (prop_attn and size is not None) else None
        a, _, k = _attn_probs(blk.attn, blk.norm1(x), bias)
        x = x + a
        if size is None:
            size = torch.ones_like(x[..., :1])
        x, state["size"] = tome_spec(x, k.mean(1), r, size, 1)
        return x + blk.mlp(blk.norm2(x))

    with torch.no_grad():
        ref = _manual_forward(model, _images(), block_fn)
        report = patch_model(model, token_merge=dict(r=r, prop_attn=prop_attn))
        assert len(report.tokens) == 4 and "ToMe merge: r=3" in report.tokens[0][1]
        out = model(_images())
        out2 = model(_images())  # sizes are reset on every forward
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_patch_tome_r0_matches_original():
    model = _vit()
    patched = copy.deepcopy(model)
    patch_model(patched, token_merge=0)
    with torch.no_grad():
        torch.testing.assert_close(patched(_images()), model(_images()), rtol=1e-5, atol=1e-5)


def test_patch_triton_backend_matches_reference():
    """The kernels inside a patched model (interpreter on CPU): EViT keep 0.5 with fusion."""
    ref_model = _vit()
    tri_model = copy.deepcopy(ref_model)
    patch_model(ref_model, token_drop=0.5, backend="reference")
    patch_model(tri_model, token_drop=0.5, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(tri_model(_images()), ref_model(_images()), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_drop=0.5, token_merge=2), "not both"),
    (dict(token_drop=dict(keep_rate=0.5, depth=3)), r"unknown token_drop option\(s\) \['depth'\]"),
    (dict(token_drop=dict(keep_rate=0.5, layers=[4])), r"layers \[4\] out of range"),
    (dict(token_merge=-1), "r must be an int >= 0"),
    (dict(token_drop=1.5), r"keep rate must lie in \(0, 1\]"),
    (dict(token_drop=dict(keep_rate=0.5, order="random")), "order must be 'score'"),
    (dict(token_drop=1), r"token_drop=1 is ambiguous.*dict\(keep_rate=1\)"),
])
def test_patch_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patch_model(_vit(), **kwargs)


def test_patch_drop_with_pooled_head_needs_opt_in():
    """global_pool='avg' pools whatever tokens are left: EViT changes what the head sees."""
    model = _vit(global_pool="avg")
    with pytest.raises(ValueError, match="global_pool='avg' changes what the head sees"):
        patch_model(model, token_drop=0.5)
    patch_model(model, token_drop=dict(keep_rate=0.5, allow_pool=True))
    assert model(_images()).shape == (2, 10)
    counted = _vit()
    patch_model(counted, token_drop=dict(keep_rate=1, layers=[1]))  # the explicit count form
    assert counted(_images()).shape == (2, 10)


def test_evit_select_keeps_every_prefix_token():
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 11, 4, generator=g), torch.rand(2, 11, generator=g)
    scores[:, :3] = -1.0  # prefix scores are ignored, however low
    out, keep_idx = tok.evit_select(x, scores, 0.5, num_prefix=3)
    assert keep_idx.shape == (2, 3 + 4) and (keep_idx[:, :3] == torch.arange(3)).all()
    assert torch.equal(out[:, :3], x[:, :3]) and out.shape == (2, 3 + 4 + 1, 4)


def _prefixed_vit(kind):
    """The small ViT with 4 register tokens (DINOv2-reg style, 5 prefix tokens) or a DeiT
    distillation token (2 prefix tokens)."""
    if kind == "registers":
        return _vit(reg_tokens=4)
    torch.manual_seed(0)
    return timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10).eval()


@pytest.mark.parametrize("kind", ["registers", "distilled"])
def test_patch_drop_keeps_every_prefix_token(kind):
    """ViTs with register tokens (DINOv2-reg style) or a distillation token (DeiT distilled):
    every prefix token is kept, the importance is the class token's attention."""
    model = _prefixed_vit(kind)
    n_prefix = model.num_prefix_tokens
    assert n_prefix == (5 if kind == "registers" else 2)
    same = copy.deepcopy(model)
    patch_model(same, token_drop=1.0)
    with torch.no_grad():
        torch.testing.assert_close(same(_images()), model(_images()), rtol=1e-5, atol=1e-5)
    seen = []
    outs = {}
    for backend in ("reference", "triton"):
        m = copy.deepcopy(model)
        patch_model(m, token_drop=dict(keep_rate=0.5, layers=[1]), backend=backend)
        hook = m.blocks[2].register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape))
        with torch.no_grad():
            outs[backend] = m(_images())
        hook.remove()
    assert seen[0][1] == n_prefix + 8 + 1  # prefix, ceil(0.5 * 16) image tokens, fused
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["registers", "distilled"])
def test_patch_merge_keeps_every_prefix_token(kind):
    """ToMe on ViTs with register tokens or a distillation token: the prefix tokens are never
    merged and stay first (the distilled head reads tokens 0 and 1), the others are matched as
    ToMe does; equal to ToMe written out with explicit attention probabilities."""
    model = _prefixed_vit(kind)
    n_prefix, r, state = model.num_prefix_tokens, 3, {}

    def block_fn(i, blk, x):
        size = state.get("size") if i else None
        a, _, k = _attn_probs(blk.attn, blk.norm1(x), None if size is None else size.log()[..., 0])
        x = x + a
        x, state["size"] = tome_spec(x, k.mean(1), r, torch.ones_like(x[..., :1])
                                     if size is None else size, n_prefix)
        return x + blk.mlp(blk.norm2(x))

    with torch.no_grad():
        ref = _manual_forward(model, _images(), block_fn)
        outs = {}
        for backend in ("reference", "triton"):
            m = copy.deepcopy(model)
            patch_model(m, token_merge=r, backend=backend)
            outs[backend] = m(_images())
    torch.testing.assert_close(outs["reference"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"], ref, rtol=1e-4, atol=1e-4)


def test_patch_report_says_why_attention_is_left():
    model = _vit()
    report = patch_model(model, token_drop=dict(keep_rate=0.5, layers=[1]))
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"blocks.0.attn", "blocks.2.attn", "blocks.3.attn"}
    assert all(why.startswith("kept on purpose") and "SDPA" in why for why in left.values())
    xcit = timm.create_model("xcit_nano_12_p16_224", pretrained=False)
    left = {name: why for name, _, why in patch_model(xcit).left}
    assert set(left) == {"cls_attn_blocks.0", "cls_attn_blocks.1"}
    assert all("class attention" in why for why in left.values())


def test_patch_drop_needs_a_class_token():
    model = _vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="needs a class token first"):
        patch_model(model, token_drop=0.5)
    patch_model(model, token_merge=2)  # ToMe works without one
    assert model(_images()).shape == (2, 10)
    with pytest.raises(ValueError, match="need a timm VisionTransformer"):
        patch_model(torch.nn.Linear(2, 2), token_drop=0.5)
