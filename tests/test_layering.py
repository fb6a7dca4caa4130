"""The package follows its map: no module imports from a layer above its own, and no import circle.

Every import counts: top-level ones, those inside functions, and those under TYPE_CHECKING (a
type-only import still says which module knows which). Within one layer, imports are allowed in
any direction as long as they form no circle.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "neoxlab"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# The layer order is read from docs/architecture.md instead of being repeated here: with one
# list, the map people read and the rule this test enforces cannot drift apart. A layer is a
# numbered item of the doc's "## Layers" section: `N. **name**: `file.py`, `data/file.py`, ...`.
LAYERS_HEADING = "## Layers"
LAYER_ITEM = re.compile(r"^(\d+)\. \*\*(.+?)\*\*: (.*)$")
MODULE_FILE = re.compile(r"`([\w/]+\.py)`")


@dataclass(frozen=True)
class Layer:
    number: int
    name: str


@dataclass(frozen=True)
class Import:
    importer: str  # module files, relative to the package folder: "data/chat.py"
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}"


def read_layers(doc: str) -> dict[str, Layer]:
    """Module file -> its layer, from the numbered items under `## Layers`."""
    section = doc.split(f"\n{LAYERS_HEADING}\n", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, Layer] = {}
    for line in section.splitlines():
        item = LAYER_ITEM.match(line)
        if not item:
            continue
        layer = Layer(int(item[1]), item[2])
        for module in MODULE_FILE.findall(item[3]):
            assert module not in layers, f"{module} is listed in two layers of {ARCHITECTURE.name}"
            layers[module] = layer
    return layers


def package_modules(package_dir: Path) -> dict[str, str]:
    """Dotted module name -> module file, for every module of the package in `package_dir`."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir)
        parts = [package_dir.name, *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = relative.as_posix()
    return modules


def imports_in(source: str, dotted: str, modules: dict[str, str]) -> list[Import]:
    """Every import of another package module in `source` (module `dotted`), wherever it is."""
    is_package = modules[dotted].endswith("__init__.py")
    package = dotted if is_package else dotted.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [name if name in modules else base for name in names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import pkg.mod.attr` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != dotted:
                found.append(Import(modules[dotted], node.lineno, modules[name]))
    return sorted(set(found), key=lambda i: (i.importer, i.line, i.imported))


def package_imports(package_dir: Path) -> list[Import]:
    modules = package_modules(package_dir)
    found = []
    for dotted, file in modules.items():
        source = (package_dir / file).read_text(encoding="utf-8")
        found += imports_in(source, dotted, modules)
    return found


def upward_imports(imports: list[Import], layers: dict[str, Layer]) -> list[str]:
    """One line for each import of a module from a layer above the importer's. Modules in no
    layer are skipped here: test_layer_table_places_every_module_once names them."""
    lines = []
    for found in imports:
        importer, imported = layers.get(found.importer), layers.get(found.imported)
        if importer and imported and imported.number > importer.number:
            lines.append(
                f"{found} (layer {imported.number}, {imported.name}) "
                f"from layer {importer.number}, {importer.name}"
            )
    return lines


def import_circle(imports: list[Import]) -> list[Import]:
    """The imports of one circle (module A imports B ... imports A), or [] when there is none."""
    edges: dict[str, list[Import]] = {}
    for found in imports:
        edges.setdefault(found.importer, []).append(found)
    done: set[str] = set()

    def visit(module: str, path: list[Import], on_path: set[str]) -> list[Import]:
        for found in edges.get(module, []):
            if found.imported in on_path:
                start = next(i for i, step in enumerate(path) if step.importer == found.imported)
                return [*path[start:], found]
            if found.imported not in done:
                circle = visit(found.imported, [*path, found], on_path | {found.imported})
                if circle:
                    return circle
        done.add(module)
        return []

    for module in sorted(edges):
        circle = visit(module, [], {module})
        if circle:
            return circle
    return []


def describe_circle(circle: list[Import]) -> str:
    steps = [f"{step.importer}:{step.line}" for step in circle]
    return "import circle: " + " -> ".join([*steps, circle[0].importer])


# ---- the package -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers() -> dict[str, Layer]:
    return read_layers(ARCHITECTURE.read_text(encoding="utf-8"))


def test_layer_table_places_every_module_once(layers):
    modules = set(package_modules(PACKAGE_DIR).values())
    assert not modules - set(layers), f"not in any layer of {ARCHITECTURE.name}"
    assert not set(layers) - modules, f"listed in {ARCHITECTURE.name} but not in src/neoxlab"


def test_no_module_imports_from_a_higher_layer(layers):
    assert upward_imports(package_imports(PACKAGE_DIR), layers) == []


def test_no_import_circle():
    circle = import_circle(package_imports(PACKAGE_DIR))
    assert not circle, describe_circle(circle)


# ---- the checker itself: it must see the imports it exists to catch ---------------------------

PLANTED_LAYERS = """
## Layers

1. **base**: `__init__.py`, `errors.py`, `sub/__init__.py`
2. **parts**: `model.py`, `sub/parts.py`
3. **top**: `trainer.py`

## Modules
`trainer.py` is mentioned here, outside the table, and stays in layer 3.
"""


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package_dir = tmp_path / "neoxlab"
    for name, source in {"__init__.py": "", "sub/__init__.py": "", **files}.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(source, encoding="utf-8")
    return package_dir


def test_layers_are_read_from_the_doc_format():
    layers = read_layers(PLANTED_LAYERS)
    assert layers["sub/parts.py"] == Layer(2, "parts")
    assert layers["trainer.py"] == Layer(3, "top")
    assert len(layers) == 6


@pytest.mark.parametrize(
    "source",
    [
        "from neoxlab.trainer import train\n",
        "import neoxlab.trainer\n",
        "from neoxlab import trainer\n",
        "from . import trainer\n",
        "def load():\n    from neoxlab.trainer import train  # hidden in a function\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neoxlab.trainer import X\n",
    ],
)
def test_checker_reports_an_upward_import(tmp_path, source):
    package_dir = plant(
        tmp_path, {"errors.py": "", "trainer.py": "", "model.py": f"import math\n{source}"}
    )
    line = source.count("\n") + 1  # the planted import is the source's last line, after `math`
    assert upward_imports(package_imports(package_dir), read_layers(PLANTED_LAYERS)) == [
        f"model.py:{line} imports trainer.py (layer 3, top) from layer 2, parts"
    ]


def test_checker_allows_imports_downwards_and_within_a_layer(tmp_path):
    package_dir = plant(
        tmp_path,
        {
            "errors.py": "",
            "model.py": "from neoxlab.errors import Error\nfrom neoxlab.sub.parts import part\n",
            "sub/parts.py": "from ..errors import Error\n",
            "trainer.py": "from neoxlab import model\nimport neoxlab\n",
        },
    )
    imports = package_imports(package_dir)
    assert [str(i) for i in imports] == [
        "model.py:1 imports errors.py",
        "model.py:2 imports sub/parts.py",
        "sub/parts.py:1 imports errors.py",
        "trainer.py:1 imports model.py",
        "trainer.py:2 imports __init__.py",
    ]
    assert upward_imports(imports, read_layers(PLANTED_LAYERS)) == []
    assert import_circle(imports) == []


def test_checker_reports_an_import_circle(tmp_path):
    package_dir = plant(
        tmp_path,
        {
            "errors.py": "",
            "trainer.py": "",
            "model.py": "from neoxlab.sub.parts import part\n",
            "sub/parts.py": "def f():\n    from neoxlab import model\n",
        },
    )
    circle = import_circle(package_imports(package_dir))
    assert describe_circle(circle) == "import circle: model.py:1 -> sub/parts.py:2 -> model.py"


MAX_FUNCTION_LINES = 60  # a function a reader takes in at once (issue 16)


def long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than `limit` lines."""
    return [
        (node.name, node.lineno, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_is_longer_than_a_screen():
    too_long = [
        f"{path.relative_to(PACKAGE_DIR)}:{line} {name} is {length} lines"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for name, line, length in long_functions(path.read_text(), MAX_FUNCTION_LINES)
    ]
    assert not too_long, f"split these (at most {MAX_FUNCTION_LINES} lines): {too_long}"


def test_the_length_check_sees_methods_and_nested_functions():
    def body(indent: str, lines: int = 60) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))

    source = (
        f"class A:\n    def method(self):\n{body(' ' * 8)}\n"
        f"def outer():\n    def inner():\n{body(' ' * 8)}\n"
        f"def short():\n{body(' ' * 4, 59)}"  # 60 lines: the limit itself is allowed
    )
    assert sorted(name for name, _, _ in long_functions(source, 60)) == ["inner", "method", "outer"]
