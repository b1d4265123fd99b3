"""``vitkern.integrations.timm.patch_model``: the replacement mechanism and its report, and the
layering of the package (imports point down: no cycle, ``vitkern.nn`` knows nothing of timm).

Family-specific parity (patched timm Swin / XCiT / ViT against the original) lives in each family's
tests; here a stand-in attention class proves the mechanism itself.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from torch import nn

import vitkern
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


# --------------------------------------------------------------------------------------------
# layering: imports point down (integrations -> nn -> ops -> reference / kernels)
# --------------------------------------------------------------------------------------------

_PACKAGE = Path(vitkern.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(_PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: not those inside functions (run when
    called) nor under ``if TYPE_CHECKING:``; class bodies and try / if blocks count."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(child for child in ast.iter_child_nodes(node)
                        if isinstance(child, ast.stmt))


def _targets(node, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The vitkern modules an import statement loads (``from P import m`` -> ``P.m`` when m is a
    module, else ``P``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def _package_files() -> dict[str, Path]:
    return {_module_name(p): p for p in _PACKAGE.rglob("*.py")}


def _import_graph() -> dict[str, set[str]]:
    """vitkern module -> the vitkern modules it imports at module level."""
    files = _package_files()
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {t for node in _module_level_imports(tree)
                       for t in _targets(node, name, path.name == "__init__.py", set(files))
                       if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import x\ndef f():\n    import y\nclass C:\n    import z\n"
                     "if TYPE_CHECKING:\n    import w\ntry:\n    import v\nexcept ImportError:\n"
                     "    pass\n")
    assert sorted(a.name for n in _module_level_imports(tree) for a in n.names) == [
        "v", "x", "z"]


def test_no_import_cycle_in_vitkern():
    """No module of ``vitkern/`` takes part in an import cycle at module level (imports inside
    functions, such as ``vitkern.nn``'s ``from_timm`` aliases, load on call and are not edges)."""
    graph = _import_graph()
    assert "vitkern.nn.window" in graph and "vitkern.integrations.timm.swin" in graph
    assert graph["vitkern.integrations.timm.swin"] >= {"vitkern.nn.window"}
    assert _cycles(graph) == []


def test_nn_imports_nothing_above_it():
    """``vitkern.nn`` knows nothing of timm or of the integrations: no module of it imports
    ``timm`` anywhere, nor ``vitkern.integrations`` at module level (only the ``from_timm``
    aliases do, inside the method)."""
    graph = _import_graph()
    nn_files = {n: p for n, p in _package_files().items() if n.split(".")[:2] == ["vitkern", "nn"]}
    assert {"vitkern.nn", "vitkern.nn.window", "vitkern.nn.token"} <= set(nn_files)
    for name, path in sorted(nn_files.items()):
        assert not {t for t in graph[name] if t.startswith("vitkern.integrations")}, name
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [m for m in mods if m.split(".")[0] == "timm"], (name, mods)


def test_importing_nn_loads_no_timm_nor_integrations():
    """In a fresh interpreter, importing every module of ``vitkern.nn`` loads neither ``timm``,
    ``transformers`` nor ``vitkern.integrations``."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import vitkern.nn
        names = ["vitkern.nn"] + [f"vitkern.nn.{m.name}"
                                  for m in pkgutil.iter_modules(vitkern.nn.__path__)]
        for name in names:
            importlib.import_module(name)
            bad = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("timm", "transformers")
                         or m.startswith("vitkern.integrations"))
            print(name, *bad)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) >= 6 and {row[0] for row in rows} >= {
        "vitkern.nn.window", "vitkern.nn.token", "vitkern.nn.linear"}
    assert [row for row in rows if len(row) > 1] == []


def test_nn_from_timm_aliases_reach_the_adapters():
    """The public ``from_timm`` classmethods stay on the nn classes; the registry ``patch_model``
    walks lives in this package and maps every timm class to one of them or to a block
    patch."""
    from vitkern.integrations.timm import swin, vit, xcit

    from vitkern import nn as vk_nn
    for cls in (vk_nn.WindowAttention, vk_nn.WindowAttentionV2, vk_nn.window.WindowAttentionV2Cr,
                vk_nn.XCA, vk_nn.TokenAttention):
        assert callable(getattr(cls, "from_timm", None)), cls
    assert vk_timm._replacements() == {**swin.TIMM_REPLACEMENTS, **vit.TIMM_REPLACEMENTS,
                                       **xcit.TIMM_REPLACEMENTS}
    for family in ("window", "token", "linear"):
        assert not hasattr(getattr(vk_nn, family), "TIMM_REPLACEMENTS"), family
