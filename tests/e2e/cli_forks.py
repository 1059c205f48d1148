"""Run many CLI invocations cheaply: import the CLI once, then fork one child per invocation.

    python -m tests.e2e.cli_forks CASES.json RESULTS.json

CASES.json: [{"name", "argv"}], argv[0] being "train" (`python -m trainer.train`) or "cli"
(`disco-clip`). Each child is a real process with its own stdout/stderr and exit code, running
the same `main(argv)` as the console entry; only the interpreter start-up and imports (seconds
each on two cores) are shared. RESULTS.json: {name: {"code", "stdout", "stderr"}}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

PARALLEL = 3


def _child(argv: list[str], out: Path, err: Path) -> None:
    """In the fork: point fd 1/2 at files, run the entry, exit with its code like `python -m`."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    code = 1
    try:
        if argv[0] == "train":
            from trainer.train import main
        else:
            from trainer.cli import main
        code = main(argv[1:])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()  # what the interpreter would print
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    import trainer.cli
    import trainer.train

    trainer.cli.build_parser()  # imports every subcommand's module: the expensive part, once

    work = Path(tempfile.mkdtemp(prefix="cli-forks-"))
    results, running, todo = {}, {}, list(cases)
    while todo or running:
        while todo and len(running) < PARALLEL:
            case = todo.pop(0)
            out, err = work / f"{case['name']}.out", work / f"{case['name']}.err"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case["argv"], out, err)
            running[pid] = (case["name"], out, err)
        pid, status = os.wait()
        name, out, err = running.pop(pid)
        results[name] = {"code": os.waitstatus_to_exitcode(status),
                         "stdout": out.read_text(errors="replace"),
                         "stderr": err.read_text(errors="replace")}  # fmt: skip
    Path(sys.argv[2]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
