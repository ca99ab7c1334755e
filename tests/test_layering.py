"""Imports run one way. Every module's imports are read with ast (imports inside functions and
`importlib.import_module("...")` calls included) and checked against these layers:

| layer   | modules                                              | may import, besides itself              |
|---------|------------------------------------------------------|-----------------------------------------|
| base    | mmedit (the package), mmedit.errors, .safefile,      | -                                       |
|         | .provenance, .progress, .modelstate, .distributed,   |                                         |
|         | .logs                                                |                                         |
| data    | mmedit.data                                          | base                                    |
| arch    | mmedit.arch                                          | base, data                              |
| loading | mmedit.loading                                       | base, arch                              |
| trace   | mmedit.trace                                         | base, data, arch                        |
| delta   | mmedit.delta, mmedit.checkpoint                      | base, arch, loading                     |
| zoo     | mmedit.zoo                                           | base, arch, loading                     |
| eval    | mmedit.eval                                          | base, data, arch, loading, trace, delta |
| bench   | mmedit.bench                                         | base, data, arch, loading, zoo, eval    |
| plugins | mmedit.plugins (plugins/)                            | any core layer                          |
| cli     | mmedit.cli (cli/)                                    | anything                                |

What the pipeline order data -> arch -> trace -> plugins -> delta -> eval means for imports: data feeds
the model map, tracing and the plugins; a plugin's edit comes out as a delta (apply_plugin builds it), so
the plugins sit *above* delta and import it, while delta (the format and its exact apply / revert /
merge / diff) needs only the model map to place tensors and loading to read checkpoints. trace and delta
are siblings: neither imports the other (the delta format needs no nnsight). eval scores models with
deltas applied, on top of the core; bench (the synthetic benchmark and the embedded model, which is
trained and checked with eval) above it; zoo (tiny random models of each family, for tests) builds on
loading and arch. The core (everything in mmedit/) never imports mmedit.plugins or mmedit.cli; the plugins
never import mmedit.cli; the CLI is on top.

The one edge up inside the core: the package itself re-exports `mmedit.Delta` and `mmedit.load` lazily
(importing mmedit loads only mmedit.errors), so mmedit/__init__.py may import the delta layer (FACADE).
`python -m mmedit` (mmedit/__main__.py, ENTRY) is the command line itself, on top like mmedit.cli.

Plugins: a plugin (each `mmedit.plugins` entry point in pyproject.toml names one module or package)
never imports another plugin, and the shared plugin modules (base, registry, apply, training...)
import none; of mmedit.trace a plugin uses only the names mmedit.trace exports (`__all__`), never
mmedit.trace.tracer or mmedit.trace.stats.

Size: the .py files of arch, trace and delta hold at most SIZE_LIMIT lines together.
"""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = CONFIG["tool"]["setuptools"]["package-dir"]  # package -> folder: mmedit, mmedit.plugins, mmedit.cli
CORE, PLUGINS, CLI = "mmedit", "mmedit.plugins", "mmedit.cli"
LAYERS = {  # layer -> (its modules and packages, the layers it may import); a layer only names earlier ones
    "base": (("mmedit", "mmedit.errors", "mmedit.safefile", "mmedit.provenance", "mmedit.progress",
              "mmedit.modelstate", "mmedit.distributed", "mmedit.logs"), ()),
    "data": (("mmedit.data",), ("base",)),
    "arch": (("mmedit.arch",), ("base", "data")),
    "loading": (("mmedit.loading",), ("base", "arch")),
    "trace": (("mmedit.trace",), ("base", "data", "arch")),
    "delta": (("mmedit.delta", "mmedit.checkpoint", "mmedit.export"), ("base", "arch", "loading")),
    "zoo": (("mmedit.zoo",), ("base", "arch", "loading")),
    "plan": (("mmedit.plan",), ("base", "data", "arch", "loading")),
    "eval": (("mmedit.eval",), ("base", "data", "arch", "loading", "trace", "delta")),
    "bench": (("mmedit.bench",), ("base", "data", "arch", "loading", "zoo", "eval")),
}
FACADE = {("mmedit", "delta")}  # (module, layer): the package's lazy mmedit.Delta / mmedit.load
ENTRY = "mmedit.__main__"  # python -m mmedit: the command line
SIZE_LIMIT = 1520  # lines of arch + trace + delta together: the core stays small (1500 until device maps, 2026-12-06)


def _modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))
            found[name] = path
    return found


MODULES = _modules()


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every mmedit import in `source`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                whole = f"{base}.{alias.name}"
                found.append((node.lineno, whole, None) if whole in MODULES else (node.lineno, base, alias.name))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value), None))
    return [entry for entry in found if entry[1] == CORE or entry[1].startswith(CORE + ".")]


def layer_of(module: str) -> str | None:
    """The layer of a core module: its longest listed prefix (the bare package only matches itself)."""
    best = None
    for layer, (names, _) in LAYERS.items():
        for name in names:
            if (module == name or (name != CORE and module.startswith(name + "."))) and (
                    best is None or len(name) > len(best[1])):
                best = (layer, name)
    return best and best[0]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _plugin_packages() -> tuple[str, ...]:
    """The module or package each `mmedit.plugins` entry point names."""
    entries = CONFIG["project"]["entry-points"][PLUGINS]
    return tuple(sorted({value.split(":")[0] for value in entries.values()}))


