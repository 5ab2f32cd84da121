"""The requirements are complete: every package the app, the engine and the tests import comes from a
distribution that requirements.txt or requirements-dev.txt asks for (directly, or as what it needs).

The real proof is CI: scripts/test.sh installs into a fresh virtual environment of its own. This test
catches the same mistake earlier, on any machine: an import that only works because this machine's
Python happens to have the package.
"""
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# our own top-level names: the packages, and every module in tests/ (pytest puts each test folder on
# sys.path, so a helper beside the tests, like tests/browser/actions.py, is imported by its bare name)
OURS = {"sft", "ui", "pages", "app"} | {path.stem for path in (ROOT / "tests").rglob("*.py")}
BUILT_BY_TEST_SCRIPT = {"llama_cpp"}  # scripts/test.sh builds llama-cpp-python from source


def requirement_names(path):
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def with_dependencies(names):
    """``names`` and every distribution they require, as installed here."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[<>=!~\[; (]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return seen


def imported_modules():
    files = [ROOT / "app.py", *(ROOT / "pages").glob("*.py"), *(ROOT / "ui").glob("*.py"),
             *(ROOT / "sft").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path.relative_to(ROOT))
    return found


def test_every_import_is_a_declared_requirement():
    declared = with_dependencies(requirement_names(ROOT / "requirements-dev.txt"))
    providers = metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules().items():
        if module in OURS or module in BUILT_BY_TEST_SCRIPT or module in sys.stdlib_module_names or \
                module.startswith("test_") or module == "__future__":
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (str(where), sorted(dists) or "not installed")
    assert not missing, f"imported but not in requirements*.txt: {missing}"


def test_pandas_spearman_has_scipy_declared():
    """pandas imports scipy only inside .corr(method="spearman") (the Judge page's agreement):
    no import statement shows it, so it is checked by name."""
    assert "scipy" in requirement_names(ROOT / "requirements.txt")
