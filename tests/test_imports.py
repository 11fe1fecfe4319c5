"""The module structure: layers import downwards only, no import cycles, no imports hidden in functions, and a
config is validated without loading the training stack."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from fed_fixtures import REPO

PACKAGES = ("fl_sd", "lightning_modules", "orchestrator")
#: Imports allowed inside functions: optional dependencies only (Flower, Ray, their backend modules, W&B).
OPTIONAL = {"flwr", "ray", "wandb", "orchestrator.flower_backend", "orchestrator.flower_app"}


def modules(root: Path = REPO) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        return [node.module]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1])
    target = f"{base}.{node.module}" if node.module else base
    # ``from . import x`` imports the submodule x
    return [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]


def _internal(target: str, known: dict[str, Path]) -> str | None:
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph(root: Path = REPO) -> tuple[dict[str, set[str]], list[str]]:
    """Module-level imports between fl-sd modules (TYPE_CHECKING blocks excluded), and the imports inside functions
    of orchestrator/ (fl_sd keeps torchvision out of the import of non-torchvision data sources)."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    in_functions = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        function_level = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                          for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_only:
                continue
            targets = _resolve(name, path, node)
            if id(node) in function_level:
                if name.startswith("orchestrator"):
                        in_functions += [f"{name}: {t}" for t in targets if t.split(".")[0] not in OPTIONAL
                                     and t not in OPTIONAL]
                continue
            for target in targets:
                internal = _internal(target, known)
                if internal and internal != name:
                    graph[name].add(internal)
    return graph, in_functions


def check_layers_and_cycles(graph: dict[str, set[str]]) -> None:
    order = {"fl_sd": 0, "lightning_modules": 1, "orchestrator": 2}
    for module, deps in graph.items():
        for dep in deps:
            assert order[dep.split(".")[0]] <= order[module.split(".")[0]], f"{module} imports {dep} (upwards)"
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_import_cycles_and_layers_point_down():
    check_layers_and_cycles(import_graph()[0])


def test_no_imports_inside_functions_except_optional_dependencies():
    _, in_functions = import_graph()
    assert in_functions == []


def test_the_import_checker_sees_cycles_upward_and_hidden_imports(tmp_path):
    """The checks above can fail: a cycle, an upward import and a function-level import, planted in a small tree."""
    import pytest

    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "orchestrator" / "a.py").write_text("from . import b\n")
    (tmp_path / "orchestrator" / "b.py").write_text("from .a import x\n\ndef f():\n    import numpy\n")
    graph, hidden = import_graph(tmp_path)
    with pytest.raises(AssertionError, match="import cycle: orchestrator.a -> orchestrator.b -> orchestrator.a"):
        check_layers_and_cycles(graph)
    assert hidden == ["orchestrator.b: numpy"]
    (tmp_path / "orchestrator" / "b.py").write_text("")
    (tmp_path / "fl_sd" / "c.py").write_text("import orchestrator.a\n")
    with pytest.raises(AssertionError, match="fl_sd.c imports orchestrator.a"):
        check_layers_and_cycles(import_graph(tmp_path)[0])


def test_config_validation_does_not_load_the_training_stack():
    code = ("import sys; sys.path.insert(0, '.'); from orchestrator.config import load_config; "
            "load_config('configs/smoke.yaml'); "
            "heavy = [m for m in ('pytorch_lightning', 'torchvision', 'torchmetrics', 'lightning_modules') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_misspelt_key_is_reported_before_torch_is_loaded(tmp_path):
    """``fl-sd`` checks the keys (command line and --config file) from orchestrator.schema alone: a typo costs no
    torch / Lightning / Flower / W&B import. The key checks stay exact: a valid key passes on to the full parser."""
    typo_yaml = tmp_path / "typo.yaml"
    typo_yaml.write_text("federation:\n  roundz: 3\n")
    for argv, needle in ((["--config", "configs/smoke.yaml", "--federation.roundz", "3"], "--federation.roundz"),
                         (["--config", "configs/smoke.yaml", "--data.num_client", "5"], "--data.num_client"),
                         (["--config", str(typo_yaml)], "config key federation.roundz: unknown key")):
        code = ("import sys; sys.path.insert(0, '.'); from orchestrator.main import main; "
                f"rc = main({argv!r}); "
                "print(rc, [m for m in ('torch', 'lightning', 'flwr', 'wandb') if m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == "2 []", (argv, out.stdout, out.stderr)
        assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    from orchestrator.schema import check_keys

    check_keys(["--model.options.width", "8", "--algorithm.ditto.lam", "2", "--algorithm.ditto", "{lam: 1}",
                "--flower.ray_init_args.num_cpus=2", "--data.synthetic.num_classes", "5", "--print_config"])
