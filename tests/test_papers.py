"""``patch_model`` on models built like the papers' own repositories (LITv2, PPMA, EViT).

The models below are small copies of the repositories' module *layout* (class names, attribute
names, parameter shapes, forward call signatures), with the math written here from the specs,
at tiny sizes. ``patch_model`` must recognise their attention by class name plus layout, reuse
the parameters, and give the same logits and gradients.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkern.integrations import papers
from vitkern.integrations.timm import patch_model
from vitkern.nn import HiLo as VkHiLo
from vitkern.nn import PolylinePathAttention


def _init(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Random weights large enough that attention is far from uniform (token selection and
    window / mask structure then matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue  # keep PPMA's decay inits: decays in (0, 1)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and
                                                                name.endswith("weight") else 0.0))
    return model.eval()


def _close(a, b, rtol=1e-5, name="logits"):
    err = (a - b).abs().max().item()
    bound = rtol * max(b.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _check_patched(model, x, call=lambda m, x: m(x), expect=(), backend="auto", rtol=1e-5,
                   grads=True):
    """Patch a copy of ``model``; check the report names ``expect``, the parameters are the same
    objects in the same order under the same state_dict keys, and logits (and gradients) match."""
    ref_model = copy.deepcopy(model)
    params_before = list(model.named_parameters())
    keys_before = list(model.state_dict().keys())
    report = patch_model(model, backend=backend)
    replaced = [name for name, _, _ in report.replaced]
    for name in expect:
        assert name in replaced, f"{name} not replaced:\n{report}"
    assert not report.left, str(report)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in params_before]
    assert all(p is q for (_, p), (_, q) in zip(after, params_before)), "parameters were copied"
    assert list(model.state_dict().keys()) == keys_before
    ref = _flat(call(ref_model, x))
    out = _flat(call(model, x))
    _close(out, ref, rtol)
    if grads:
        model.train(), ref_model.train()  # no dropout in these models: same math
        ref = _flat(call(ref_model, x))
        out = _flat(call(model, x))
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
        (ref * w).sum().backward()
        (out * w).sum().backward()
        ref_grads = dict(ref_model.named_parameters())
        for n, p in model.named_parameters():
            assert p.grad is not None, f"no gradient reached {n}"
            _close(p.grad, ref_grads[n].grad, max(rtol, 1e-4), name=f"grad {n}")
    return report


def _flat(out):
    if isinstance(out, (list, tuple)):
        return torch.cat([o.flatten() for o in out if isinstance(o, torch.Tensor)])
    return out.flatten()


# ============================================================================================
# LITv2 (ziplab/LITv2): HiLo in classification (forward(x)) and detection (forward(x, H, W))
# ============================================================================================


def _hilo_init(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.,
               proj_drop=0., window_size=2, alpha=0.5):
    """LITv2 HiLo's constructor layout (same attributes, submodules, registration order)."""
    nn.Module.__init__(self)
    head_dim = int(dim / num_heads)
    self.dim = dim
    self.l_heads = int(num_heads * alpha)
    self.l_dim = self.l_heads * head_dim
    self.h_heads = num_heads - self.l_heads
    self.h_dim = self.h_heads * head_dim
    self.ws = window_size
    if self.ws == 1:
        self.h_heads, self.h_dim, self.l_heads, self.l_dim = 0, 0, num_heads, dim
    self.scale = qk_scale or head_dim ** -0.5
    if self.l_heads > 0:
        if self.ws != 1:
            self.sr = nn.AvgPool2d(kernel_size=window_size, stride=window_size)
        self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
        self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
        self.l_proj = nn.Linear(self.l_dim, self.l_dim)
    if self.h_heads > 0:
        self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
        self.h_proj = nn.Linear(self.h_dim, self.h_dim)


