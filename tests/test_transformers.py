"""``vitkern.integrations.transformers.patch_model``: Swin / Swin V2 window attention and ViT /
DINOv2 token dropping on transformers models, against the unpatched models.

Tiny randomly initialised configs (no downloads). transformers initialises some parameters to
zeros or constants (Swin's bias table, layer scales): :func:`_randomised` perturbs every
parameter so that a wrong index, sign or fold cannot hide behind a zero.
"""
import copy
import math
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vitkern.integrations import transformers as vk_hf  # noqa: E402
from vitkern.integrations.timm import PatchReport  # noqa: E402

TOL = 1e-5  # fp32, relative to the largest magnitude (flash-attention's rule: tight in fp32)

#: token_drop drives transformers 5's ViT / DINOv2 layers (Swin: transformers 4 and 5)
token_layout = pytest.mark.skipif(
    vk_hf._layout("TokenDropViTLayer", transformers.models.vit.modeling_vit.ViTLayer) is None,
    reason=f"token_drop supports transformers 5's ViT layers, not {transformers.__version__}'s")


def _randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _close(out, ref, name, tol=TOL):
    assert out.shape == ref.shape, f"{name}: {tuple(out.shape)} vs {tuple(ref.shape)}"
    err = (out.double() - ref.double()).abs().max().item()
    bound = tol * max(ref.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _swin_config(v2=False, window=3, **kw):
    cls = transformers.Swinv2Config if v2 else transformers.SwinConfig
    return cls(**{**dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2),
                         num_heads=(2, 4), window_size=window, num_labels=5,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         drop_path_rate=0.0), **kw})


def _swin_pair(v2=False, window=3, head=True, backend="reference", **kw):
    """(unpatched, patched copy, report)."""
    mod = transformers
    if head:
        cls = mod.Swinv2ForImageClassification if v2 else mod.SwinForImageClassification
    else:
        cls = mod.Swinv2Model if v2 else mod.SwinModel
    torch.manual_seed(0)
    ref = _randomised(cls(_swin_config(v2, window, **kw))).eval()
    model = copy.deepcopy(ref)
    return ref, model, vk_hf.patch_model(model, backend=backend)


def _images(hw, batch=2, seed=1):
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Swin / Swin V2
# --------------------------------------------------------------------------------------------


# 32×32 images -> 8×8 then 4×4 maps. window 3 (odd, shift 1): 8×8 pads to 9×9 and shifts;
# 4×4 pads and shifts. window 4 (shift 2): divisible 8×8; on the 4×4 stage Swin V1 clamps to a
# global window without shift. 40×24 -> 10×6 / 5×3 and 36×44 -> 9×11 / 5×6: non-square,
# non-divisible maps (transformers pads, then rolls); V1 clamps 5×3 to window 3, no shift.
# 48×40 -> 12×10 / 6×5. (transformers' Swin V1 cannot clamp window 4 to a 5×3 map: its bias
# table no longer fits; see test_swin_unservable_window_fails_like_transformers.)
SIZES = {3: [(32, 32), (36, 44), (40, 24)], 4: [(32, 32), (36, 44), (48, 40)]}


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
@pytest.mark.parametrize("window", [3, 4])
def test_swin_outputs_equal(v2, window):
    ref, model, report = _swin_pair(v2, window)
    assert len(report.replaced) == 4 and report.left == []
    for hw in SIZES[window]:
        x = _images(hw)
        with torch.no_grad():
            a = ref(x, output_hidden_states=True)
            b = model(x, output_hidden_states=True)
        _close(b.logits, a.logits, f"logits {hw}")
        for i, (h, g) in enumerate(zip(b.hidden_states, a.hidden_states)):
            _close(h, g, f"hidden_states[{i}] {hw}")
        for i, (h, g) in enumerate(zip(b.reshaped_hidden_states, a.reshaped_hidden_states)):
            _close(h, g, f"reshaped_hidden_states[{i}] {hw}")


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
def test_swin_base_model_pooler_and_interpolated_positions(v2):
    # transformers' Swinv2Embeddings.interpolate_pos_encoding assumes a class token (it drops
    # one position), so absolute position embeddings are interpolated for V1 only
    ref, model, _ = _swin_pair(v2, 3, head=False, use_absolute_embeddings=not v2)
    for hw, interp in (((32, 32), False), ((40, 48), True)):
        x = _images(hw)
        with torch.no_grad():
            try:
                a = ref(x, interpolate_pos_encoding=interp)
            except RuntimeError:  # transformers 4's Swin sizes its absolute embeddings
                # for a class token it does not have: its own forward fails
                assert not transformers.__version__.startswith("5.")
                continue
            b = model(x, interpolate_pos_encoding=interp)
        _close(b.last_hidden_state, a.last_hidden_state, f"last_hidden_state {hw}")
        _close(b.pooler_output, a.pooler_output, f"pooler_output {hw}")


