"""Every collective in trainer/ gets a tensor on the device its process group serves.

NCCL (the backend on GPUs) cannot reduce CPU tensors, and gloo on CPU accepts anything, so a
CPU run can never show the mistake: a flag built with `torch.tensor([...])` and all-reduced
works here and stops every GPU run at its first step. This test reads the code instead. For
each collective call it finds the tensor argument and the assignment that made it; a tensor
made by a factory (`torch.tensor`, `torch.zeros`, ...) without `device=` and never moved
(`.to(...)`) is a violation. Tensors that come in as arguments (the losses' features) are the
caller's: they live where the model put them. tests/gpu runs the same paths on a GPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "all_to_all_single", "_all_gather_single", "_reduce_scatter_single",
}  # fmt: skip
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor", "from_numpy"}


def _is_factory_without_device(node: ast.AST) -> bool:
    """torch.<factory>(...) with no device= keyword."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in FACTORIES
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and not any(k.arg == "device" for k in node.keywords)
    )


def _last_assignment(func: ast.AST, name: str, before: int) -> ast.AST | None:
    """The value last assigned to `name` in `func` on a line before `before`."""
    found = None
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and node.lineno < before:
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                hit = any(isinstance(t, ast.Name) and t.id == name for t in names)
                if hit and (found is None or node.lineno > found.lineno):
                    found = node
    return found.value if found is not None else None


def violations(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for call in ast.walk(func):
                if not (isinstance(call, ast.Call) and call.args):
                    continue
                name = getattr(call.func, "attr", None) or getattr(call.func, "id", None)
                if name not in COLLECTIVES:
                    continue
                arg = call.args[0]
                if isinstance(arg, ast.Name):
                    arg = _last_assignment(func, arg.id, call.lineno) or arg
                if _is_factory_without_device(arg):
                    where = f"{path.relative_to(root.parent)}:{call.lineno} ({func.name})"
                    out.append(f"{where}: {name} of a tensor made without device=")
    return out


def test_every_collective_tensor_is_made_on_the_group_device():
    assert violations(TRAINER) == []


def test_the_check_catches_a_cpu_flag(tmp_path):
    """The pattern every GPU run died of: a flag made on the CPU, then all-reduced."""
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import torch\nimport torch.distributed as dist\n\n"
        "def agreed(requested):\n"
        "    flag = torch.tensor([float(requested)])\n"
        "    dist.all_reduce(flag)\n"
        "    return flag.item()\n\n"
        "def fine(requested, device):\n"
        "    flag = torch.tensor([float(requested)], device=device)\n"
        "    dist.all_reduce(flag)\n"
    )
    assert [v.split(":")[0] for v in violations(pkg)] == ["trainer/bad.py"]