def _hilo_map(m, xm):
    """HiLo on a (B, H, W, C) map with H, W multiples of the window: [Hi-Fi | Lo-Fi] channels."""
    B, H, W, C = xm.shape
    s, outs = m.ws, []
    if m.h_heads:
        d = m.h_dim // m.h_heads
        win = xm.view(B, H // s, s, W // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, s * s, C)
        qkv = m.h_qkv(win).view(B, win.shape[1], s * s, 3, m.h_heads, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)
        o = torch.softmax(torch.einsum("bwhid,bwhjd->bwhij", q, k) * m.scale, -1) @ v
        o = o.permute(0, 1, 3, 2, 4).reshape(B, H // s, W // s, s, s, m.h_dim)
        outs.append(m.h_proj(o.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, m.h_dim)))
    if m.l_heads:
        d = m.l_dim // m.l_heads
        q = m.l_q(xm).view(B, H * W, m.l_heads, d).transpose(1, 2)
        src = m.sr(xm.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2) if s > 1 \
            else xm.reshape(B, H * W, C)
        k, v = m.l_kv(src).view(B, -1, 2, m.l_heads, d).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.transpose(-1, -2) * m.scale, -1) @ v
        outs.append(m.l_proj(o.transpose(1, 2).reshape(B, H, W, m.l_dim)))
    return torch.cat(outs, -1)


class LITv2Cls:
    """classification/models: HiLo.forward(x) on a square map, Block.forward(x)."""

    class HiLo(nn.Module):
        __init__ = _hilo_init

        def forward(self, x):
            B, N, C = x.shape
            H = W = int(N ** 0.5)
            return _hilo_map(self, x.view(B, H, W, C)).reshape(B, N, C)

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, local_ws, alpha):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = LITv2Cls.HiLo(dim, num_heads=num_heads, qkv_bias=True,
                                      window_size=local_ws, alpha=alpha)
            self.drop_path = nn.Identity()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = LITv2Cls.Mlp(dim, 2 * dim)

        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

    class ConvFFNBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = LITv2Cls.Mlp(dim, 2 * dim)

        def forward(self, x):
            return x + self.mlp(self.norm2(x))

    class LITLayer(nn.Module):
        def __init__(self, dim, depth, num_heads, has_msa, local_ws, alpha, out_dim=None):
            super().__init__()
            self.blocks = nn.ModuleList([
                LITv2Cls.Block(dim, num_heads, local_ws, alpha) if has_msa
                else LITv2Cls.ConvFFNBlock(dim) for _ in range(depth)])
            self.downsample = nn.Conv2d(dim, out_dim, 2, 2) if out_dim else None

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            if self.downsample is None:
                return x
            B, N, C = x.shape
            H = int(N ** 0.5)
            return self.downsample(x.transpose(1, 2).reshape(B, C, H, H)).flatten(2).transpose(1, 2)

    class LITv2(nn.Module):
        """4 stages, has_msa [0, 0, 1, 1], local_ws [0, 0, 2, 1], alpha 0.9 (LITv2's configs)."""

        def __init__(self, dims=(16, 16, 32, 32), heads=(1, 1, 2, 2), num_classes=10):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dims[0], 2, 2)
            ws, msa = (0, 0, 2, 1), (0, 0, 1, 1)
            self.layers = nn.ModuleList([
                LITv2Cls.LITLayer(dims[i], 1, heads[i], msa[i], ws[i], 0.9,
                                  dims[i + 1] if i < 3 else None)  # halve the map
                for i in range(4)])
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.norm(x).mean(1))


