"""The package's data flows one way: no module imports a layer above its own, nothing imports
the commands, and inside a subpackage a module imports only the modules listed before it.

The check reads the import statements of every file under ``robusttrain/`` with ``ast`` (imports
inside functions included), so it needs no imports of its own and names the offending line.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "robusttrain"

# bottom to top: a module may import its own layer and the layers before it
LAYERS = ["files", "data", "models", "noise", "zo", "training", "evaluation", "comparison",
          "commands"]

# inside a subpackage, bottom to top: a module may import only the modules before it
MODULE_ORDER = {
    "data": ["formats", "sources", "datamodules"],
    "noise": ["seeds", "weight", "pcm", "deployment", "chip"],
    "zo": ["perturbations", "coefficients", "arguments", "estimators", "node", "population",
           "parallel"],
    "training": ["checkpoints", "divergence", "wall_clock", "base", "backprop", "zeroth_order",
                 "noise_injection", "quantization_aware", "hardware_aware", "chip_in_the_loop",
                 "modules", "predict", "option_errors", "lightning_cli"],
    "evaluation": ["statistics", "robustness", "report", "deployment", "attack", "zo_l2l"],
    "comparison": ["config", "report", "evaluation_cache", "runner", "deployment"],
    "commands": ["errors", "robustness", "compare", "attack", "meta_train", "main"],
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``robusttrain`` module the file imports, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from robusttrain import data` and `from robusttrain.zo import population` import
            # the named submodules; a name that is not a module is attributed to `module` itself
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                parts = candidate.split(".")[1:]
                is_module = (PACKAGE.joinpath(*parts).with_suffix(".py").is_file()
                             or PACKAGE.joinpath(*parts, "__init__.py").is_file())
                found.append((node.lineno, candidate if is_module else module))
    return [(line, m) for line, m in found if m == "robusttrain" or m.startswith("robusttrain.")]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in _sources():
        parts = _module_name(path).split(".")
        if len(parts) == 1 or parts[1] == "__main__":
            continue  # the package itself and `python -m robusttrain`
        assert parts[1] in LAYERS, f"{path}: place {parts[1]!r} in LAYERS (bottom to top)"
        if len(parts) == 3:
            assert parts[2] in MODULE_ORDER[parts[1]], (
                f"{path}: place {parts[2]!r} in MODULE_ORDER[{parts[1]!r}] (bottom to top)")


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in _sources():
        own = _module_name(path).split(".")
        if len(own) == 1 or own[1] == "__main__":
            continue
        for line, module in _imported_modules(path):
            target = module.split(".")
            if len(target) < 2:
                violations.append(f"{path}:{line} imports the package root {module}")
                continue
            if LAYERS.index(target[1]) > LAYERS.index(own[1]):
                violations.append(f"{path}:{line} ({own[1]}) imports {module} ({target[1]}, above)")
    assert not violations, "\n".join(violations)


def test_inside_a_subpackage_modules_import_only_those_below_them():
    violations = []
    for path in _sources():
        own = _module_name(path).split(".")
        if len(own) != 3:
            continue  # the subpackages' __init__ files import their modules
        order = MODULE_ORDER[own[1]]
        for line, module in _imported_modules(path):
            target = module.split(".")
            if target[:2] != own[:2]:
                continue
            if len(target) == 2:
                violations.append(f"{path}:{line} imports its own package {module} (a cycle)")
            elif order.index(target[2]) >= order.index(own[2]):
                violations.append(f"{path}:{line} imports {module}, not below {own[2]}")
    assert not violations, "\n".join(violations)


def test_nothing_imports_the_commands():
    importers = [
        f"{path}:{line} imports {module}"
        for path in _sources()
        if _module_name(path).split(".")[1:2] not in (["commands"], ["__main__"])
        for line, module in _imported_modules(path)
        if module.startswith("robusttrain.commands")
    ]
    assert not importers, "\n".join(importers)


def test_the_parser_sees_the_imports():
    # the checks above would pass vacuously if the parser found nothing
    found = [m for _, m in _imported_modules(PACKAGE / "comparison" / "runner.py")]
    assert "robusttrain.training.lightning_cli" in found and "robusttrain.evaluation" in found
    assert ("robusttrain.commands.robustness"
            in [m for _, m in _imported_modules(PACKAGE / "commands" / "main.py")])


def test_importing_the_package_imports_nothing_heavy():
    code = ("import sys, robusttrain; "
            "print(sorted(m for m in sys.modules if m.startswith(('robusttrain.', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