def test_swin_backbone_always_partition():
    """SwinBackbone runs its layers with always_partition=True (no window clamp: the 4×4 map of
    the last stage is padded to window 3's 6×6 and shifted) and returns per-stage maps."""
    torch.manual_seed(0)
    cfg = _swin_config(out_features=["stage1", "stage2"])
    ref = _randomised(transformers.SwinBackbone(cfg)).eval()
    model = copy.deepcopy(ref)
    assert len(vk_hf.patch_model(model, backend="reference").replaced) == 4
    x = _images((32, 32))
    with torch.no_grad():
        a, b = ref(x).feature_maps, model(x).feature_maps
    assert len(a) == len(b) == 2
    for i, (p, q) in enumerate(zip(b, a)):
        _close(p, q, f"feature_maps[{i}]")


def test_swin_unservable_window_fails_like_transformers():
    """A 5×3 map under window 4: transformers clamps the window to 3 and its 4×4 bias no longer
    fits, so its own path fails; the patched layer hands the call to it (the same error)."""
    ref, model, _ = _swin_pair(False, 4)
    x = _images((40, 24))
    with pytest.raises(RuntimeError) as a:
        ref(x)
    with pytest.raises(RuntimeError) as b:
        model(x)
    assert str(a.value) == str(b.value)


def _grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x).logits
    out.pow(2).sum().backward()
    named = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return out.detach(), x.grad, named


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
def test_swin_gradients_equal(v2):
    ref, model, _ = _swin_pair(v2, 3)
    ref.train(), model.train()  # dropout and drop path are 0: training mode is deterministic
    x = _images((36, 44))  # padded and shifted in both stages
    out_a, dx_a, ga = _grads(ref, x)
    out_b, dx_b, gb = _grads(model, x)
    _close(out_b, out_a, "logits")
    _close(dx_b, dx_a, "d pixel_values")
    assert list(ga) == list(gb)
    for name in ga:
        _close(gb[name], ga[name], f"d {name}", tol=1e-4)


def test_state_dict_and_parameters_unchanged():
    torch.manual_seed(0)
    for cls, cfg in ((transformers.SwinForImageClassification, _swin_config()),
                     (transformers.Swinv2ForImageClassification, _swin_config(v2=True))):
        model = cls(cfg)
        params = list(model.named_parameters())
        buffers = list(model.named_buffers())
        keys = list(model.state_dict())
        vk_hf.patch_model(model)
        after = list(model.named_parameters())
        assert [n for n, _ in after] == [n for n, _ in params]
        assert all(p is q for (_, p), (_, q) in zip(after, params))  # no copies
        assert [(n, b.data_ptr()) for n, b in model.named_buffers()] == [
            (n, b.data_ptr()) for n, b in buffers]
        assert list(model.state_dict()) == keys
        # loads the unpatched model's checkpoint unchanged
        model.load_state_dict(cls(cfg).state_dict())


@token_layout
def test_token_drop_state_dict_and_parameters_unchanged():
    vit = transformers.ViTForImageClassification(_vit_config("vit"))
    params, keys = list(vit.named_parameters()), list(vit.state_dict())
    vk_hf.patch_model(vit, token_drop=0.5)
    assert [(n, id(p)) for n, p in vit.named_parameters()] == [(n, id(p)) for n, p in params]
    assert list(vit.state_dict()) == keys