class LITv2Det:
    """detection / segmentation backbones: HiLo.forward(x, H, W) zero-pads to the window;
    Block.forward(x) reads self.H / self.W, set by LITLayer.forward(x, H, W)."""

    class HiLo(nn.Module):
        __init__ = _hilo_init

        def forward(self, x, H, W):
            B, N, C = x.shape
            pad_r, pad_b = (self.ws - W % self.ws) % self.ws, (self.ws - H % self.ws) % self.ws
            xm = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
            return _hilo_map(self, xm)[:, :H, :W].reshape(B, N, C)

    class Block(nn.Module):
        def __init__(self, dim, num_heads, local_ws, alpha):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = LITv2Det.HiLo(dim, num_heads=num_heads, qkv_bias=True,
                                      window_size=local_ws, alpha=alpha)
            self.drop_path = nn.Identity()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = LITv2Cls.Mlp(dim, 2 * dim)

        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x), self.H, self.W))
            return x + self.drop_path(self.mlp(self.norm2(x)))

    class LITLayer(nn.Module):
        def __init__(self, dim, depth, num_heads, local_ws, alpha):
            super().__init__()
            self.blocks = nn.ModuleList([LITv2Det.Block(dim, num_heads, local_ws, alpha)
                                         for _ in range(depth)])

        def forward(self, x, H, W):
            for blk in self.blocks:
                blk.H, blk.W = H, W
                x = blk(x)
            return x, H, W

    class LITv2(nn.Module):
        """Backbone on a map that is not a multiple of the window (mmdet inputs)."""

        def __init__(self, dim=32, ws=(2, 4, 1), alphas=(0.5, 1.0, 0.5)):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, 2, 2)
            self.layers = nn.ModuleList([LITv2Det.LITLayer(dim, 1, 2, s, a)
                                         for s, a in zip(ws, alphas)])

        def forward(self, x):
            x = self.patch_embed(x)
            H, W = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
            outs = []
            for layer in self.layers:
                x, H, W = layer(x, H, W)
                outs.append(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))
            return outs


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_litv2_classification_patched(backend):
    torch.manual_seed(0)
    model = _init(LITv2Cls.LITv2())
    x = torch.randn(2, 3, 32, 32)  # stage 3 map 4x4 (ws 2), stage 4 2x2 (ws 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before patching
    report = _check_patched(model, x, expect=("layers.2.blocks.0.attn", "layers.3.blocks.0.attn"),
                            backend=backend)
    attn = model.layers[2].blocks[0].attn
    assert isinstance(attn, VkHiLo) and attn.pad is None and attn.backend == backend
    assert (attn.l_heads, attn.h_heads) == (1, 1)  # int(2 * 0.9) = 1 Lo-Fi head, as LITv2
    assert not hasattr(attn, "sr")  # LITv2's parameterless pooling module: pooled in-op
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    # only the two HiLo modules: LITv2's Block / ConvFFNBlock / Mlp are not reported
    assert len(report.replaced) == 2 and "HiLo" in report.replaced[0][1]


def test_litv2_detection_padded_patched():
    torch.manual_seed(1)
    model = _init(LITv2Det.LITv2())
    x = torch.randn(2, 3, 10, 14)  # 5x7 map: not a multiple of 2 or 4, zero padding
    _check_patched(model, x, expect=[f"layers.{i}.blocks.0.attn" for i in range(3)])
    attns = [model.layers[i].blocks[0].attn for i in range(3)]
    assert [a.pad for a in attns] == ["zero"] * 3
    assert [(a.l_heads, a.h_heads) for a in attns] == [(1, 1), (2, 0), (2, 0)]


def test_litv2_detection_triton():
    torch.manual_seed(2)
    model = _init(LITv2Det.LITv2(ws=(2,), alphas=(0.5,)))
    _check_patched(model, torch.randn(1, 3, 6, 10), backend="triton")


def test_hilo_square_map_default_and_flops():
    hilo = VkHiLo(32, 2, qkv_bias=True, window_size=2, alpha=0.5)
    x = torch.randn(1, 16, 32)
    torch.testing.assert_close(hilo(x), hilo(x, 4, 4))
    assert hilo.flops(16) == hilo.flops(4, 4)  # LITv2's blocks call attn.flops(N)
    with pytest.raises(ValueError, match="perfect square"):
        hilo(torch.randn(1, 12, 32))
    with pytest.raises(ValueError, match="both H and W"):
        hilo(x, 4)


def test_litv2_patched_classification_hilo_refuses_non_square():
    model = _init(LITv2Cls.LITv2())
    patch_model(model)
    with pytest.raises(ValueError, match="perfect square"):
        model.layers[2].blocks[0].attn(torch.randn(1, 12, 32))


