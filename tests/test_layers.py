"""The package's layers: no lower layer imports a higher one, directly or through another module.

Layers are the top-level modules and packages of `tinyclip_ds` (models, data, distill, eval,
train, demo, recipe, ...). Every import statement counts, wherever it is: module level, inside a
function (a lazy import is still a dependency), under ``if TYPE_CHECKING``, relative or absolute.
A module reached through an import is followed to what it imports in turn, so a lower layer
cannot reach a higher one through a third package (data → export → models); modules of the
checked layer itself are not followed, they are checked on their own.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

from tinyclip_ds.config import PROJECT_ROOT

EVERY_OTHER_LAYER = frozenset({"*"})
FORBIDDEN = {
    "models": frozenset({"train", "eval", "data", "distill", "recipe", "demo", "cli", "export", "summary",
                         "launch", "progress"}),  # models run no long jobs: no progress bars
    "data": frozenset({"models", "eval", "train", "distill", "recipe", "demo"}),
    "distill": frozenset({"train", "eval", "data", "recipe"}),
    "eval": frozenset({"train"}),
    "distributed": EVERY_OTHER_LAYER,
    "stages": EVERY_OTHER_LAYER,  # the stage table names its tasks by import path, imports none
    "config": EVERY_OTHER_LAYER,
}
"""What each layer must not import; layers not named here may import anything below them."""


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package in ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of the package's modules in one file.

    ``from a import b`` imports ``a`` and, when ``b`` is a module, ``a.b``; importing ``a.b.c``
    also runs the packages ``a`` and ``a.b``, which count as imported too.
    """
    package = name.split(".")[0]
    context = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = context.rsplit(".", node.level - 1)[0] if node.level > 1 else context
                base = ".".join(filter(None, (base, node.module)))
            else:
                base = node.module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names
                                if f"{base}.{alias.name}" in modules]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                imported = ".".join(parts[:end])
                if parts[0] == package and imported != name and (end == len(parts) or imported in modules):
                    found.append((node.lineno, imported))
    return sorted(set(found))


def layer_of(module: str) -> str | None:
    """``models`` for ``tinyclip_ds.models.students``; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(package_dir: Path, forbidden: dict[str, frozenset[str]]) -> list[str]:
    """One line per import by which a module reaches a layer its own layer must not import:
    ``file:line imports X`` and, when reached through other modules, each further step."""
    modules = module_files(package_dir)
    edges = {name: imports_of(name, path, modules) for name, path in modules.items()}
    root = package_dir.parent

    def where(module: str, line: int, imported: str) -> str:
        return f"{modules[module].relative_to(root)}:{line} imports {imported}"

    problems = []
    for name in modules:
        layer = layer_of(name)
        if layer not in forbidden:
            continue
        banned = forbidden[layer]
        # Breadth first, so each violation is reported through its shortest chain of imports.
        chains = {name: []}
        queue = deque([name])
        while queue:
            module = queue.popleft()
            for line, imported in edges.get(module, []):
                target = layer_of(imported)
                if imported in chains or target == layer:
                    continue  # modules of this layer are checked on their own
                chain = chains[module] + [where(module, line, imported)]
                # `import a.b.c` also imports the packages a.b and a: name only the module itself
                named = not any(other.startswith(imported + ".") for other_line, other in edges[module]
                                if other_line == line)
                if target is not None and (target in banned or banned is EVERY_OTHER_LAYER):
                    if named:
                        problems.append(f"{' → '.join(chain)}: {layer} must not import {target}")
                    continue  # what a forbidden module imports is its own layer's concern
                chains[imported] = chain
                queue.append(imported)
    return problems


def test_no_lower_layer_imports_a_higher_one():
    problems = layer_violations(PROJECT_ROOT / "tinyclip_ds", FORBIDDEN)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_the_package_is_read_with_its_lazy_and_relative_imports():
    """The real package gives the checker something to check: the mixture's lazy import of the
    Hugging Face reader (inside a function) and the models' own imports are seen."""
    modules = module_files(PROJECT_ROOT / "tinyclip_ds")
    mixture = imports_of("tinyclip_ds.data.mixture", modules["tinyclip_ds.data.mixture"], modules)
    assert "tinyclip_ds.data.hf" in {imported for _, imported in mixture}
    students = imports_of("tinyclip_ds.models.students", modules["tinyclip_ds.models.students"], modules)
    assert {"tinyclip_ds.models.layer_map", "tinyclip_ds.config"} <= {imported for _, imported in students}


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` holding ``files`` (relative path → source)."""
    for relative, source in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


def test_violations_are_reported_with_file_line_and_module(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "config.py": "import os\n",
        "models/__init__.py": "",
        "models/tower.py": "import torch\n\n\ndef build():\n    from ..train import loop\n",
        "models/ok.py": "from . import tower\nfrom pkg.config import option\n",
        "train/__init__.py": "",
        "train/loop.py": "from pkg.models import tower\n",
        "data/__init__.py": "",
        "data/sources.py": "def demo():\n    from pkg.demo import digits\n",
        "data/shards.py": "def save():\n    from pkg.export import writer\n",
        "demo/__init__.py": "",
        "demo/digits.py": "import numpy\n",
        "export/__init__.py": "",
        "export/writer.py": "import numpy\n\nimport pkg.models.tower\n",
        "distributed.py": "from . import config\n",
    })
    problems = layer_violations(package, FORBIDDEN)
    assert problems == [
        "pkg/data/shards.py:2 imports pkg.export.writer → pkg/export/writer.py:3 imports pkg.models.tower: "
        "data must not import models",
        "pkg/data/sources.py:2 imports pkg.demo.digits: data must not import demo",
        "pkg/distributed.py:1 imports pkg.config: distributed must not import config",
        "pkg/models/tower.py:5 imports pkg.train.loop: models must not import train",
    ]

    (package / "models" / "tower.py").write_text("import torch\n")
    (package / "export" / "writer.py").write_text("import numpy\n")
    (package / "data" / "sources.py").write_text("import numpy\n")
    (package / "distributed.py").write_text("import os\n")
    assert layer_violations(package, FORBIDDEN) == []