def test_swin_report_and_class_switch():
    ref, model, report = _swin_pair(v2=False, head=True)
    assert isinstance(report, PatchReport)
    names = [row[0] for row in report.replaced]
    assert names == [f"swin.encoder.layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)]
    for name, old, new in report.replaced:
        assert old == "transformers.models.swin.modeling_swin.SwinLayer"
        assert new == "vitkern.integrations.transformers.FusedSwinLayer"
        layer = model.get_submodule(name)
        assert isinstance(layer, transformers.models.swin.modeling_swin.SwinLayer)
        assert layer.vitkern_backend == "reference"
    assert "4 replaced, 0 left" in str(report)
    # patching again only refreshes the options
    again = vk_hf.patch_model(model, backend="auto")
    assert [r[0] for r in again.replaced] == names
    assert model.get_submodule(names[0]).vitkern_backend == "auto"
    # the fused classes pickle (torch.save of a whole model)
    clone = pickle.loads(pickle.dumps(model))
    x = _images((32, 32), batch=1)
    with torch.no_grad():
        _close(clone(x).logits, ref(x).logits, "pickled logits")


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
def test_swin_output_attentions_falls_back(v2):
    ref, model, _ = _swin_pair(v2, 3, attn_implementation="eager")
    x = _images((32, 32))
    with torch.no_grad():
        a = ref(x, output_attentions=True)
        b = model(x, output_attentions=True)
    assert len(a.attentions) == len(b.attentions) == 2
    for i, (p, q) in enumerate(zip(b.attentions, a.attentions)):
        _close(p, q, f"attentions[{i}]")
    _close(b.logits, a.logits, "logits")


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
def test_swin_attention_dropout_runs_transformers_path_in_training(v2):
    ref, model, report = _swin_pair(v2, 3, attention_probs_dropout_prob=0.25)
    assert len(report.left) == 4
    assert all("attention dropout p=0.25" in why and "eval mode is fused" in why
               for _, _, why in report.left)
    x = _images((32, 32))
    with torch.no_grad():
        _close(model(x).logits, ref(x).logits, "eval logits")  # fused
        ref.train(), model.train()
        torch.manual_seed(5)
        a = ref(x).logits
        torch.manual_seed(5)
        b = model(x).logits  # transformers' own path: the same dropout draws
    _close(b, a, "training logits with attention dropout")


def test_swin_gradient_checkpointing():
    ref, model, _ = _swin_pair(False, 3)
    ref.train(), model.train()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    x = _images((36, 44))
    _, _, ga = _grads(ref, x)
    _, _, gb = _grads(model, x)
    for name in ga:
        _close(gb[name], ga[name], f"d {name}", tol=1e-4)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
def test_swin_triton_backend(v2):
    """The Triton kernels (the interpreter on CPU) behind the patched layers, forward and
    backward: one stage, 5×5 map, window 2 (padded, shift 1), head_dim 8."""
    kw = dict(image_size=20, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
              window_size=2, num_labels=3)
    torch.manual_seed(0)
    cls, cfg = ((transformers.Swinv2ForImageClassification, transformers.Swinv2Config) if v2
                else (transformers.SwinForImageClassification, transformers.SwinConfig))
    ref = _randomised(cls(cfg(**kw)))
    ref.train()
    model = copy.deepcopy(ref)
    vk_hf.patch_model(model, backend="triton")
    x = _images((20, 20), batch=1)
    out_a, dx_a, ga = _grads(ref, x)
    out_b, dx_b, gb = _grads(model, x)
    _close(out_b, out_a, "logits")
    _close(dx_b, dx_a, "d pixel_values", tol=1e-4)
    for name in ga:  # the bias table (V1) / position-bias MLP and logit scale (V2) included
        _close(gb[name], ga[name], f"d {name}", tol=1e-4)


# --------------------------------------------------------------------------------------------
# ViT / DINOv2 token dropping
# --------------------------------------------------------------------------------------------


def _vit_config(kind, **kw):
    base = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4,
                num_attention_heads=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=5)
    if kind == "vit":
        return transformers.ViTConfig(**{**base, "intermediate_size": 64, **kw})
    if kind == "dinov2":
        return transformers.Dinov2Config(**{**base, "mlp_ratio": 2, **kw})
    return transformers.Dinov2WithRegistersConfig(
        **{**base, "mlp_ratio": 2, "num_register_tokens": 3, **kw})


_TOKEN_CLASSES = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "dinov2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
}


def _vit_pair(kind, token_drop, head=False, backend="reference", **kw):
    cls = getattr(transformers, _TOKEN_CLASSES[kind][int(head)])
    torch.manual_seed(0)
    ref = _randomised(cls(_vit_config(kind, **kw))).eval()
    model = copy.deepcopy(ref)
    return ref, model, vk_hf.patch_model(model, backend=backend, token_drop=token_drop)