def test_hilo_layout_mismatch_is_left_with_reason():
    class HiLo(nn.Module):  # LITv2's name, but l_proj without bias and an extra parameter
        __init__ = _hilo_init

        def forward(self, x):
            return x

    bad = HiLo(32, 2, qkv_bias=True, window_size=2, alpha=0.5)
    bad.l_proj = nn.Linear(16, 16, bias=False)
    model = nn.Sequential(bad)
    report = patch_model(model)
    assert not report.replaced and len(report.left) == 1
    name, path, why = report.left[0]
    assert name == "0" and path.endswith("HiLo") and "l_proj has no bias" in why
    assert type(model[0]) is HiLo  # untouched

    class HiLo(nn.Module):  # LITv2's layout, a call LITv2 never makes
        __init__ = _hilo_init

        def forward(self, x, size):
            return x

    why = patch_model(nn.Sequential(HiLo(32, 2, window_size=2, alpha=0.5))).left[0][2]
    assert "forward takes ['x', 'size']" in why


# ============================================================================================
# PPMA (zhongchenzhao/PPMA): MambaAttentionAllDouble / MambaAttentionChunkDouble
# ============================================================================================


def _rope(z, sin, cos):  # interleaved pairs (z0, z1) -> (-z1, z0), positions in raster order
    rot = torch.stack([-z[..., 1::2], z[..., ::2]], -1).flatten(-2)
    return z * cos + rot * sin


def _seg(z):
    """1-D log-mask: S[i, j] = sum of z over (min(i, j), max(i, j)]; (..., n) -> (..., n, n)."""
    c = z.cumsum(-1)
    diff = c[..., :, None] - c[..., None, :]
    return torch.where(diff <= 0, diff, -diff)  # z < 0: c is decreasing


