"""vitkern.nn.window: timm-compatible Swin WindowAttention, timm patching (Swin V1) and the
SparseViT helpers, against timm's own modules."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from conftest import assert_close

swin = pytest.importorskip("timm.models.swin_transformer")

from vitkern.integrations.timm import patch_model  # noqa: E402
from vitkern.nn import window as W_nn  # noqa: E402
from vitkern.reference import window as W_ref  # noqa: E402


def _block(H, W, ws, s, *, C=32, h=2, qkv_bias=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    blk = swin.SwinTransformerBlock(C, (H, W), num_heads=h, window_size=ws, shift_size=s,
                                    qkv_bias=qkv_bias, **kw).to(dtype)
    blk.attn.fused_attn = False
    with torch.no_grad():  # make every term matter: biases and the table well away from 0
        blk.attn.relative_position_bias_table.normal_()
        if qkv_bias:
            blk.attn.qkv.bias.normal_()
    return blk


def _grads(out, module, x):
    params = [p for p in module.parameters() if p.requires_grad]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return torch.autograd.grad(out, [x] + params, g)


def _compare(out, ref_out, grads, ref_grads):
    assert_close(out.detach(), ref_out.detach())
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, name=f"grad {i}")


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


def test_state_dict_and_partitioned_windows_match_timm():
    torch.manual_seed(0)
    t = swin.WindowAttention(48, num_heads=3, window_size=4).double()
    t.fused_attn = False
    v = W_nn.WindowAttention(48, num_heads=3, window_size=4).double()
    sd = t.state_dict()
    assert {k: x.shape for k, x in v.state_dict().items()} == {k: x.shape for k, x in sd.items()}
    v.load_state_dict(sd, strict=True)
    assert torch.equal(v.relative_position_index, t.relative_position_index)
    x = torch.randn(6, 16, 48, dtype=torch.float64)
    assert_close(v(x), t(x))
    blk = _block(8, 8, 4, 2, C=48, h=3)
    assert_close(v(x[:4], mask=blk.attn_mask), t(x[:4], mask=blk.attn_mask))


def test_from_timm_shares_parameters_and_buffers():
    t = swin.WindowAttention(32, num_heads=2, window_size=7)
    v = W_nn.WindowAttention.from_timm(t)
    assert v.qkv is t.qkv and v.proj is t.proj
    assert v.relative_position_bias_table is t.relative_position_bias_table
    assert v.relative_position_index is t.relative_position_index
    assert list(v.state_dict()) == list(t.state_dict())


@pytest.mark.parametrize("H,W,ws,s,qkv_bias", [
    (8, 8, 4, 2, True),     # shifted, divisible
    (9, 11, 4, 2, True),    # padded map with a qkv bias: the exact b_k / b_v fold
    (12, 13, 7, 3, True),   # timm's roll-then-pad edge mixing, padded
    (7, 7, 7, 3, True),     # last Swin stage: the window clamps to the map, no shift
    (9, 10, 4, 0, False),
])
def test_full_map_matches_timm_block_attn(H, W, ws, s, qkv_bias):
    blk = _block(H, W, ws, s, qkv_bias=qkv_bias)
    attn = W_nn.WindowAttention.from_timm(blk.attn, backend="reference")
    x = torch.randn(2, H, W, 32, dtype=torch.float64, requires_grad=True)
    ref_out = blk._attn(x)
    out = attn(x, shift_size=blk.shift_size)
    _compare(out, ref_out, _grads(out, blk.attn, x), _grads(ref_out, blk.attn, x))


@pytest.mark.parametrize("H,W,ws,s", [(8, 8, 4, 2), (9, 11, 4, 2), (5, 9, 7, 3)])
def test_patched_block_runs_the_triton_kernel(H, W, ws, s, monkeypatch):
    """The module's kernel path under the interpreter (or on a GPU): a patched timm block in
    fp32 against the unpatched one, output and every parameter gradient."""
    blk = _block(H, W, ws, s, dtype=torch.float32)
    patched = copy.deepcopy(blk)
    report = patch_model(patched, backend="triton")
    assert type(patched).__name__ == "FusedSwinTransformerBlock"
    assert [r[0] for r in report.replaced] == ["", "attn"] and not report.left
    calls = []
    real = W_nn.window_attention
    monkeypatch.setattr(W_nn, "window_attention",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    x = torch.randn(2, H, W, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = patched(xa), blk(xb)
    assert calls == ["triton"]
    _compare(out, ref_out, _grads(out, patched, xa), _grads(ref_out, blk, xb))


def test_attn_dropout_in_training_runs_unfused_on_windows():
    """The fused op has no dropout on the probabilities: in training the module applies it on
    partitioned windows (timm's math) and refuses the map form, saying why; eval is fused."""
    m = W_nn.WindowAttention(32, num_heads=2, window_size=4, attn_drop=0.5)
    with pytest.raises(RuntimeError, match="attn_drop=0.5 in training mode.*partitioned"):
        m(torch.randn(1, 8, 8, 32))
    windows = torch.randn(4, 16, 32)
    torch.manual_seed(0)
    a = m(windows)
    torch.manual_seed(1)
    assert not torch.equal(a, m(windows))  # dropout is applied
    m.eval()
    m(torch.randn(1, 8, 8, 32))
    assert torch.equal(m(windows), m(windows))


def test_patching_the_model_object_itself():
    """A timm block passed as the model is patched in place (its class switch) without making it
    its own child; a bare attention module cannot be replaced in place and is reported."""
    blk = _block(8, 8, 4, 2, dtype=torch.float32)
    patch_model(blk)
    assert "" not in dict(blk.named_children()) and blk.eval() is blk
    attn = swin.WindowAttention(32, num_heads=2, window_size=4)
    rep = patch_model(attn)
    assert not rep.replaced and rep.left[0][0] == "<model>" and "from_timm" in rep.left[0][2]


def test_patched_block_with_attention_dropout():
    """attn_drop_rate > 0 is patched: eval runs fused and equals timm; training takes timm's own
    (unfused) path through the vitkern module's eager math, with dropout."""
    blk = _block(8, 8, 4, 2, attn_drop=0.3, dtype=torch.float32)
    ref = copy.deepcopy(blk)
    rep = patch_model(blk)
    assert len(rep.replaced) == 2 and not rep.left, str(rep)
    assert type(blk).__name__ == "FusedSwinTransformerBlock"
    x = torch.randn(2, 8, 8, 32)
    blk.eval(), ref.eval()
    with torch.no_grad():
        assert_close(blk(x), ref(x).double(), rtol32=1e-5)
    blk.train()
    calls = []
    blk.attn.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape))
    torch.manual_seed(0)
    y = blk(x)
    y.sum().backward()
    assert calls == [(2 * 4, 16, 32)]  # partitioned windows: timm's path, not the map
    torch.manual_seed(1)
    assert not torch.equal(y.detach(), blk(x).detach())
    assert blk.attn.relative_position_bias_table.grad is not None


