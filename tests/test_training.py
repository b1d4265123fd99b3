"""Training through PyTorch's own engine: DDP, FSDP2, activation checkpointing, autocast.

Two tiny timm models, each patched with :func:`vitkern.integrations.timm.patch_model`:

* ``swin``: a Swin whose maps (12×14, then 6×7) are not divisible by the 4×4 window, so the
  padded path (b_v folded into proj) and shifted windows both train;
* ``vit_drop``: a ViT with ``token_drop=0.7`` (EViT dropping in blocks 1-3); ``vit_keep`` the same
  with keep rate 1.0, which must equal unpatched timm; ``vit_merge`` ToMe merging (r = 8).

DDP and FSDP2 run 2 gloo processes on the CPU: this file run as a script is one rank (see
``_rank_main``). Each rank takes half the batch; the averaged gradients of two SGD steps must
equal one process's on the full batch (fp32). Token dropping is per image, so the halves keep the
same tokens as the full batch (the ViT's init keeps the CLS attention far from ties).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

from vitkern.integrations.timm import patch_model  # noqa: E402
from vitkern.ops.hilo import hilo_attention  # noqa: E402
from vitkern.ops.ppma import ppma_attention, ppma_criss_cross_attention  # noqa: E402
from vitkern.ops.token import token_attention  # noqa: E402
from vitkern.ops.window import window_attention  # noqa: E402

WORLD = 2
BATCH = 4
STEPS = 2
DIST_TIMEOUT_S = 240


# --------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------


def _swin() -> nn.Module:
    torch.manual_seed(0)
    # drop_path_rate=0: timm's Swin defaults to stochastic depth 0.1, which is random per call
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(24, 28),
                             patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                             window_size=4, num_classes=5, drop_path_rate=0.0)


def _vit() -> nn.Module:
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                          embed_dim=32, depth=4, num_heads=2, num_classes=5)
    with torch.no_grad():
        # a peaked CLS attention: on the test batch the last kept token's score stands >= 7e-4
        # (relative) above the first dropped one's, so the kept set never hinges on the fp32
        # rounding of another batch size (a rank's half batch)
        m.cls_token.normal_()
        m.pos_embed.normal_(std=0.5)
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4)
    return m


class _Fp32Norm(nn.LayerNorm):
    """LayerNorm in fp32, as CUDA autocast runs ``layer_norm`` (CPU autocast keeps bf16): under
    autocast on the CPU it gives q, k in fp32 next to a bf16 v, as a GPU does."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def _vit_qk_norm() -> nn.Module:
    m = _vit()
    for blk in m.blocks:
        blk.attn.q_norm = _Fp32Norm(blk.attn.head_dim)
        blk.attn.k_norm = _Fp32Norm(blk.attn.head_dim)
    return m


#: name -> (builder, patch_model keyword arguments, image size)
MODELS = {
    "swin": (_swin, {}, (24, 28)),
    "vit_drop": (_vit, dict(token_drop=0.7), (32, 32)),
    "vit_keep": (_vit, dict(token_drop=1.0), (32, 32)),
    "vit_merge": (_vit, dict(token_merge=8), (32, 32)),
    "vit_qk_norm": (_vit_qk_norm, dict(token_drop=1.0), (32, 32)),
}


def build(name: str, *, patched: bool = True, backend: str = "auto") -> nn.Module:
    make, kw, _ = MODELS[name]
    model = make()
    if patched:
        report = patch_model(model, backend=backend, **kw)
        assert report.replaced, f"{name}: patch_model replaced nothing\n{report}"
    return model


def batch(name: str, n: int = BATCH):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, *MODELS[name][2], generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


