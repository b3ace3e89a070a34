"""Dependencies run one way: read from the source files' import statements (``ast``), nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_rl"


def imports(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module ``path`` imports (at the top or inside functions), relative imports resolved from ``root``."""
    package = ".".join(path.relative_to(root).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _files(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_the_import_reader_sees_relative_and_nested_imports(tmp_path):
    pkg = tmp_path / "lightning_rl" / "plugins"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("from .memory_plan import GiB\n\ndef f():\n    from ..callbacks import VLLMRollout\n")
    found = imports(src, root=tmp_path)
    assert "lightning_rl.plugins.memory_plan" in found and "lightning_rl.callbacks.VLLMRollout" in found


def test_plugins_never_import_callbacks():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imports(p) if m.startswith("lightning_rl.callbacks"))
                 for p in _files("plugins")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_plugins_and_rollout_never_import_modules_or_callbacks_and_shapes_imports_none_of_ours():
    for sub in ("plugins", "rollout"):
        for path in _files(sub):
            bad = [m for m in imports(path) if m.startswith(("lightning_rl.callbacks", "lightning_rl.modules"))]
            assert not bad, (path.name, bad)
    assert not [m for m in imports(PACKAGE / "shapes.py") if m.startswith(("lightning_rl", "lightning"))]


def test_only_vllm_internals_reaches_into_vllms_private_parts():
    private = ("vllm.device_allocator", "vllm.lora", "vllm.distributed")
    private_attrs = ("driver_worker", "_adapter_manager", "VLLM_ENABLE_V1_MULTIPROCESSING", "pointer_to_data")
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vllm_internals.py":
            continue
        assert not [m for m in imports(path) if m.startswith(private)], path
        text = path.read_text()
        assert not [a for a in private_attrs if a in text], path