def _trace_exports() -> set[str]:
    tree = ast.parse(MODULES["mmedit.trace"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("mmedit/trace/__init__.py has no __all__")


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every backward import in `source` (the text of `module`), as 'module:line imports X (why)'."""
    problems = []
    plugins = _plugin_packages()
    own_plugin = next((plugin for plugin in plugins if _within(module, plugin)), None)
    for line, target, name in imports(source, module, is_package):
        where = f"{module}:{line} imports {target}"
        if _within(module, CLI) or module == ENTRY:
            continue
        if _within(target, CLI):
            problems.append(f"{where} (only the CLI imports the CLI)")
        elif _within(module, PLUGINS):
            other = next((plugin for plugin in plugins if _within(target, plugin)), None)
            if other is not None and other != own_plugin:
                problems.append(f"{where} (a plugin never imports another plugin, nor does the plugin framework)")
            elif _within(target, "mmedit.trace") and (
                    target != "mmedit.trace" or (name is not None and name not in _trace_exports())):
                what = where if name is None else f"{module}:{line} imports {name} from {target}"
                problems.append(f"{what} (plugins use only what mmedit.trace exports: "
                                f"{', '.join(sorted(_trace_exports()))})")
        elif _within(target, PLUGINS):
            problems.append(f"{where} (the core never imports the plugins)")
        else:
            mine, theirs = layer_of(module), layer_of(target)
            if mine is None or theirs is None:
                problems.append(f"{where} ({module if mine is None else target} is in no layer: add it to LAYERS)")
            elif theirs != mine and theirs not in LAYERS[mine][1] and (module, theirs) not in FACADE:
                problems.append(f"{where} (layer {mine} may import {', '.join(LAYERS[mine][1]) or 'nothing'}, "
                                f"not {theirs})")
    return list(dict.fromkeys(problems))  # `from x import a, b` is one import


def test_the_layers_are_one_way():
    """Each layer imports only layers listed before it, so the table is an order, not a cycle."""
    order = list(LAYERS)
    for index, (layer, (_, allowed)) in enumerate(LAYERS.items()):
        assert set(allowed) <= set(order[:index]), layer
    for module, layer in FACADE:
        assert layer_of(module) == "base" and layer in LAYERS


def test_every_core_module_has_a_layer():
    assert [name for name in MODULES if _within(name, CORE) and not _within(name, PLUGINS)
            and not _within(name, CLI) and name != ENTRY and layer_of(name) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_backward_import(module):
    path = MODULES[module]
    assert violations(module, path.read_text(encoding="utf-8"), path.name == "__init__.py") == []


@pytest.mark.parametrize("module, source, why", [
    ("mmedit.bench.demo", "def run():\n    from mmedit.plugins import apply_plugin\n", "never imports the plugins"),
    ("mmedit.data.rows", "import mmedit.cli.common\n", "only the CLI"),
    ("mmedit.data.rows", "import importlib\nimportlib.import_module('mmedit.trace')\n", "may import base"),
    ("mmedit.trace.tracer", "from mmedit.delta import Delta\n", "not delta"),
    ("mmedit.delta.core", "from mmedit.eval import harness\n", "not eval"),
    ("mmedit.eval.report", "from ..bench import model\n", "not bench"),
    ("mmedit.plugins.ga", "from mmedit.plugins import rmu\n", "another plugin"),
    ("mmedit.plugins.mip_editor.paths", "from mmedit.plugins.rmu import plugin\n", "another plugin"),
    ("mmedit.plugins.training", "def f():\n    from mmedit.plugins.npo import plugin\n", "another plugin"),
    ("mmedit.plugins.manu", "from mmedit.trace.tracer import read_sites\n", "only what mmedit.trace exports"),
    ("mmedit.plugins.manu", "from mmedit.trace import stats\n", "only what mmedit.trace exports"),
    ("mmedit.plugins.manu", "from mmedit.trace import Accumulator\n", "only what mmedit.trace exports"),
    ("mmedit.plugins.rmu", "from mmedit.cli.common import err\n", "only the CLI"),
    ("mmedit.newthing", "from mmedit.errors import MmeditError\n", "in no layer"),
])
def test_the_check_catches_backward_imports(module, source, why):
    """The checker itself: each planted import is reported, with the rule it breaks."""
    found = violations(module, source, is_package=module in ("mmedit.plugins.manu",))
    assert len(found) == 1 and why in found[0], found


@pytest.mark.parametrize("module, source", [
    ("mmedit.plugins.mip_editor.search", "from .paths import NeuronPaths\nfrom mmedit.plugins.base import Plugin\n"),
    ("mmedit.plugins.manu", "from mmedit.trace import TraceStats, trace\nfrom mmedit.delta import Delta\n"),
    ("mmedit.eval.harness", "from mmedit.data.batches import IGNORE\nfrom mmedit.delta import Delta\n"),
    ("mmedit", "def __getattr__(name):\n    import mmedit.delta\n"),
    ("mmedit.cli.demo", "from mmedit.plugins import apply_plugin\nfrom mmedit.trace.tracer import trace\n"),
])
def test_the_check_allows_forward_imports(module, source):
    assert violations(module, source, is_package=module in ("mmedit", "mmedit.plugins.manu")) == []


def test_arch_trace_and_delta_stay_small():
    counted = {folder: sum(len(path.read_text(encoding="utf-8").splitlines())
                           for path in (ROOT / "mmedit" / folder).rglob("*.py")) for folder in ("arch", "trace", "delta")}
    assert sum(counted.values()) <= SIZE_LIMIT, counted
