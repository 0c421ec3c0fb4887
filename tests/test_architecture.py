"""The layout's rules, checked on the source: no import cycles in prm_ray, no private names imported
across modules, imports at the top of modules except the heavy optional ones, and the paper's math
(prm_ray.core) free of Ray and of the rest of the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prm_ray"
# Imported inside a function on purpose: optional packages (loggers), engine-only and
# worker-only heavy imports (vLLM, math-verify, sympy), Ray's autoscaler internals (the pre-flight
# check only), and the package's lazy public names.
LAZY_OK = ("vllm", "tensorboardX", "wandb", "mlflow", "math_verify", "sympy", "ray.autoscaler", "prm_ray.scoring")
# The rollout and step-label stages also run in light processes (verifier actors, writer tasks):
# their torch-based imports (tokenizers, models) sit in the engine actor's and the driver's code.
# The training package's names are lazy so its pure-PyTorch step imports without Ray (GPU nodes).
LAZY_IN = {"prm_ray.stages.rollout": ("prm_ray.models", "prm_ray.tokens"),
           "prm_ray.stages.shepherd": ("prm_ray.models", "prm_ray.tokens"),
           "prm_ray.stages.train": ("prm_ray.stages.train.config", "prm_ray.stages.train.driver")}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(root: Path) -> dict[str, ast.Module]:
    return {_module_name(p, root): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


MODULES = _sources(PACKAGE)


def _imports(tree: ast.Module):
    """(node, imported module, names, inside a function?) for every import statement."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child, alias.name, [], inner
            elif isinstance(child, ast.ImportFrom) and child.module:
                yield child, child.module, [a.name for a in child.names], inner
            yield from visit(child, inner)
    yield from visit(tree, False)


def _targets(module: str, names: list[str]) -> list[str]:
    """The prm_ray modules an import statement loads (``from pkg import submodule`` counts)."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or ([module] if module in MODULES else [])


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, tree in MODULES.items():
        for _, module, names, _ in _imports(tree):
            graph[name].update(t for t in _targets(module, names) if t != name)
    return graph


def test_there_are_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    bad = []
    for name, tree in MODULES.items():
        for node, module, names, _ in _imports(tree):
            if module.startswith("prm_ray") and module != name:
                bad += [f"{name}:{node.lineno} imports {module}.{n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_imports_are_at_the_top_except_the_heavy_optional_ones():
    bad = []
    for name, tree in MODULES.items():
        for node, module, names, inner in _imports(tree):
            loaded = [module] + [f"{module}.{n}" for n in names]
            allowed = LAZY_OK + LAZY_IN.get(name, ())
            if inner and not any(m.startswith(allowed) for m in loaded):
                bad.append(f"{name}:{node.lineno} imports {module} inside a function")
    assert not bad, "\n".join(bad)


def test_the_math_core_is_pure():
    """prm_ray.core: PyTorch and Python only (no Ray), and nothing from the rest of the package."""
    bad = []
    for name, tree in MODULES.items():
        if not name.startswith("prm_ray.core"):
            continue
        for node, module, _, _ in _imports(tree):
            if module.split(".")[0] == "ray" or (module.startswith("prm_ray") and not module.startswith("prm_ray.core")):
                bad.append(f"{name}:{node.lineno} imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["bench", "jobs"])
def test_benches_and_jobs_use_public_names_only(folder):
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node, module, names, _ in _imports(ast.parse(path.read_text())):
            if module.startswith("prm_ray"):
                bad += [f"{path.name}:{node.lineno} imports {module}.{n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_jobs_stay_thin():
    """A job parses its config and calls one function of the package: no logic of its own."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        assert len(path.read_text().splitlines()) <= 60, f"{path.name} has grown; move its logic into prm_ray"


def test_the_rollout_and_step_label_stages_import_without_torch():
    """Their verifier actors and writer tasks import these modules: without torch they start in
    about a second instead of several (the engine actor and the driver load it when they need it)."""
    code = "import sys, prm_ray.stages.rollout, prm_ray.stages.shepherd; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
