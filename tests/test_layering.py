"""The package layers (docs/architecture.md): no module imports a layer above its own.

    ops  <-  nn  <-  models  <-  convert  <-  linen        (and train, beside convert)

`natjax.ops` is the attention operator and knows nothing of layers or models; `natjax.models`
is the networks and their config, without checkpoint files (`convert`) or training (`train`);
`convert` never reaches into `train` or the Linen wrappers. Every import statement counts,
function-local ones included, read with `ast` (nothing is imported to check).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "natjax"
TOP = "natjax"  # `import natjax` pulls in every layer (natjax/__init__.py imports them all)
# Sub-package -> the sub-packages (and TOP) its modules may import.
ALLOWED = {
    "ops": {"ops"},
    "nn": {"ops", "nn"},
    "models": {"ops", "nn", "models"},
    "convert": {"ops", "nn", "models", "convert"},
    "train": {"ops", "nn", "models", "convert", "train", TOP},
    "linen": {"ops", "nn", "models", "convert", "linen"},
}


def _imported(path: Path, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every natjax import in `path` (relative ones resolved
    against `package`, the file's package as a tuple of names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, node.module) if node.module else base)
            # `from natjax import models` imports natjax.models, not all of natjax.
            names = [f"{module}.{a.name}" for a in node.names] if module == TOP else [module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == TOP or n.startswith(TOP + ".")]
    return found


def _layer(module: str) -> str:
    """ "ops" for natjax.ops.na.api, TOP for natjax itself and its top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else TOP


def layering_violations(root: Path) -> list[str]:
    """`file:line imports module` for every import that reaches above the file's layer."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        # The package `from . import` refers to: natjax/ops for natjax/ops/{__init__,api}.py.
        package = rel.parts[:-1]
        layer = _layer(".".join(rel.parts))
        if layer == TOP:
            continue  # the top-level modules (natjax/__init__.py, cli.py, ...) may import all
        for line, module in _imported(path, package):
            if _layer(module) not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()) == sorted(
        ALLOWED
    ), "a new sub-package needs its place in ALLOWED (and in docs/architecture.md)"
    assert layering_violations(ROOT) == []


@pytest.mark.parametrize(
    ("where", "source", "culprit"),
    [
        ("ops/na/x.py", "from natjax.models import NatConfig\n", "natjax.models"),
        ("ops/x.py", "def f():\n    import natjax\n", "natjax"),
        ("models/x.py", "from natjax import convert\n", "natjax.convert"),
        ("models/x.py", "from ..train import loop\n", "natjax.train"),
        ("convert/x.py", "import natjax.train.config as c\n", "natjax.train.config"),
        ("nn/x.py", "from . import y\nfrom ..models.nat import NatModel\n", "natjax.models.nat"),
    ],
)
def test_a_planted_upward_import_is_reported(tmp_path, where, source, culprit):
    root = tmp_path / "natjax"
    for package in ALLOWED:
        (root / package / "na").mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / where).write_text(source)
    assert layering_violations(root) == [
        f"natjax/{where}:{source.count(chr(10))} imports {culprit}"
    ]