# --------------------------------------------------------------------------------------------
# timm patching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patched_swin_tiny_matches_timm(mode, monkeypatch):
    """swin_tiny_patch4_window7_224 (random init, drop path on in train mode): same logits and
    parameter gradients, every block's attention through the op on the full map."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    model.train(mode == "train")
    patched = copy.deepcopy(model)
    ids = {n: id(p) for n, p in patched.named_parameters()}
    report = patch_model(patched)
    assert len(report.replaced) == 2 * 12 and not report.left, str(report)
    assert {n: id(p) for n, p in patched.named_parameters()} == ids  # no copies
    assert patched.state_dict().keys() == model.state_dict().keys()
    calls = []
    real = W_nn.window_attention
    monkeypatch.setattr(W_nn, "window_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    x = torch.randn(1, 3, 224, 224)
    torch.manual_seed(1)
    ref_out = model(x)
    torch.manual_seed(1)  # the same drop-path draws: the op consumes no random numbers
    out = patched(x)
    assert sorted(set(calls)) == [49, 196, 784, 3136] and len(calls) == 12
    assert_close(out.detach(), ref_out.detach(), rtol32=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for _, p in sorted(model.named_parameters())]
    pparams = [p for _, p in sorted(patched.named_parameters())]
    ref_grads = torch.autograd.grad(ref_out, params, g)
    grads = torch.autograd.grad(out, pparams, g)
    for (name, _), a, b in zip(sorted(model.named_parameters()), grads, ref_grads):
        assert_close(a, b, name=name, rtol32=1e-4)


@pytest.mark.parametrize("H,W,kw", [
    (5, 5, dict(always_partition=True)),  # timm keeps the 7x7 window and shift 3 on a 5x5 map
    (5, 9, {}),                           # per-axis clamp: window (5, 7), shift (0, 3)
    (7, 14, {}),                          # window (7, 7), shift (0, 3)
])
def test_patched_block_follows_timm_window_clamp(H, W, kw):
    blk = _block(H, W, 7, 3, **kw)
    patched = copy.deepcopy(blk)
    rep = patch_model(patched, backend="reference")
    assert len(rep.replaced) == 2 and not rep.left
    x = torch.randn(2, H, W, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = patched(xa), blk(xb)
    _compare(out, ref_out, _grads(out, patched, xa), _grads(ref_out, blk, xb))


def test_patched_model_pickles_and_deepcopies():
    blk = _block(8, 8, 4, 2, dtype=torch.float32)
    patch_model(blk)
    buf = io.BytesIO()
    torch.save(blk, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(1, 8, 8, 32)
    assert type(loaded) is type(blk) and isinstance(loaded, swin.SwinTransformerBlock)
    assert torch.equal(loaded(x), blk(x)) and torch.equal(copy.deepcopy(blk)(x), blk(x))


# --------------------------------------------------------------------------------------------
# SparseViT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,W,ws,s", [(8, 8, 4, 2), (9, 11, 4, 2), (14, 14, 7, 0)])
def test_window_scores_follow_the_spec(H, W, ws, s):
    """L2 norm over each window of the per-token mean |x|, windows of timm's rolled, padded
    partition (pad tokens 0)."""
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    a = x.abs().mean(-1, keepdim=True)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    a = torch.nn.functional.pad(torch.roll(a, (-s, -s), (1, 2)), (0, 0, 0, Wp - W, 0, Hp - H))
    win = swin.window_partition(a, (ws, ws)).reshape(2, -1, ws * ws)
    expected = win.norm(dim=-1).float()
    torch.testing.assert_close(W_nn.window_scores(x, ws, s), expected)
    keep = W_nn.keep_windows(expected, 0.3)
    nw = expected.shape[1]
    assert keep.shape == (2, int(nw * 0.7))
    assert torch.equal(keep, expected.topk(int(nw * 0.7), dim=1).indices)
    with pytest.raises(ValueError, match="ratio must lie in"):
        W_nn.keep_windows(expected, 1.5)


@pytest.mark.parametrize("H,W,ws,s,keep", [
    (8, 8, 4, 2, 0.0),               # every window kept: exactly the timm block
    (8, 8, 4, 2, 0.5),
    (9, 11, 4, 2, [[8, 2, 6], [0, 5, 7]]),  # padded windows (2, 5, 6, 7, 8) with a qkv bias
    (9, 11, 4, 0, 1.0),              # nothing kept: identity
])
def test_sparse_block_is_the_block_on_kept_windows_identity_elsewhere(H, W, ws, s, keep):
    blk = _block(H, W, ws, s)
    sparse = W_nn.SparseSwinBlock(blk, backend="reference")
    x = torch.randn(2, H, W, 32, dtype=torch.float64, requires_grad=True)
    keep = (torch.tensor(keep) if isinstance(keep, list)
            else W_nn.keep_windows(W_nn.window_scores(x, ws, s), keep))
    out = sparse(x, keep)
    mask = W_ref.active_token_mask((H, W), ws, s, keep).reshape(2, H, W, 1)
    ref_out = torch.where(mask, blk(x), x)
    _compare(out, ref_out, _grads(out, blk, x), _grads(ref_out, blk, x))


def test_sparse_block_triton_kernel_path():
    H, W, ws, s = 9, 11, 4, 2
    blk = _block(H, W, ws, s, dtype=torch.float32)
    sparse = W_nn.SparseSwinBlock(blk, backend="triton")
    x = torch.randn(2, H, W, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    keep = torch.tensor([[8, 2, 6], [0, 5, 7]])
    out = sparse(xa, keep)
    mask = W_ref.active_token_mask((H, W), ws, s, keep).reshape(2, H, W, 1)
    ref_out = torch.where(mask, blk(xb), xb)
    _compare(out, ref_out, _grads(out, blk, xa), _grads(ref_out, blk, xb))


# --------------------------------------------------------------------------------------------
# Swin V2: cosine attention + continuous position bias folded into the op's inputs
# --------------------------------------------------------------------------------------------

swin2 = pytest.importorskip("timm.models.swin_transformer_v2")


def _block_v2(H, W, ws, s, *, C=32, h=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    blk = swin2.SwinTransformerV2Block(C, (H, W), num_heads=h, window_size=ws, shift_size=s,
                                       **kw).to(dtype)
    with torch.no_grad():  # make every term matter (timm zero-inits the biases)
        a = blk.attn
        a.q_bias.normal_()
        a.v_bias.normal_()
        a.logit_scale.copy_(torch.tensor([0.5, 6.0]).view(2, 1, 1))  # one head over the clamp
        for m in a.cpb_mlp:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_()
    return blk


@pytest.mark.parametrize("H,W,ws,s", [(8, 8, 4, 2), (9, 11, 4, 2), (8, 8, 8, 4), (9, 10, 4, 0)])
def test_v2_full_map_matches_timm_block_attn(H, W, ws, s):
    blk = _block_v2(H, W, ws, s)
    attn = W_nn.WindowAttentionV2.from_timm(blk.attn, backend="reference")
    assert attn.logit_scale is blk.attn.logit_scale and attn.cpb_mlp is blk.attn.cpb_mlp
    x = torch.randn(2, H, W, 32, dtype=torch.float64, requires_grad=True)
    ref_out = blk._attn(x)
    out = attn(x, shift_size=blk.shift_size)
    _compare(out, ref_out, _grads(out, blk.attn, x), _grads(ref_out, blk.attn, x))
    if s and H % ws == 0 and W % ws == 0:  # timm's module interface, partitioned windows + mask
        xw = swin2.window_partition(torch.roll(x, (-s, -s), (1, 2)), (ws, ws)).reshape(
            -1, ws * ws, 32)
        assert_close(attn(xw, mask=blk.attn_mask), blk.attn(xw, mask=blk.attn_mask))


def test_v2_state_dict_matches_timm():
    t = swin2.WindowAttention(32, (4, 4), 2, pretrained_window_size=(6, 6))
    v = W_nn.WindowAttentionV2(32, 4, 2, pretrained_window_size=6)
    assert {k: x.shape for k, x in v.state_dict().items()} == {
        k: x.shape for k, x in t.state_dict().items()}
    v.load_state_dict(t.state_dict(), strict=True)
    torch.testing.assert_close(v.relative_coords_table, t.relative_coords_table)
    assert torch.equal(v.relative_position_index, t.relative_position_index)


def test_v2_patched_block_runs_the_triton_kernel():
    blk = _block_v2(9, 11, 4, 2, dtype=torch.float32)
    patched = copy.deepcopy(blk)
    report = patch_model(patched, backend="triton")
    assert type(patched).__name__ == "FusedSwinTransformerV2Block" and not report.left
    x = torch.randn(2, 9, 11, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = patched(xa), blk(xb)
    _compare(out, ref_out, _grads(out, patched, xa), _grads(ref_out, blk, xb))


def test_patched_swinv2_tiny_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False).eval()
    patched = copy.deepcopy(model)
    report = patch_model(patched)
    assert len(report.replaced) == 2 * 12 and not report.left, str(report)
    x = torch.randn(1, 3, 256, 256)
    ref_out, out = model(x), patched(x)
    assert_close(out.detach(), ref_out.detach(), rtol32=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in sorted(model.named_parameters())]
    ref_grads = torch.autograd.grad(ref_out, [p for _, p in sorted(model.named_parameters())], g)
    grads = torch.autograd.grad(out, [p for _, p in sorted(patched.named_parameters())], g)
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a, b, name=name, rtol32=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_set_input_size_after_patching(version):
    """timm's documented way to change resolution keeps working on a patched model (it calls
    set_window_size on the replaced attention) and gives the unpatched model's logits."""
    import timm.models.swin_transformer_v2 as swin2

    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
               num_heads=(2, 4), num_classes=5)
    model = (swin.SwinTransformer if version == 1 else swin2.SwinTransformerV2)(**cfg).eval()
    patched = copy.deepcopy(model)
    assert not patch_model(patched).left
    for m in (model, patched):
        m.set_input_size((40, 48), window_size=5)
    assert patched.layers[0].blocks[0].attn.window_size == (5, 5)
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert_close(patched(x), model(x).double(), rtol32=1e-4)
    state = {k: v for k, v in model.state_dict().items()}
    assert patched.state_dict().keys() == state.keys()


