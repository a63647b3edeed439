"""Packaging: declared dependencies match the imports under src/, their floors are installed, the wheel ships the
configs.

- Every third-party module that src/emu_lightning imports is declared in [project] dependencies (a module imported
  only inside a function may instead be declared in an optional extra).
- Every dependency (and extra) declares a floor, and every floor is at most the installed version: a floor above
  what the tests run with is a claim nobody tested.
- The core library never imports the ShapesWorld toy package: only emu_lightning/shapesworld/ itself and the demo
  (which runs on it) do; configs and tests name it.
- The wheel holds every module of src/emu_lightning and configs/**/*.yaml as emu_lightning/configs/**/*.yaml, so an
  installed package runs e.g. ``python -m emu_lightning.demo --config <site-packages>/emu_lightning/configs/tiny.yaml``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "emu_lightning"
CONFIGS = ROOT / "configs"


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    project = _project()
    deps = [Requirement(r) for r in project["dependencies"]]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project.get("optional-dependencies", {}).items()}
    return deps, extras


class _Imports(ast.NodeVisitor):
    """Top-level names of absolute imports, split into module-level ones and those inside a function (lazy)."""

    def __init__(self) -> None:
        self.depth = 0
        self.eager: set[str] = set()
        self.lazy: set[str] = set()

    def _add(self, name: str) -> None:
        (self.lazy if self.depth else self.eager).add(name.split(".")[0])

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module)


def _third_party_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """{module: files} of third-party modules imported at module level, and of those imported only lazily."""
    eager: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    files = sorted(SRC.rglob("*.py"))
    assert files, SRC
    for path in files:
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        rel = str(path.relative_to(ROOT))
        for names, into in ((visitor.eager, eager), (visitor.lazy, lazy)):
            for name in names:
                if name in sys.stdlib_module_names or name == "emu_lightning":
                    continue
                into.setdefault(name, set()).add(rel)
    return eager, {name: where for name, where in lazy.items() if name not in eager}


def test_every_third_party_import_is_declared():
    deps, extras = _requirements()
    declared = {canonicalize_name(r.name) for r in deps}
    in_extras = {canonicalize_name(r.name) for reqs in extras.values() for r in reqs}
    providers = md.packages_distributions()
    eager, lazy = _third_party_imports()
    assert "torch" in eager and "braceexpand" in eager, "the import scan found too little"
    problems = []
    for modules, allowed, where_ok in ((eager, declared, "[project] dependencies"),
                                       (lazy, declared | in_extras, "[project] dependencies or an extra")):  # fmt: skip
        for module, files in sorted(modules.items()):
            dists = {canonicalize_name(d) for d in providers.get(module, ())}
            if not dists:
                problems.append(f"{module} (imported in {sorted(files)}) is not installed: no distribution provides it")
            elif not dists & allowed:
                problems.append(f"{module} (imported in {sorted(files)}, from {sorted(dists)}) is not in {where_ok}")
    assert not problems, "\n".join(problems)


def test_every_floor_is_declared_and_installed():
    deps, extras = _requirements()
    problems = []
    for where, reqs in [("dependencies", deps)] + [(f"extra {name!r}", reqs) for name, reqs in extras.items()]:
        for req in reqs:
            floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
            if not floors:
                problems.append(f"{where}: {req} declares no floor")
                continue
            try:
                installed = Version(md.version(req.name))
            except md.PackageNotFoundError:
                problems.append(f"{where}: {req} is not installed")
                continue
            if max(floors) > installed or not req.specifier.contains(installed, prereleases=True):
                problems.append(f"{where}: {req} but {installed} is installed")
    assert not problems, "\n".join(problems)


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (so that no build/ folder lands in the checkout), without build
    isolation or the network: setuptools is in the dev extra."""
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(SRC, project / "src" / "emu_lightning", ignore=ignore)
    shutil.copytree(CONFIGS, project / "configs", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, project / name)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "-w", str(dist), str(project)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("emu_lightning-*.whl")
    return wheel


def test_wheel_ships_the_modules_and_configs(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        configs = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
        assert {"tiny.yaml", "stages/pretrain.yaml", "stages/decoder.yaml", "stages/instruct.yaml"} <= set(configs)
        assert any(c.startswith("eval/") for c in configs) and any(c.startswith("ablations/") for c in configs)
        missing = [c for c in configs if f"emu_lightning/configs/{c}" not in names]
        assert not missing, f"configs missing from the wheel: {missing}"
        assert zf.read("emu_lightning/configs/tiny.yaml") == (CONFIGS / "tiny.yaml").read_bytes()
        # A subpackage left out of pyproject.toml's explicit package list would be missing here.
        modules = sorted(p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*.py"))
        missing = [m for m in modules if m not in names]
        assert not missing, (
            f"modules missing from the wheel (add their package to [tool.setuptools] packages): {missing}"
        )
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in zf.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.startswith("Requires-Dist: transformers>=5") for line in requires), requires
    assert any(line.startswith("Requires-Dist: braceexpand") for line in requires), requires


TOY = "emu_lightning.shapesworld"
MAY_IMPORT_TOY = ("shapesworld/", "demo.py")
"""Paths under src/emu_lightning that may import :data:`TOY`: the package itself and the demo."""


def _package(path: Path) -> tuple[str, ...]:
    """The package a file under src/ belongs to, e.g. ``("emu_lightning", "eval")`` for eval/callbacks.py."""
    return path.relative_to(SRC.parent).parent.parts


def _imported_modules(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in a module's source, anywhere in it (module level or inside a function):
    relative imports resolved against ``package``, ``from a import b`` counted as ``a.b`` too (``b`` may be a
    module), and ``importlib.import_module("...")`` with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _imports_toy(module: str) -> bool:
    return module == TOY or module.startswith(f"{TOY}.")


def test_the_scan_sees_every_spelling_of_an_import_of_the_toy_package():
    sample = (
        "import emu_lightning.shapesworld\n"
        "from emu_lightning.shapesworld.world import ShapesWorld\n"
        "from emu_lightning import shapesworld\n"
        "from ..shapesworld import corpus\n"
        "def f():\n"
        "    from emu_lightning.shapesworld import writers\n"
        "    return importlib.import_module('emu_lightning.shapesworld.eval')\n"
        "from emu_lightning.data import StreamingDataModule\n"
        "from emu_lightning import shapes_world_notes\n"
        "from . import shapesworld_like\n"
        "text = 'from emu_lightning.shapesworld import ShapesWorld'\n"
    )
    hits = {line for line, module in _imported_modules(sample, ("emu_lightning", "eval")) if _imports_toy(module)}
    assert sorted(hits) == [1, 2, 3, 4, 6, 7]


def test_the_library_never_imports_shapesworld():
    """ShapesWorld is a package of its own: nothing in the core library (data/, eval/, model.py, tokenizer.py, ...)
    imports it, so that a real run cannot reach the toy world by a default; only the package itself and the demo do."""
    files = sorted(SRC.rglob("*.py"))
    assert any(p.relative_to(SRC).as_posix() == "shapesworld/__init__.py" for p in files), "no shapesworld package"
    problems, allowed_hits = [], 0
    for path in files:
        rel = path.relative_to(SRC).as_posix()
        imports = _imported_modules(path.read_text(encoding="utf-8"), _package(path))
        hits = [f"{rel}:{line} imports {module}" for line, module in imports if _imports_toy(module)]
        if rel.startswith(MAY_IMPORT_TOY):
            allowed_hits += len(hits)
        else:
            problems += hits
    assert allowed_hits, "the scan found no import of the toy package even where it is expected (demo.py)"
    assert not problems, "\n".join(problems)
