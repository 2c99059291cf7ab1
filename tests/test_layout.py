"""The package's layout (issue 13): no import circle among the mixres modules, and no module that imports another
module's private names. Read from the source with ast, so function-level imports count as much as module-level
ones. Every violation is reported, each in the area of the module that makes it, not only the first."""
from __future__ import annotations

import ast
import importlib.machinery
import sys
from pathlib import Path

import pytest

PACKAGE = "mixres"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
# Modules built from C++ rather than read from a .py file: a checkout where the extension was never built has no
# file for them, yet `from . import _C` still names a module, not a private function.
COMPILED_MODULES = {f"{PACKAGE}._C"}
# The areas of the package, by who maintains them; a module belongs to the first prefix it starts with.
AREAS = {
    "models": (f"{PACKAGE}.models",),
    "apps": (f"{PACKAGE}.apps", f"{PACKAGE}.cli", f"{PACKAGE}.train", f"{PACKAGE}.evaluate", f"{PACKAGE}.demo",
             f"{PACKAGE}._args", f"{PACKAGE}._timing", f"{PACKAGE}.data", f"{PACKAGE}.datasets", f"{PACKAGE}.viz",
             f"{PACKAGE}.checkpoints", f"{PACKAGE}.image_files", f"{PACKAGE}.__main__"),
    "core": (PACKAGE,),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def is_module(name: str) -> bool:
    if name in COMPILED_MODULES or is_package(name):
        return True
    stem = ROOT.parent / name.replace(".", "/")
    return any(stem.with_name(stem.name + suffix).is_file()
               for suffix in [".py", *importlib.machinery.EXTENSION_SUFFIXES])


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def encloses(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def private_module(target: str, importer: str) -> str | None:
    """The private module or package on the way to ``target`` (``mixres._args`` for ``mixres._args.x``) that the
    importer is not part of, or None. The compiled extension is exempt: its name is the build's."""
    parts = target.split(".")
    for depth in range(2, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if is_private(parts[depth - 1]) and prefix not in COMPILED_MODULES and not encloses(prefix, importer):
            return prefix
    return None


def area(module: str) -> str:
    return next(name for name, prefixes in AREAS.items()
                if any(encloses(prefix, module) for prefix in prefixes))


class Import:
    """One import statement's consequences for the module that makes it."""

    def __init__(self, importer: str, path: Path, node: ast.Import | ast.ImportFrom):
        self.where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
        self.targets: set[str] = set()  # the mixres modules whose code this import runs
        self.private_names: list[str] = []  # private names (functions, modules...) taken from another module
        self.bound: dict[str, str] = {}  # local name -> the mixres module it is bound to
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    self.targets.add(alias.name)
                    self.bound[alias.asname or PACKAGE] = alias.name if alias.asname else PACKAGE
        else:
            source = self._absolute(importer, node)
            for alias in node.names if source is not None else []:
                submodule = f"{source}.{alias.name}"
                if alias.name != "*" and is_module(submodule):
                    self.targets.add(submodule)
                    self.bound[alias.asname or alias.name] = submodule
                else:
                    self.targets.add(source)
                    if is_private(alias.name):
                        self.private_names.append(submodule)
        for target in sorted(self.targets):
            private = private_module(target, importer)
            if private is not None:
                self.private_names.append(private)
        # Importing a.b.c first runs the packages a.b above it, unless they enclose the importer, whose own
        # packages are initialised before it.
        for target in list(self.targets):
            parts = target.split(".")
            for depth in range(2, len(parts)):
                parent = ".".join(parts[:depth])
                if not encloses(parent, importer):
                    self.targets.add(parent)

    @staticmethod
    def _absolute(importer: str, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module if node.module == PACKAGE or (node.module or "").startswith(PACKAGE + ".") else None
        package = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[Import]:
    return [Import(module, path, node) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def private_attributes(module: str, path: Path, imports: list[Import]) -> list[str]:
    """``other._name`` where ``other`` is bound to another mixres module: a private name read across modules."""
    bound = {name: target for statement in imports for name, target in statement.bound.items()}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and bound[node.value.id] != module and is_private(node.attr)
                and not is_module(f"{bound[node.value.id]}.{node.attr}")):
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} reads {bound[node.value.id]}.{node.attr}")
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """module -> the mixres modules it imports (directly, anywhere in its code), and where each edge is made."""
    files = source_files()
    graph: dict[str, set[str]] = {module: set() for module in files}
    where: dict[tuple[str, str], list[str]] = {}
    for module, path in files.items():
        for statement in imports_of(module, path):
            for target in statement.targets:
                if target in files and target != module:
                    graph[module].add(target)
                    where.setdefault((module, target), []).append(statement.where)
    return graph, where


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other, the cycles; iterative, sorted."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def cycles_by_area() -> dict[str, list[str]]:
    """Each import circle, described by its edges, under the area of every module on it."""
    graph, where = import_graph()
    found: dict[str, list[str]] = {name: [] for name in AREAS}
    for group in strongly_connected(graph):
        members = set(group)
        edges = [f"{a} -> {b} ({', '.join(where[a, b])})" for a in group for b in sorted(graph[a] & members)]
        description = f"circle among {', '.join(group)}:\n    " + "\n    ".join(edges)
        for name in sorted({area(module) for module in group}):
            found[name].append(description)
    return found


def private_imports_by_area() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in AREAS}
    for module, path in source_files().items():
        imports = imports_of(module, path)
        for statement in imports:
            found[area(module)] += [f"{statement.where} imports {name}" for name in statement.private_names]
        found[area(module)] += private_attributes(module, path, imports)
    return found


@pytest.mark.parametrize("area_name", AREAS)
def test_no_import_circle(area_name):
    circles = cycles_by_area()[area_name]
    assert not circles, f"{len(circles)} import circle(s) through the {area_name} area:\n" + "\n".join(circles)


@pytest.mark.parametrize("area_name", AREAS)
def test_no_private_name_is_imported_from_another_module(area_name):
    violations = private_imports_by_area()[area_name]
    assert not violations, (f"{len(violations)} private name(s) taken from another module in the {area_name} area:\n"
                            + "\n".join(violations))


def test_the_checker_sees_circles_private_names_and_function_level_imports(tmp_path, monkeypatch):
    """The checker itself, on a small package: it must find what it is there to find."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .b import helper\n")
    (package / "b.py").write_text("def helper():\n    from .sub.c import _secret\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("import mixres.a\n_secret = 1\n")
    (package / "d.py").write_text("from . import a as alias\nalias._hidden\nfrom ._e import f\n")
    (package / "_e.py").write_text("from . import _C\nf = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    graph, _ = import_graph()
    assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.sub.c", f"{PACKAGE}.sub"}
    assert strongly_connected(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.sub.c"]]
    violations = [line for lines in private_imports_by_area().values() for line in lines]
    assert violations == [f"{PACKAGE}/b.py:2 imports {PACKAGE}.sub.c._secret",
                          f"{PACKAGE}/d.py:3 imports {PACKAGE}._e", f"{PACKAGE}/d.py:2 reads {PACKAGE}.a._hidden"]