class PPMA:
    class DWConv2d(nn.Module):
        def __init__(self, dim, kernel_size, stride, padding):
            super().__init__()
            self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim)

        def forward(self, x):  # (B, H, W, C)
            return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    class RotaryPositionEmbedding2D(nn.Module):
        def __init__(self, embed_dim, num_heads):
            super().__init__()
            angle = 1.0 / (10000 ** torch.linspace(0, 1, embed_dim // num_heads // 2))
            self.register_buffer("angle", angle.repeat_interleave(2))

        def forward(self, slen):
            pos = torch.arange(slen[0] * slen[1]).to(self.angle)[:, None] * self.angle
            return pos.sin().view(*slen, -1), pos.cos().view(*slen, -1)

    class PathEmbeding2D(nn.Module):
        def __init__(self, embed_dim, nheads, chunkwise_recurrent=False, bias=False):
            super().__init__()
            self.nheads, self.chunkwise_recurrent = nheads, chunkwise_recurrent
            self.dt_linear = nn.Linear(embed_dim // nheads, 2, bias=bias)
            dt = torch.exp(torch.rand(nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log = nn.Parameter(torch.empty(nheads).uniform_(1, 1.1).log())

        def forward(self, x):
            """(B, H, W, C) -> per-row (B, H, h, W, W) and per-column (B, W, h, H, H) log-masks,
            or the full (B, h, N, N) mask (L: row of the query, column of the key)."""
            B, H, W, C = x.shape
            u = self.dt_linear(x.view(B, H, W, self.nheads, C // self.nheads))
            A = -self.A_log.exp()
            a = F.softplus(u[..., 0] + self.dt_bias) * A  # (B, H, W, h)
            g = F.softplus(u[..., 1] + self.dt_bias) * A
            sw = _seg(a.permute(0, 1, 3, 2))  # (B, H, h, W, W)
            sh = _seg(g.permute(0, 2, 3, 1))  # (B, W, h, H, H)
            if self.chunkwise_recurrent:
                return sw, sh
            # logL[(r1, c1), (r2, c2)] = sw[r1][c1, c2] + sh[c2][r1, r2]
            full = sw.permute(0, 2, 1, 3, 4)[:, :, :, :, None, :] \
                + sh.permute(0, 2, 3, 4, 1)[:, :, :, None, :, :]
            return full.reshape(B, self.nheads, H * W, H * W)

    class _Attn(nn.Module):
        def __init__(self, embed_dim, num_heads, value_factor=1, chunk=False):
            super().__init__()
            self.factor = value_factor
            self.embed_dim, self.num_heads = embed_dim, num_heads
            self.head_dim = embed_dim * value_factor // num_heads
            self.key_dim = embed_dim // num_heads
            self.scaling = self.key_dim ** -0.5
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
            self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True)
            self.v_proj = nn.Linear(embed_dim, embed_dim * value_factor, bias=True)
            self.lepe = PPMA.DWConv2d(embed_dim, 5, 1, 2)
            self.out_proj = nn.Linear(embed_dim * value_factor, embed_dim, bias=True)
            self.path_embed = PPMA.PathEmbeding2D(embed_dim, num_heads, chunkwise_recurrent=chunk)

        def _qkv(self, x, rel_pos):
            B, H, W, C = x.shape
            sin, cos = rel_pos
            v = self.v_proj(x)
            heads = lambda t: t.view(B, H, W, self.num_heads, -1).permute(0, 3, 1, 2, 4)
            q = _rope(heads(self.q_proj(x)), sin, cos)
            k = _rope(heads(self.k_proj(x) * self.scaling), sin, cos)  # scale before RoPE
            return q, k, heads(v), self.lepe(v)

    class MambaAttentionAllDouble(_Attn):
        def forward(self, x, rel_pos):
            B, H, W, C = x.shape
            mask = self.path_embed(x)
            q, k, v, lepe = self._qkv(x, rel_pos)
            q, k, v = (t.flatten(2, 3) for t in (q, k, v))
            s = q @ k.transpose(-1, -2)
            p = 0.5 * torch.softmax(s + mask, -1) \
                + 0.5 * torch.softmax(s + mask.transpose(-1, -2), -1)
            o = (p @ v).transpose(1, 2).reshape(B, H, W, C)
            return self.out_proj(o + lepe)

    class MambaAttentionChunkDouble(_Attn):
        def __init__(self, embed_dim, num_heads, value_factor=1):
            super().__init__(embed_dim, num_heads, value_factor, chunk=True)

        def forward(self, x, rel_pos):
            B, H, W, C = x.shape
            q, k, v, lepe = self._qkv(x, rel_pos)  # (B, h, H, W, d)
            sw, sh = self.path_embed(x)
            aw = torch.softmax(torch.einsum("bhrid,bhrjd->bhrij", q, k) + sw.transpose(1, 2), -1)
            ah = torch.softmax(torch.einsum("bhicd,bhjcd->bhcij", q, k) + sh.transpose(1, 2), -1)
            row = lambda t: torch.einsum("bhrij,bhrjd->bhrid", aw, t)  # attend within rows
            col = lambda t: torch.einsum("bhcij,bhjcd->bhicd", ah, t)  # attend within columns
            o = 0.5 * col(row(v)) + 0.5 * row(col(v))
            return self.out_proj(o.permute(0, 2, 3, 1, 4).reshape(B, H, W, C) + lepe)

    class FeedForwardNetwork(nn.Module):
        def __init__(self, embed_dim, ffn_dim):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)
            self.dwconv = PPMA.DWConv2d(ffn_dim, 3, 1, 1)

        def forward(self, x):
            x = F.gelu(self.fc1(x))
            return self.fc2(x + self.dwconv(x))

    class BasicBlock(nn.Module):
        def __init__(self, retention, embed_dim, num_heads, ffn_dim, layerscale=False):
            super().__init__()
            self.layerscale = layerscale
            self.retention_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.retention = (PPMA.MambaAttentionChunkDouble if retention == "chunk"
                              else PPMA.MambaAttentionAllDouble)(embed_dim, num_heads)
            self.drop_path = nn.Identity()
            self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.ffn = PPMA.FeedForwardNetwork(embed_dim, ffn_dim)
            self.pos = PPMA.DWConv2d(embed_dim, 3, 1, 1)
            if layerscale:
                self.gamma_1 = nn.Parameter(torch.ones(1, 1, 1, embed_dim))
                self.gamma_2 = nn.Parameter(torch.ones(1, 1, 1, embed_dim))

        def forward(self, x, retention_rel_pos=None):
            x = x + self.pos(x)
            g1, g2 = (self.gamma_1, self.gamma_2) if self.layerscale else (1.0, 1.0)
            x = x + self.drop_path(g1 * self.retention(self.retention_layer_norm(x),
                                                       retention_rel_pos))
            return x + self.drop_path(g2 * self.ffn(self.final_layer_norm(x)))

    class BasicLayer(nn.Module):
        def __init__(self, embed_dim, out_dim, depth, num_heads, chunkwise_recurrent, layerscale):
            super().__init__()
            self.Relpos = PPMA.RotaryPositionEmbedding2D(embed_dim, num_heads)
            self.blocks = nn.ModuleList([
                PPMA.BasicBlock("chunk" if chunkwise_recurrent else "whole", embed_dim,
                                num_heads, 2 * embed_dim, layerscale) for _ in range(depth)])
            self.downsample = nn.Conv2d(embed_dim, out_dim, 3, 2, 1) if out_dim else None

        def forward(self, x):
            rel_pos = self.Relpos(x.shape[1:3])
            for blk in self.blocks:
                x = blk(x, retention_rel_pos=rel_pos)
            if self.downsample is not None:
                x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return x

    class PPMAViT(nn.Module):
        """chunkwise_recurrents [True, False]: criss-cross stage then a full stage (PPMA-T)."""

        def __init__(self, dims=(32, 32), heads=(2, 2), num_classes=10):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dims[0], 2, 2)
            self.layers = nn.ModuleList([
                PPMA.BasicLayer(dims[0], dims[1], 1, heads[0], True, False),
                PPMA.BasicLayer(dims[1], None, 1, heads[1], False, True)])
            self.head = nn.Linear(dims[-1], num_classes)

        def forward(self, x):
            x = self.patch_embed(x).permute(0, 2, 3, 1)
            for layer in self.layers:
                x = layer(x)
            return self.head(x.mean((1, 2)))


def _ppma_model(seed=3):
    torch.manual_seed(seed)
    return _init(PPMA.PPMAViT(), seed, std=0.2)


def test_ppma_vitkern_reference_matches_this_copy():
    """Sanity of the copy: vitkern's PolylinePathAttention loaded with a copy's weights agrees
    (so a patched-vs-unpatched match below is a match with PPMA's math, not with ourselves)."""
    torch.manual_seed(0)
    for cls, mode in ((PPMA.MambaAttentionAllDouble, "full"),
                      (PPMA.MambaAttentionChunkDouble, "criss_cross")):
        theirs = _init(cls(32, 2), std=0.2)
        ours = PolylinePathAttention(32, 2, mode=mode)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 5, 6, 32)
        rel = PPMA.RotaryPositionEmbedding2D(32, 2)((5, 6))
        _close(ours(x, rel), theirs(x, rel), name=mode)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_ppma_patched(backend):
    model = _ppma_model()
    x = torch.randn(2, 3, 12, 10)  # stage 1: 6x5 criss-cross; stage 2: 3x3 full
    # gradients through PPMA's Triton kernels are tested in test_ppma (slow under the interpreter)
    _check_patched(model, x, expect=("layers.0.blocks.0.retention", "layers.1.blocks.0.retention"),
                   backend=backend, grads=backend == "auto")
    modes = [model.layers[i].blocks[0].retention.mode for i in range(2)]
    assert modes == ["criss_cross", "full"]
    assert all(isinstance(model.layers[i].blocks[0].retention, PolylinePathAttention)
               for i in range(2))


def test_ppma_layout_mismatch_is_left_with_reason():
    model = _ppma_model()
    model.layers[1].blocks[0].retention = PPMA.MambaAttentionAllDouble(32, 2, value_factor=2)
    model.layers[0].blocks[0].retention.path_embed = PPMA.PathEmbeding2D(32, 2, True, bias=True)
    report = patch_model(model)
    left = {name: why for name, _, why in report.left}
    assert "value_factor=2" in left["layers.1.blocks.0.retention"]
    assert "dt_linear" in left["layers.0.blocks.0.retention"]
    assert not report.replaced


# ============================================================================================
# EViT (youweiliang/evit): Block(keep_rate, fuse_token) -> (x, n_tokens, idx)
# ============================================================================================


class EViT:
    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
                     keep_rate=1.):
            super().__init__()
            self.num_heads = num_heads
            self.scale = (dim // num_heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.attn_drop = nn.Dropout(attn_drop)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)
            self.keep_rate = keep_rate

        def forward(self, x, keep_rate=None, tokens=None):
            keep_rate = self.keep_rate if keep_rate is None else keep_rate
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            attn = self.attn_drop(torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1))
            out = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
            left = N - 1
            if (self.keep_rate < 1 and keep_rate < 1) or tokens is not None:
                left = tokens if tokens is not None else math.ceil(keep_rate * (N - 1))
                if left == N - 1:
                    return out, None, None, None, left
                cls_attn = attn[:, :, 0, 1:].mean(1)
                idx = cls_attn.topk(left, dim=1, largest=True, sorted=True).indices
                return out, idx[..., None].expand(-1, -1, C), idx, cls_attn, left
            return out, None, None, None, left

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
            self.drop = nn.Dropout(0.0)

        def forward(self, x):
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, keep_rate=0., fuse_token=False, attn_drop=0.):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = EViT.Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop,
                                       keep_rate=keep_rate)
            self.drop_path = nn.Identity()
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = EViT.Mlp(dim, 2 * dim)
            self.keep_rate, self.fuse_token = keep_rate, fuse_token

        def forward(self, x, keep_rate=None, tokens=None, get_idx=False):
            keep_rate = self.keep_rate if keep_rate is None else keep_rate
            B, N, C = x.shape
            a, index, idx, cls_attn, _ = self.attn(self.norm1(x), keep_rate, tokens)
            x = x + self.drop_path(a)
            if index is not None:
                img = x[:, 1:]
                kept = img.gather(1, index)
                parts = [x[:, :1], kept]
                if self.fuse_token:
                    dropped = torch.ones(B, N - 1, dtype=torch.bool).scatter(1, idx, False)
                    w = (cls_attn * dropped)[..., None]  # the dropped tokens' class attention
                    parts.append((img * w).sum(1, keepdim=True))
                x = torch.cat(parts, 1)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x, x.shape[1] - 1, (idx if get_idx and index is not None else None)

    class EViT(nn.Module):
        def __init__(self, embed_dim=32, depth=4, num_heads=2, keep_rate=(1, 0.7, 1, 0.5),
                     fuse_token=True, num_classes=10, attn_drop=0.):
            super().__init__()
            self.depth = depth
            self.keep_rate = keep_rate * depth if len(keep_rate) == 1 else keep_rate
            self.patch_embed = nn.Conv2d(3, embed_dim, 4, 4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 17, embed_dim))
            self.blocks = nn.ModuleList([
                EViT.Block(embed_dim, num_heads, self.keep_rate[i], fuse_token, attn_drop)
                for i in range(depth)])
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes)

        def forward(self, x, keep_rate=None, tokens=None, get_idx=False):
            if not isinstance(keep_rate, (tuple, list)):
                keep_rate = (keep_rate,) * self.depth
            if not isinstance(tokens, (tuple, list)):
                tokens = (tokens,) * self.depth
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            idxs, lefts = [], []
            for i, blk in enumerate(self.blocks):
                x, left, idx = blk(x, keep_rate[i], tokens[i], get_idx)
                lefts.append(left)
                if idx is not None:
                    idxs.append(idx)
            logits = self.head(self.norm(x)[:, 0])
            return (logits, idxs, lefts) if get_idx else logits


