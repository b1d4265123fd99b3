"""``vitkern.integrations.timm.patch_model``: the replacement mechanism and its report.

Family-specific parity (patched timm Swin / XCiT / ViT against the original) lives in each family's
tests; here a stand-in attention class proves the mechanism itself.
"""
from torch import nn

from vitkern.integrations import timm as vk_timm


class ToyAttention(nn.Module):
    def __init__(self, dim=8, refuse=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.refuse = refuse


class ToyFused(nn.Module):
    def __init__(self, qkv, backend):
        super().__init__()
        self.qkv = qkv
        self.backend = backend

    @classmethod
    def from_timm(cls, module, backend="auto"):
        if module.refuse:
            raise vk_timm.UnsupportedModule("toy refuses this one")
        return cls(module.qkv, backend)


class OtherAttention(nn.Module):
    pass


def _patched(monkeypatch, model, **kwargs):
    path = f"{ToyAttention.__module__}.{ToyAttention.__qualname__}"
    monkeypatch.setattr(vk_timm, "_replacements", lambda: {path: ToyFused})
    return vk_timm.patch_model(model, **kwargs)


def test_replaces_in_place_and_reuses_parameters(monkeypatch):
    model = nn.Sequential(ToyAttention(), nn.Sequential(nn.ReLU(), ToyAttention()))
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    report = _patched(monkeypatch, model, backend="reference")
    assert isinstance(model[0], ToyFused) and isinstance(model[1][1], ToyFused)
    assert model[0].backend == "reference"
    assert [p for p in model.parameters()] == params  # same Parameter objects, no copies
    assert list(model.state_dict()) == keys
    assert [row[0] for row in report.replaced] == ["0", "1.1"]
    assert report.left == []
    assert "2 replaced, 0 left" in str(report)


def test_reports_refused_and_unknown_attention(monkeypatch):
    model = nn.Sequential(ToyAttention(refuse=True), OtherAttention(), nn.Linear(2, 2))
    report = _patched(monkeypatch, model)
    assert isinstance(model[0], ToyAttention)
    assert report.replaced == []
    reasons = {name: why for name, _, why in report.left}
    assert reasons == {"0": "toy refuses this one", "1": "no vitkern module for this class"}


def test_discovery_reads_every_nn_family():
    table = vk_timm._replacements()
    for path, cls in table.items():
        assert path.startswith("timm."), path
        assert callable(getattr(cls, "from_timm", None)), cls
    # what the families register (parity of each patched model is tested in its family's tests)
    assert {"timm.models.swin_transformer.WindowAttention",
            "timm.models.swin_transformer.SwinTransformerBlock",
            "timm.models.swin_transformer_v2.WindowAttention",
            "timm.models.swin_transformer_v2.SwinTransformerV2Block",
            "timm.models.xcit.XCA"} <= set(table)