@token_layout
@pytest.mark.parametrize("kind", ["vit", "dinov2", "registers"])
def test_token_drop_keep_one_equals(kind):
    opts = dict(keep_rate=1.0, allow_pool=True) if kind != "vit" else 1.0
    ref, model, report = _vit_pair(kind, opts)
    assert [r[0] for r in report.tokens] == [
        f"{'layers' if kind == 'vit' else 'encoder.layer'}.{i}" for i in (1, 2, 3)]
    x = _images((32, 32))
    with torch.no_grad():
        a, b = ref(x), model(x)
    _close(b.last_hidden_state, a.last_hidden_state, "last_hidden_state")
    _close(b.pooler_output, a.pooler_output, "pooler_output")
    # the classifier heads too, and training-mode gradients (dropout 0)
    ref, model, _ = _vit_pair(kind, opts, head=True)
    ref.train(), model.train()
    out_a, dx_a, ga = _grads(ref, x)
    out_b, dx_b, gb = _grads(model, x)
    _close(out_b, out_a, "logits")
    _close(dx_b, dx_a, "d pixel_values")
    for name in ga:
        _close(gb[name], ga[name], f"d {name}", tol=1e-4)


@token_layout
@pytest.mark.parametrize("kind", ["vit", "registers"])
@pytest.mark.parametrize("fuse", [True, False])
def test_token_drop_half_drops_and_trains(kind, fuse):
    ref, model, report = _vit_pair(kind, dict(keep_rate=0.5, fuse=fuse, allow_pool=True),
                                   head=True)
    prefix = 1 + (3 if kind == "registers" else 0)
    n = 64  # 8×8 patches
    for layer in (1, 2, 3):  # EViT: ceil(0.5·n) image tokens kept, the fused one appended
        n = math.ceil(0.5 * n) + int(fuse)
    model.train()
    x = _images((32, 32))
    out = model(x, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == prefix + n
    assert [h.shape[1] for h in out.hidden_states[:2]] == [prefix + 64] * 2
    out.logits.pow(2).sum().backward()
    emb = model.base_model.embeddings
    assert emb.cls_token.grad is not None and emb.cls_token.grad.abs().sum() > 0
    assert emb.position_embeddings.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    if kind == "registers":
        assert emb.register_tokens.grad.abs().sum() > 0
    with torch.no_grad():
        base = model.base_model.eval()(x)
    assert base.last_hidden_state.shape[1] == prefix + n
    if kind == "registers":  # DINOv2's pooler_output is the class token (ViT's head has none)
        _close(base.pooler_output, base.last_hidden_state[:, 0], "pooler reads the class token")
    else:  # ViTModel's pooler (dense + tanh on the class token) on fewer tokens
        _, vit, _ = _vit_pair("vit", dict(keep_rate=0.5, fuse=fuse))
        with torch.no_grad():
            out = vit(x)
        assert out.last_hidden_state.shape[1] == prefix + n
        _close(out.pooler_output, vit.pooler(out.last_hidden_state), "ViT pooler")


@token_layout
def test_token_drop_keeps_register_tokens_first():
    """Registers are prefix tokens: never dropped, kept in place after the class token."""
    ref, model, _ = _vit_pair("registers", dict(keep_rate=0.25, fuse=False, layers=[0]))
    seen = {}
    layer = model.encoder.layer[0]
    handle = layer.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    with torch.no_grad():
        model(_images((32, 32)))
    handle.remove()
    assert seen["out"].shape[1] == 4 + 16
    # the prefix rows of the output are the prefix rows of an unpatched layer's output
    base = transformers.models.dinov2_with_registers.modeling_dinov2_with_registers
    plain = copy.deepcopy(layer)
    plain.__class__ = base.Dinov2WithRegistersLayer
    with torch.no_grad():
        full = plain(seen["inp"])
    _close(seen["out"][:, :4], full[:, :4], "class + register tokens")


@token_layout
def test_token_drop_triton_backend():
    ref, model, _ = _vit_pair("vit", dict(keep_rate=0.5, layers=[1]), backend="triton",
                              image_size=16, num_hidden_layers=2)
    ref_r, model_r, _ = _vit_pair("vit", dict(keep_rate=0.5, layers=[1]),
                                  image_size=16, num_hidden_layers=2)
    x = _images((16, 16), batch=1)
    model.train(), model_r.train()
    a, b = model(x), model_r(x)
    _close(a.last_hidden_state, b.last_hidden_state, "triton vs reference")
    a.last_hidden_state.sum().backward()
    b.last_hidden_state.sum().backward()
    q = "layers.1.attention.q_proj.weight"
    _close(model.get_parameter(q).grad, model_r.get_parameter(q).grad, "d q_proj", tol=1e-4)


@token_layout
def test_token_drop_attention_dropout_is_eager_in_training():
    """Training with attention dropout: the dropping layers form the probabilities eagerly and
    drop them as transformers' eager attention does (the same random draws at keep rate 1)."""
    ref, model, report = _vit_pair("vit", 1.0, attention_probs_dropout_prob=0.2,
                                   attn_implementation="eager")
    assert [row[0] for row in report.left if "attention dropout" in row[2]] == [
        f"layers.{i}.attention" for i in (1, 2, 3)]
    x = _images((32, 32))
    with torch.no_grad():
        _close(model(x).last_hidden_state, ref(x).last_hidden_state, "eval")
        ref.train(), model.train()
        torch.manual_seed(3)
        a = ref(x).last_hidden_state
        torch.manual_seed(3)
        b = model(x).last_hidden_state
    _close(b, a, "training with attention dropout")


@token_layout
def test_other_transformers_layouts_are_left_with_a_reason(monkeypatch):
    """A layer whose layout is not the one the fused forward drives (another transformers
    version) is left alone (Swin) or refused (token_drop), never mis-driven."""
    torch.manual_seed(0)
    model = transformers.SwinModel(_swin_config())
    delattr(model.encoder.layers[0].blocks[1].attention, "o_proj")
    report = vk_hf.patch_model(model)
    assert len(report.replaced) == 3
    [(name, _, why)] = report.left
    assert name == "encoder.layers.0.blocks.1" and "no 'attention.o_proj'" in why
    # a layer forward of another signature (another transformers generation)
    layouts = {**vk_hf._LAYOUTS, "FusedSwinv2Layer": [
        (sig + ("extra",), attrs, fwd) for sig, attrs, fwd in vk_hf._LAYOUTS["FusedSwinv2Layer"]]}
    monkeypatch.setattr(vk_hf, "_LAYOUTS", layouts)
    report = vk_hf.patch_model(transformers.Swinv2Model(_swin_config(v2=True)))
    assert report.replaced == [] and len(report.left) == 4
    assert all("is not a layout vitkern drives" in why for _, _, why in report.left)
    vit = transformers.ViTModel(_vit_config("vit"))
    delattr(vit.layers[2], "layernorm_after")
    with pytest.raises(ValueError, match="cannot patch layers.2: .* no 'layernorm_after'"):
        vk_hf.patch_model(vit, token_drop=0.5)


@token_layout
def test_plain_vit_is_left_alone():
    torch.manual_seed(0)
    model = transformers.ViTModel(_vit_config("vit"))
    report = vk_hf.patch_model(model)
    assert report.replaced == [] and report.tokens == []
    assert len(report.left) == 4
    assert all("kept on purpose" in why for _, _, why in report.left)


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


@token_layout
def test_refusals():
    vit = transformers.ViTModel(_vit_config("vit"))
    with pytest.raises(ValueError, match="ambiguous"):
        vk_hf.patch_model(copy.deepcopy(vit), token_drop=1)
    with pytest.raises(ValueError, match="keep rate must lie"):
        vk_hf.patch_model(copy.deepcopy(vit), token_drop=1.5)
    with pytest.raises(ValueError, match="unknown token_drop option"):
        vk_hf.patch_model(copy.deepcopy(vit), token_drop=dict(keep=0.5))
    with pytest.raises(ValueError, match="out of range"):
        vk_hf.patch_model(copy.deepcopy(vit), token_drop=dict(keep_rate=0.5, layers=[4]))
    with pytest.raises(ValueError, match="unknown backend"):
        vk_hf.patch_model(copy.deepcopy(vit), backend="fast")
    with pytest.raises(ValueError, match="token_drop .EViT. supports"):
        vk_hf.patch_model(transformers.SwinModel(_swin_config()), token_drop=0.5)
    with pytest.raises(ValueError, match="allow_pool"):
        vk_hf.patch_model(transformers.Dinov2ForImageClassification(_vit_config("dinov2")),
                          token_drop=0.5)
    mim = transformers.ViTForMaskedImageModeling(_vit_config("vit", encoder_stride=4))
    with pytest.raises(ValueError, match="needs every patch token"):
        vk_hf.patch_model(mim, token_drop=0.5)

    vk_hf.patch_model(vit, token_drop=0.5)
    x = _images((32, 32), batch=1)
    with pytest.raises(ValueError, match="output_attentions=True cannot be served"):
        vit(x, output_attentions=True)
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        vit.layers[1](torch.randn(1, 65, 32), torch.zeros(1, 1, 65, 65))