def _evit(seed=4, **kw):
    torch.manual_seed(seed)
    return _init(EViT.EViT(**kw), seed, std=0.3)


@pytest.mark.parametrize("keep_rate,fuse", [((1, 0.7, 1, 0.5), True), ((1, 0.7, 1, 0.5), False),
                                            ((1.0,), True)])
def test_evit_patched(keep_rate, fuse):
    model = _evit(keep_rate=keep_rate, fuse_token=fuse)
    x = torch.randn(2, 3, 16, 16)  # 16 image tokens + the class token
    report = _check_patched(model, x, expect=[f"blocks.{i}" for i in range(4)]
                            + [f"blocks.{i}.attn" for i in range(4)])
    assert all(isinstance(b, papers.EViTBlock) for b in model.blocks)
    dropping = [name for name, _ in report.tokens]
    assert dropping == (["blocks.1", "blocks.3"] if len(keep_rate) > 1 else [])


def test_evit_patched_get_idx_tokens_and_runtime_keep_rate():
    model = _evit()
    ref = copy.deepcopy(model)
    patch_model(model)
    x = torch.randn(2, 3, 16, 16)
    out, idxs, lefts = model(x, get_idx=True)
    out_ref, idxs_ref, lefts_ref = ref(x, get_idx=True)
    _close(out, out_ref)
    # ceil(0.7·16) = 12 kept + the fused token, then ceil(0.5·13) = 7 + 1
    assert lefts == lefts_ref == [16, 13, 13, 8]
    assert len(idxs) == 2 and all(torch.equal(a, b) for a, b in zip(idxs, idxs_ref))
    # an explicit count overrides the rate, even in a keep-all block (EViT's rule)
    tokens = (10, None, 4, None)
    _close(model(x, tokens=tokens), ref(x, tokens=tokens))
    _close(model(x, keep_rate=0.6), ref(x, keep_rate=0.6))
    with pytest.raises(ValueError, match="must keep between 1 and 16"):
        model(x, tokens=(0, None, None, None))
    # the standalone attention keeps EViT's return tuple
    attn, attn_ref = model.blocks[1].attn, ref.blocks[1].attn
    y = torch.randn(2, 17, 32)
    got, want = attn(y), attn_ref(y)
    assert got[4] == want[4] == 12
    _close(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
    _close(got[3], want[3], name="cls_attn")


def test_evit_triton():
    model = _evit()
    _check_patched(model, torch.randn(1, 3, 16, 16), backend="triton")


def test_evit_attention_dropout_trains_eagerly():
    model = _evit(attn_drop=0.5)
    ref = copy.deepcopy(model)
    patch_model(model)
    x = torch.randn(2, 3, 16, 16)
    _close(model(x), ref(x))  # eval: no dropout, fused
    model.train(), ref.train()
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    _close(out, ref(x))  # training: EViT's eager math, the same dropout draws


def test_evit_layout_mismatch_is_left_with_reason():
    model = _evit()
    model.blocks[2].attn.temperature = nn.Parameter(torch.ones(2))  # not EViT's layout
    report = patch_model(model)
    left = {name: why for name, _, why in report.left}
    assert "parameters the paper's layout lacks" in left["blocks.2"]
    assert "parameters the paper's layout lacks" in left["blocks.2.attn"]
    replaced = [name for name, _, _ in report.replaced]
    assert "blocks.2" not in replaced and "blocks.1" in replaced


def test_other_models_blocks_and_attention_are_not_claimed():
    """A "Block" without EViT's keep_rate is not reported; an "Attention" without it is left
    as before (no vitkern module), not refused as a broken EViT."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    report = patch_model(nn.Sequential(Block()))
    assert not report.replaced
    assert report.left == [("0.attn", f"{__name__}.{Attention.__qualname__}",
                            "no vitkern module for this class")]


def test_patching_twice_and_module_as_model():
    model = _evit()
    patch_model(model)
    again = patch_model(model)
    assert not again.replaced and not again.left
    hilo = LITv2Cls.HiLo(32, 2, window_size=2, alpha=0.5)
    report = patch_model(hilo)
    assert report.left and report.left[0][0] == "<model>" and "itself" in report.left[0][2]
