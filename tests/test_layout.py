"""The shape of the code: no import cycles, parts that stand alone, a README that maps the tree."""
import ast
import re

from conftest import ROOT

PACKAGES = ("variants", "runner")


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str, path) -> set[str]:
    """Every project module this one imports, at the top or inside a function (a lazy import is still a
    dependency). `from pkg import mod` counts as importing pkg.mod when that is a module."""
    known, found = modules(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    graph = {name: imports(name, path) for name, path in modules().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package's __init__ re-exporting its modules is not a cycle unless a module imports the package back
    cycles = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_parts_library_stands_alone():
    """variants/ is importable into anyone's code: no Hydra, no OmegaConf, nothing from runner/."""
    for name, path in modules().items():
        if not name.startswith("variants"):
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        bad = {m for m in names if m.split(".")[0] in ("hydra", "omegaconf", "runner")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = re.search(r"## Layout\n+```\n(.*?)```", readme, re.S).group(1)
    for path in sorted((ROOT / "runner").rglob("*.py")) + sorted((ROOT / "variants").glob("*.py")):
        if path.name == "__init__.py" and path.parent.name in PACKAGES:
            continue
        shown = path.name if path.name != "__init__.py" else f"{path.parent.name}/"
        assert shown in layout, f"README's Layout section does not mention {path.relative_to(ROOT)}"
    for folder in (p for p in (ROOT / "runner").iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"{folder.name}/" in layout, f"README's Layout section does not mention runner/{folder.name}/"


def test_report_page_assets_are_package_files():
    from runner.report.html import _asset
    assert "function" in _asset("report.js") and "{" in _asset("report.css")
    assert not re.search(r"function\s*\(", (ROOT / "runner/report/html.py").read_text())  # no JS in Python
