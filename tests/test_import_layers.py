"""The packages import in one direction only: models <- lora <- parallel <- the app (lightning_module, generation,
callbacks, data_modules, cli). Checked on the source (every import statement, function-level ones included), so a
lazy import that would hide a cycle fails here too. Shared helpers (export_dir, embedded) sit below all of them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["models", "lora", "parallel"]  # each may import the ones before it
BASE = {"qmoe_lightning.export_dir", "qmoe_lightning.embedded"}  # importable from every layer


def _imports(path: Path, package: str) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against `package`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _violations(layer: str) -> list[str]:
    allowed = {f"qmoe_lightning.{name}" for name in LAYERS[: LAYERS.index(layer) + 1]} | BASE
    bad = []
    for path in sorted((ROOT / "qmoe_lightning" / layer).rglob("*.py")):  # family folders too
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for name in _imports(path, package):
            ours = name.startswith(("qmoe_lightning", "callbacks", "data_modules", "cli"))
            if ours and name != "qmoe_lightning" and not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_each_layer_imports_only_the_layers_below_it():
    bad = [v for layer in LAYERS for v in _violations(layer)]
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    # negative control: a function-level relative import of the app layer from `lora` must be reported
    fake = tmp_path / "qmoe_lightning" / "lora"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from ..parallel.state import full_tensor_fetcher\n"
                               "    from callbacks import HFExport\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert sorted(_violations("lora")) == [
        "qmoe_lightning/lora/x.py imports callbacks", "qmoe_lightning/lora/x.py imports qmoe_lightning.parallel.state"]