# --------------------------------------------------------------------------------------------
# timm's swinv2_cr: cosine attention, a dense meta-MLP position bias, a k bias of its own
# --------------------------------------------------------------------------------------------

swin2cr = pytest.importorskip("timm.models.swin_transformer_v2_cr")


def _block_cr(H, W, ws, s, *, C=32, h=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    blk = swin2cr.SwinTransformerV2CrBlock(C, h, (H, W), (ws, ws), shift_size=(s, s),
                                           init_values=None, **kw).to(dtype)
    with torch.no_grad():  # make every term matter
        a = blk.attn
        a.qkv.bias.normal_()
        a.logit_scale.copy_(torch.tensor([0.5, 6.0]))  # one head over the clamp
        a.meta_mlp.fc2.weight.normal_()
    return blk.eval()


@pytest.mark.parametrize("H,W,ws,s", [(8, 8, 4, 2), (8, 12, 4, 2), (8, 8, 8, 0), (9, 11, 4, 2)])
def test_cr_patched_block_matches_timm(H, W, ws, s):
    """Divisible maps are fused (full map into the op); a padded one keeps timm's path (its pad
    keys normalize(b_k) have no exact fold), and the patched block says so."""
    blk = _block_cr(H, W, ws, s)
    patched = copy.deepcopy(blk)
    report = patch_model(patched, backend="reference")
    assert type(patched).__name__ == "FusedSwinTransformerV2CrBlock" and not report.left
    assert isinstance(patched.attn, W_nn.WindowAttentionV2Cr)
    assert patched.attn.fuses((H, W)) == (H % ws == 0 and W % ws == 0)
    calls = []
    hook = patched.attn.register_forward_pre_hook(lambda m, a: calls.append(a[0].dim()))
    x = torch.randn(2, H, W, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = patched(xa), blk(xb)
    hook.remove()
    assert calls == [4 if patched.attn.fuses((H, W)) else 3]  # the map, or timm's windows
    _compare(out, ref_out, _grads(out, patched, xa), _grads(ref_out, blk, xb))
    if s and H % ws == 0 and W % ws == 0:  # timm's module interface, partitioned windows + mask
        xw = swin2cr.window_partition(torch.roll(x, (-s, -s), (1, 2)), (ws, ws)).reshape(
            -1, ws * ws, 32)
        assert_close(patched.attn(xw, mask=blk.attn_mask), blk.attn(xw, mask=blk.attn_mask))


def test_cr_state_dict_and_parameter_order_match_timm():
    t = swin2cr.WindowMultiHeadAttention(32, 2, (4, 4), meta_hidden_dim=24)
    v = W_nn.WindowAttentionV2Cr(32, 2, 4, meta_hidden_dim=24)
    assert [(k, x.shape) for k, x in v.named_parameters()] == [
        (k, x.shape) for k, x in t.named_parameters()]
    v.load_state_dict(t.state_dict(), strict=True)
    assert torch.equal(v.relative_coordinates_log, t.relative_coordinates_log)
    shared = W_nn.WindowAttentionV2Cr.from_timm(t)
    assert [id(p) for p in shared.parameters()] == [id(p) for p in t.parameters()]
    x = torch.randn(3, 16, 32)
    assert_close(v.eval()(x), t.eval()(x))  # eval: the meta MLP has dropout


def test_cr_patched_block_runs_the_triton_kernel():
    blk = _block_cr(8, 12, 4, 2)  # fp64: the reference
    patched = copy.deepcopy(blk).float()
    patch_model(patched, backend="triton")
    x = torch.randn(2, 8, 12, 32, dtype=torch.float64)
    xa, xb = x.float().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = patched(xa), blk(xb)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _compare(out, ref_out, torch.autograd.grad(out, [xa, *patched.parameters()], g.float()),
             torch.autograd.grad(ref_out, [xb, *blk.parameters()], g))


def test_patched_swinv2_cr_model_matches_timm_and_resizes():
    """A small swinv2_cr model: every block patched, the logits and gradients equal, and
    set_input_size after patching (the window changes, the meta MLP's coordinates follow)."""
    torch.manual_seed(0)
    model = swin2cr.SwinTransformerV2Cr(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                        depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()
    patched = copy.deepcopy(model)
    report = patch_model(patched)
    assert len(report.replaced) == 2 * 4 and not report.left, str(report)
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 3, 32, 32)
    out, ref_out = patched(x), model(x)
    assert_close(out.detach(), ref_out.detach(), rtol32=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for _, p in model.named_parameters()]
    for (name, _), a, b in zip(model.named_parameters(),
                               torch.autograd.grad(out, list(patched.parameters()), g),
                               torch.autograd.grad(ref_out, params, g)):
        assert_close(a, b, name=name, rtol32=1e-4)
    for m in (model, patched):
        m.set_input_size((40, 48), window_size=5)
    assert patched.stages[0].blocks[0].attn.window_size == (5, 5)
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert_close(patched(x), model(x).double(), rtol32=1e-4)


# --------------------------------------------------------------------------------------------
# the benchmark module (CPU smoke run: tiny shape, few repetitions)
# --------------------------------------------------------------------------------------------


def test_bench_window_smoke():
    from vitkern.bench import bench_window as bw, harness

    ctx = harness.Context(device=torch.device("cpu"), dev=harness.device_info("cpu"),
                          modes=("fwd", "fwd+bwd"), quick=True, strict=True)
    cases = bw.cases_for("t_win_pad", True)
    tasks = bw.plan(cases, [torch.float32], ("attn", "block_attn", "sparse50"))
    assert [t.group for t in tasks] == ["attn", "block_attn", "sparse50"]
    recs = [r for t in tasks for r in bw.run_task(t, ctx)]
    assert not ctx.failures
    ok = [r for r in recs if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"vitkern[auto:eager]", "timm_math", "sdpa", "timm",
                                           "dense[auto:eager]"}
    for r in ok:
        assert r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        if r["kind"] == "vitkern":
            assert r["check"]["ok"] and r["speedup"]
    sparse = [r for r in ok if r["group"] == "sparse50"]
    assert sparse and all(r["flop_bound"] == 2.0 and r["kept_windows"] == 6 for r in sparse)
    assert {r["status"] for r in recs if r["provider"] == "flex"} == {"skipped"}
