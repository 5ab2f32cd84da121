"""The package's shape, read from the source (ast): two tiers, imports one way, no circles, small modules.

The book's stages are flat modules in sft/ (and the judge's small package); everything not in the
book lives in subpackages. The machinery imports the book's modules, never the reverse; leaves
import nothing of ours; no module imports another in a loop, counting imports inside functions.
"""
import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SFT = ROOT / "sft"
BOOK = {"sft.tokenizer", "sft.data", "sft.prompts", "sft.batching", "sft.model", "sft.download", "sft.weights",
        "sft.training", "sft.generation", "sft.lora", "sft.dpo", "sft.judge", "sft.judge.client", "sft.judge.stats"}
MACHINERY = ("sft.fast", "sft.studio", "sft.export", "sft.bench", "sft.cli", "sft.__main__")
LEAVES = {"sft.studio.files", "sft.studio.locks"}
MAX_LINES = 450


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in SFT.rglob("*.py")}


def _resolve(current, node):
    """Module names an import statement of module ``current`` refers to (ours only)."""
    package = current if MODULES[current].name == "__init__.py" else current.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "sft"]
    if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "sft":
        return []
    found = []
    for alias in node.names:  # `from . import kernels` names a module; `from .x import y` names x
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def import_graph():
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _resolve(name, node) if t in MODULES and t != name)
        graph[name] = edges
    return graph


GRAPH = import_graph()


def is_machinery(name):
    return name.startswith(MACHINERY)


def test_every_module_is_in_a_tier():
    unplaced = [m for m in MODULES if m != "sft" and m not in BOOK and not is_machinery(m)]
    assert not unplaced, f"modules in no tier (add them to BOOK, or move them into a subpackage): {unplaced}"


def test_the_books_modules_never_import_the_machinery():
    wrong = {m: sorted(t for t in GRAPH[m] if is_machinery(t)) for m in BOOK if m in GRAPH}
    assert not {m: t for m, t in wrong.items() if t}, wrong


def test_leaves_import_nothing_of_ours():
    for leaf in LEAVES:
        assert GRAPH[leaf] == set(), (leaf, GRAPH[leaf])


def test_fast_kernels_need_nothing_of_the_studio():
    for m in MODULES:
        if m.startswith("sft.fast"):
            assert not [t for t in GRAPH[m] if t.startswith(("sft.studio", "sft.cli", "sft.bench", "sft.export"))], m


def test_no_import_cycles():
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other in a loop: {cycles}"


def test_a_cycle_would_be_caught():
    """The checker itself: a made-up graph with a loop through a function-level import."""
    src = "def f():\n    from .worker import launch_worker\n"
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom))
    assert _resolve("sft.studio.runs", node) == ["sft.studio.worker"]


def test_no_module_is_over_the_size_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by responsibility (docs/ARCHITECTURE.md): {long}"


def test_model_py_shows_the_chapters_formulas():
    src = (SFT / "model.py").read_text(encoding="utf-8")
    for formula in ("attn_scores = queries @ keys.transpose(2, 3)",
                    "attn_scores.masked_fill_(mask_bool, -torch.inf)",
                    "torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)",
                    "var = x.var(dim=-1, keepdim=True, unbiased=False)",
                    "torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))"):
        assert formula in src, formula
    for fused in ("scaled_dot_product_attention", "F.layer_norm", "F.gelu"):
        assert fused not in src, f"model.py must keep the chapter's bodies; {fused} belongs in sft/fast"


@pytest.mark.slow
def test_train_help_lists_every_setting():
    from sft.studio.config import TrainConfig

    out = subprocess.run([sys.executable, "-m", "sft", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    missing = [f.name for f in fields(TrainConfig) if "--" + f.name.replace("_", "-") not in out]
    assert not missing, missing
