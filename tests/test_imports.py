"""The package's layout: no import circle between ttrl's modules at import time, and the light
modules (run directories, settings) load without torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ttrl"


def module_imports() -> dict[str, set[str]]:
    """ttrl module -> the ttrl modules it imports when it is imported (top level, not inside a
    function or an `if TYPE_CHECKING:` block)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = "ttrl." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ttrl"):
                deps.add(node.module if node.module != "ttrl" else f"ttrl.{node.names[0].name}")
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ttrl")}
        graph[name] = deps
    return graph


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert "ttrl.data" in graph["ttrl.trainer"] and "ttrl.console" in graph["ttrl.data"]  # the walk saw real edges


def test_run_directories_and_config_validation_do_not_load_torch():
    code = ("import sys, ttrl.rundir\n"
            "from ttrl.config import load_config\n"
            "load_config('demo', ['reward.contrast=true', 'algorithm.advantage=ppo'])\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