def _blocks(model: nn.Module) -> list[nn.Sequential]:
    """The nn.Sequential(s) of transformer blocks (Swin: one per stage)."""
    if hasattr(model, "layers"):
        return [stage.blocks for stage in model.layers]
    return [model.blocks]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t`` (an FSDP2 DTensor gradient is gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_steps(model: nn.Module, x, y, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """``steps`` SGD steps on the mean cross-entropy; the gradients of every step by the
    parameter's name in the unwrapped model."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append({n.removeprefix("module."): _full(p.grad).detach().clone()
                    for n, p in model.named_parameters()})
        opt.step()
    return out


def assert_grads_equal(got: dict, want: dict, what: str, rtol: float = 1e-5) -> None:
    """Every gradient within ``rtol`` of its own largest entry (for a parameter whose gradient
    is ~0, of 1e-3 × the model's largest gradient entry instead)."""
    assert got.keys() == want.keys(), f"{what}: parameter names differ"
    top = max(g.abs().max().item() for g in want.values())
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite gradients"
        err = (g - w).abs().max().item()
        bound = rtol * max(w.abs().max().item(), 1e-3 * top)
        assert err <= bound, f"{what}: grad of {name} off by {err:.3g} > {bound:.3g}"


# --------------------------------------------------------------------------------------------
# DDP / FSDP2: this file as a script is one rank
# --------------------------------------------------------------------------------------------

DIST_MODELS = ("swin", "vit_drop")


def _fsdp_shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for seq in _blocks(model):
        for blk in seq:
            fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _rank_main(rank: int, world: int, workdir: str) -> None:
    """One rank: DDP, then FSDP2, on each model; rank 0 saves every step's gradients."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                            world_size=world)
    results: dict = {}
    mesh, fsdp_skip = None, None
    if hasattr(fsdp, "fully_shard"):  # FSDP2, torch >= 2.6
        mesh = init_device_mesh("cpu", (world,))
    else:
        fsdp_skip = f"FSDP2 fully_shard is not in torch {torch.__version__}"
    for name in DIST_MODELS:
        x, y = batch(name)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for ckpt in (False, True):  # timm's own activation checkpointing switch
            tag = "_ckpt" if ckpt else ""
            model = build(name)
            model.set_grad_checkpointing(ckpt)
            results[("ddp" + tag, name)] = train_steps(DDP(model), x[part], y[part])
            if fsdp_skip is None:
                model = build(name)
                model.set_grad_checkpointing(ckpt)
                _fsdp_shard(model, mesh)
                results[("fsdp" + tag, name)] = train_steps(model, x[part], y[part])
            else:
                results[("fsdp" + tag, name)] = fsdp_skip
    dist.barrier()
    if rank == 0:
        torch.save(results, Path(workdir) / "grads.pt")
    dist.destroy_process_group()


def _run_ranks(workdir: Path) -> dict:
    """Start ``WORLD`` ranks of this file; a failed or hung rank fails the test with its log."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no network needed
    logs = [workdir / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    for r in range(WORLD):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, str(r), str(WORLD),
                                           str(workdir)], stdout=log, stderr=subprocess.STDOUT,
                                          env=env))

    def tails() -> str:
        return "\n".join(f"--- rank {r} (exit {p.poll()}) ---\n"
                         + logs[r].read_text()[-4000:] for r, p in enumerate(procs))

    deadline = time.monotonic() + DIST_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other would hang
                break
            if time.monotonic() > deadline:
                pytest.fail(f"distributed ranks still running after {DIST_TIMEOUT_S}s\n{tails()}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a distributed rank failed\n{tails()}")
    return torch.load(workdir / "grads.pt")


@pytest.fixture(scope="module")
def dist_grads(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    return _run_ranks(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def one_process_grads():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = train_steps(build(name), *batch(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", DIST_MODELS)
@pytest.mark.parametrize("mode", ["ddp", "ddp_ckpt", "fsdp", "fsdp_ckpt"])
def test_distributed_grads_equal_one_process(dist_grads, one_process_grads, mode, name):
    """DDP (gloo, 2 CPU ranks) and FSDP2 ``fully_shard`` per block, each also with timm's
    activation checkpointing: two steps' averaged gradients of half batches equal one
    process's on the full batch."""
    got = dist_grads[(mode, name)]
    if isinstance(got, str):
        pytest.skip(got)
    want = one_process_grads(name)
    for step, (g, w) in enumerate(zip(got, want)):
        assert_grads_equal(g, w, f"{mode} {name} step {step}")


# --------------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------------


class _Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint.checkpoint``."""

    def __init__(self, block: nn.Module, use_reentrant: bool):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def _logits_and_grads(model: nn.Module, name: str, autocast=None):
    """Logits (fp32) and parameter gradients (in ``named_parameters`` order of the model as
    built, before any wrapping) of the cross-entropy on one batch."""
    params = list(model.named_parameters())
    x, y = batch(name)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return out.detach().float(), {n: p.grad.detach().clone() for n, p in params}


#: model -> the model it must equal: unpatched timm, or for real dropping the patched model
#: without checkpointing
_BASELINE = {"swin": False, "vit_keep": False, "vit_drop": True}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", ["swin", "vit_drop", "vit_keep"])
def test_checkpoint_equals_unpatched(name, use_reentrant):
    """``torch.utils.checkpoint`` around every patched block: logits and gradients equal the
    model without checkpointing (unpatched timm where it computes the same thing)."""
    want_out, want = _logits_and_grads(build(name, patched=_BASELINE[name]), name)
    model = build(name)
    params = list(model.named_parameters())
    for seq in _blocks(model):
        for i in range(len(seq)):
            seq[i] = _Checkpointed(seq[i], use_reentrant)
    out, _ = _logits_and_grads(model, name)
    got = {n: p.grad for n, p in params}
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_grads_equal(got, want, f"checkpoint(use_reentrant={use_reentrant}) {name}")


@pytest.mark.parametrize("name", ["swin", "vit_drop"])
def test_timm_grad_checkpointing_equals_plain(name):
    """timm's own switch, ``model.set_grad_checkpointing()``, on a patched model."""
    want_out, want = _logits_and_grads(build(name), name)
    model = build(name)
    model.set_grad_checkpointing(True)
    out, got = _logits_and_grads(model, name)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_grads_equal(got, want, f"timm grad checkpointing {name}")


@pytest.mark.parametrize("timm_switch", [False, True])
def test_checkpoint_token_merge(timm_switch):
    """ToMe merging (token_merge) under activation checkpointing equals the plain run."""
    want_out, want = _logits_and_grads(build("vit_merge"), "vit_merge")
    model = build("vit_merge")
    params = list(model.named_parameters())
    if timm_switch:
        model.set_grad_checkpointing(True)
    else:
        for seq in _blocks(model):
            for i in range(len(seq)):
                seq[i] = _Checkpointed(seq[i], False)
    out, _ = _logits_and_grads(model, "vit_merge")
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_grads_equal({n: p.grad for n, p in params}, want, "checkpoint token_merge")


def _one_block(name: str, patched: bool = True, backend: str = "auto") -> nn.Module:
    """One block (the Triton interpreter is slow): the Swin's shifted block on its padded 12×14
    map, or the ViT's first token block (keep rate 1.0, so timm's block is the baseline)."""
    model = build(name, patched=patched, backend=backend)
    return model.layers[0].blocks[1] if name == "swin" else model.blocks[1]


#: block input shapes of _one_block
_BLOCK_INPUT = {"swin": (1, 12, 14, 16), "vit_keep": (1, 65, 32)}


def _block_out_and_grads(name: str, blk: nn.Module, autocast=None, checkpointed: bool = False):
    """A block's output (fp32) and parameter gradients for a fixed input and output weight."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(_BLOCK_INPUT[name], generator=g)
    w = torch.randn(_BLOCK_INPUT[name], generator=g)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = (torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if checkpointed
               else blk(x))
    (out.float() * w).sum().backward()
    return out.detach().float(), {n: p.grad.detach().clone() for n, p in blk.named_parameters()}


@pytest.mark.parametrize("name", ["swin", "vit_drop"])
def test_checkpoint_under_autocast(name):
    """Checkpointing inside bf16 autocast (the recomputation replays the forward's autocast
    state): logits and gradients equal the same autocast run without checkpointing."""
    want_out, want = _logits_and_grads(build(name), name, autocast=torch.bfloat16)
    model = build(name)
    model.set_grad_checkpointing(True)
    out, got = _logits_and_grads(model, name, autocast=torch.bfloat16)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert_grads_equal(got, want, f"checkpoint under autocast {name}")


def test_checkpoint_triton_backend():
    """The Triton custom ops (CPU interpreter) under non-reentrant checkpointing: the custom
    autograd's saved tensors are recomputed and the gradients equal the plain run."""
    want_out, want = _block_out_and_grads("swin", _one_block("swin", backend="triton"))
    out, got = _block_out_and_grads("swin", _one_block("swin", backend="triton"),
                                    checkpointed=True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_grads_equal(got, want, "checkpoint triton swin block")


# --------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _assert_lowp_close(what: str, dtype, ref, base, got, factor: float = 3.0):
    """``ref``: timm in fp32; ``base``: timm under autocast to ``dtype``; ``got``: vitkern under
    the same autocast; each an (output, {param: grad}) pair. vitkern's error against fp32 is at
    most ``factor`` × timm's own (+ a dtype-eps floor), for the output and every parameter's
    gradient (in the parameter's dtype), and everything is finite."""
    (ref_out, ref), (base_out, base), (out, got) = ref, base, got
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(out).all(), f"{what}: non-finite output under {dtype} autocast"
    bound = factor * _err(base_out, ref_out) + eps * ref_out.abs().max().item()
    assert _err(out, ref_out) <= bound, (f"{what}: output under {dtype} autocast off by "
                                         f"{_err(out, ref_out):.3g} > {bound:.3g}")
    for p, r in ref.items():
        assert got[p].dtype == r.dtype, f"{what}: grad of {p} is {got[p].dtype}, not {r.dtype}"
        assert torch.isfinite(got[p]).all(), f"{what}: non-finite grad of {p}"
        bound = factor * _err(base[p], r) + eps * r.abs().max().item()
        assert _err(got[p], r) <= bound, (f"{what}: grad of {p} under {dtype} autocast off by "
                                          f"{_err(got[p], r):.3g} > {bound:.3g}")


@pytest.mark.parametrize("name", ["swin", "vit_keep", "vit_qk_norm"])
def test_autocast_bf16_matches_unpatched(name):
    """bf16 autocast on the CPU: the patched model is as close to fp32 as timm's own.
    ``vit_qk_norm``: q, k leave an fp32 norm next to a bf16 v (a GPU's autocast), which SDPA
    casts and vitkern's op refused before it applied SDPA's rule."""
    bf16 = torch.bfloat16
    _assert_lowp_close(name, bf16, _logits_and_grads(build(name, patched=False), name),
                       _logits_and_grads(build(name, patched=False), name, autocast=bf16),
                       _logits_and_grads(build(name), name, autocast=bf16))


def test_autocast_bf16_token_drop():
    """A dropping ViT under bf16 autocast: finite, fp32 parameter gradients, and logits and
    gradients near the fp32 run of the same patched model (bf16 tolerance)."""
    name = "vit_drop"
    ref_out, ref = _logits_and_grads(build(name), name)
    out, got = _logits_and_grads(build(name), name, autocast=torch.bfloat16)
    assert torch.isfinite(out).all()
    assert _err(out, ref_out) <= 0.05 * ref_out.abs().max().item()
    top = max(g.abs().max().item() for g in ref.values())
    for p, r in ref.items():
        assert got[p].dtype == torch.float32 and torch.isfinite(got[p]).all(), p
        assert _err(got[p], r) <= 0.1 * top, f"grad of {p} far from fp32 under bf16 autocast"


@pytest.mark.parametrize("name", ["swin", "vit_keep"])
def test_autocast_fp16_triton_backend(name):
    """The Triton kernels (CPU interpreter, fp16: its bf16 tl.dot is wrong) under fp16 autocast
    in one patched block: as close to fp32 as timm's own block under the same autocast."""
    fp16 = torch.float16
    _assert_lowp_close(f"{name} block, triton", fp16,
                       _block_out_and_grads(name, _one_block(name, patched=False)),
                       _block_out_and_grads(name, _one_block(name, patched=False), fp16),
                       _block_out_and_grads(name, _one_block(name, backend="triton"), fp16))


_CUDA_LOWP = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", _CUDA_LOWP)
@pytest.mark.parametrize("name", ["swin", "vit_keep", "vit_qk_norm"])
def test_autocast_cuda_matches_unpatched(name, dtype):
    """fp16 / bf16 autocast on a GPU (the triton backend): patched as close to fp32 as timm."""
    def run(patched, lowp):
        model = build(name, patched=patched).cuda()
        x, y = (t.cuda() for t in batch(name))
        ctx = torch.autocast("cuda", dtype=dtype) if lowp else contextlib.nullcontext()
        with ctx:
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        return out.float().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}

    _assert_lowp_close(f"{name} on {torch.cuda.get_device_name()}", dtype, run(False, False),
                       run(False, True), run(True, True))


# op level: custom ops are invisible to autocast, so the public ops apply SDPA's rule


def _qkv_mixed(B=2, h=2, H=4, W=6, d=8):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, H * W, d, generator=g) for _ in range(3))
    return q.requires_grad_(), k.requires_grad_(), v.bfloat16().requires_grad_()


def _window(q, k, v, **kw):
    return window_attention(q, k, v, hw=(4, 6), window_size=2, shift=1, **kw)


@pytest.mark.parametrize("op", ["window", "token", "hilo", "ppma", "ppma_criss_cross"])
def test_op_autocast_casts_like_sdpa(op):
    """Under autocast a mixed fp32 / bf16 q, k, v (q, k after an fp32 norm on a GPU) runs in bf16
    as SDPA does, with the output in bf16 and each input's gradient in its own dtype; an fp32
    bias table keeps fp32 and gets an fp32 gradient. (Before: 'q, k, v must share a dtype'.)"""
    q, k, v = _qkv_mixed()
    table = None
    if op == "window":
        table = torch.randn(9, 2, generator=torch.Generator().manual_seed(4)).requires_grad_()
        fn = lambda q, k, v: _window(q, k, v, rel_pos_bias=table)  # noqa: E731
    elif op == "token":
        fn = lambda q, k, v: token_attention(q, k, v)  # noqa: E731
    elif op == "hilo":
        fn = lambda q, k, v: hilo_attention(q, k, v, hw=(4, 6), window_size=2,  # noqa: E731
                                            num_lo_heads=1)
    else:  # the fp32 log-decays play the bias table's part
        table = -torch.rand(2, 2, 24, generator=torch.Generator().manual_seed(4))
        table.requires_grad_()
        ppma = ppma_attention if op == "ppma" else ppma_criss_cross_attention
        fn = lambda q, k, v: ppma(q, k, v, table, table * 0.5, hw=(4, 6))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16  # the rule
        o = fn(q, k, v)
    assert o.dtype == torch.bfloat16
    want = fn(q.detach().bfloat16(), k.detach().bfloat16(), v.detach())
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    o.float().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32,
                                                          torch.bfloat16)
    if table is not None:
        assert table.grad.dtype == torch.float32 and torch.isfinite(table.grad).all()


def test_op_autocast_leaves_fp64_and_out_alone():
    """fp64 is not autocast-eligible (as in PyTorch), nor is a call with ``out=``."""
    q, k, v = (t.detach().double() for t in _qkv_mixed())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert token_attention(q, k, v).dtype == torch.float64
        q32, k32, v32 = q.float(), k.float(), v.float()
        out = torch.zeros_like(q32)
        assert _window(q32, k32, v32, out=out) is out
    torch.testing.assert_close(out, _window(q32, k32, v32))


@pytest.mark.parametrize("name", ["swin", "vit_drop"])
def test_compile_under_autocast_no_graph_break(name, monkeypatch):
    """torch.compile(fullgraph=True) of a patched model under bf16 autocast equals eager
    (aot_eager: the graph capture and autograd tracing, without Inductor's codegen time).

    Inside torch.compile CPU window attention traces its reference (the eager module plans its
    gathers from index values); both sides run it here so that they compare bit for bit (the
    eager module against the reference: tests/test_eager_window.py)."""
    if name == "swin":
        monkeypatch.setenv("VITKERN_BACKEND", "reference")
    model = build(name).eval()
    x, _ = batch(name, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


if __name__ == "__main__":  # one distributed rank: python test_training.py RANK WORLD WORKDIR
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
