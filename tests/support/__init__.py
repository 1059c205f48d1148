"""Helpers shared by the tests and the benches: the one place where bench/ reaches into tests/.

Tests import the submodules directly; bench/ imports only the names re-exported here, so the
dependency between the two folders is this one small, listed interface:

- `run_ranks` (localdist.py): a function on N local gloo processes.
- `peak_tensor_bytes` (memory.py): peak live tensor bytes of a call on CPU.
- `run_training`, `losses`, `DEBUG_CONFIG` (runs.py): a real training launch and its curve.
- `Job`, `launcher_prefix` (faults.py): a training job that can be killed on purpose.
"""

from tests.support.faults import Job, launcher_prefix
from tests.support.localdist import run_ranks
from tests.support.memory import peak_tensor_bytes
from tests.support.runs import DEBUG_CONFIG, losses, run_training

__all__ = [
    "DEBUG_CONFIG",
    "Job",
    "launcher_prefix",
    "losses",
    "peak_tensor_bytes",
    "run_ranks",
    "run_training",
]
