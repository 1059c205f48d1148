"""Bad inputs at the command line (issue 9): each case is a real `python -m trainer.train` or
`disco-clip ...` process that must exit 2 with exactly one error line on stderr naming what is
wrong and what to do, no traceback, and must leave what is already on disk byte-for-byte as it
was (a run dir holding a checkpoint, an export dir, a dataset).

The processes run a few at a time (start-up is mostly imports) from one module fixture; each
case is then its own test. A failing case names the command and its stderr. Config parsing and
typing themselves are unit-tested in tests/unit/test_config.py.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.runs import DEBUG_CONFIG, REPO
from tests.support.runs import test_env as run_env

pytestmark = pytest.mark.slow

TRAIN = ["train"]  # `python -m trainer.train`
CLI = ["cli"]  # `disco-clip`
REAL = {  # how a user types them; the cases named in REAL_CASES run exactly so
    "train": [sys.executable, "-m", "trainer.train"],
    "cli": [str(Path(sys.executable).parent / "disco-clip")],
}
REAL_CASES = ("config-missing", "override-wrong-type", "export-no-out", "cli-unknown-command")


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]  # {w} is the case world dir, {data} the synthetic dataset
    expect: str  # a substring of the one error line


def train(*args: str, config: str = "{w}/good.yaml") -> list[str]:
    return [*TRAIN, "--config", config, *args]


CASES = [
    # --- configs
    Case("config-missing", train(config="{w}/nope.yaml"), "does not exist"),
    Case("config-not-mapping", train(config="{w}/list.yaml"), "must hold a mapping"),
    Case("config-broken-yaml", train(config="{w}/broken.yaml"), "not valid YAML at line"),
    Case("config-unknown-section", train(config="{w}/unknown.yaml"), "unknown key"),
    Case("override-unknown-key", train("train.stepz=3"), "train.stepz: unknown key"),
    Case("override-wrong-type", train("train.steps=ten"), "train.steps: expected an integer"),
    Case("override-bool-type", train("log.tensorboard=maybe"), "expected true or false"),
    Case("override-no-equals", train("train.steps"), "not of the form section.key=value"),
    Case("override-into-value", train("train.steps.x=1"), "is a value, not a section"),
    Case("steps-zero", train("train.steps=0"), "train.steps must be >= 1"),
    Case("precision-unknown", train("train.precision=fp8"), "precision must be one of"),
    Case("chunks-not-dividing", train("train.grad_cache_chunks=3"), "does not divide"),
    Case("keep-last-zero", train("checkpoint.keep_last=0"), "keep_last must be >= 1"),
    Case("timeout-negative", train("dist.timeout_s=-5"), "timeout_s must be > 0"),
    Case("lr-negative", train("optim.lr=-1"), "lr must be > 0"),
    Case("nonfinite-policy", train("train.nonfinite=ignore"), "nonfinite must be skip or stop"),
    # --- paths
    Case("shards-missing", train("data.train_shards={w}/nowhere"), "no .tar files match"),
    Case("shards-empty-dir", train("data.train_shards={w}/empty"), "no .tar files match"),
    Case("shards-pipe-refused", train("data.train_shards=pipe:cat /etc/passwd"), "'pipe:'"),
    Case("tokenizer-missing", train("data.tokenizer={w}/nowhere"), "tokenizer:"),
    Case("tokenizer-empty-dir", train("data.tokenizer={w}/empty"), "lacks tokenizer.json"),
    Case("tokenizer-corrupt", train("data.tokenizer={w}/badtok"), "could not be loaded"),
    Case("resume-missing", train("checkpoint.resume={w}/nowhere"), "not a complete checkpoint"),
    Case(
        "resume-partial",
        train("checkpoint.resume={w}/partial/checkpoints/step_00000006"),
        "not a complete checkpoint",
    ),
    Case("run-dir-has-checkpoints", train("run.dir={w}/run"), "already holds checkpoints"),
    Case("run-dir-under-a-file", train("run.dir={w}/good.yaml/run"), "cannot write to"),
    # --- shards that exist but hold nothing usable (found while reading: full start-up); one
    # shard, so one logical stream (with more, the stream check would refuse them first)
    Case(
        "shards-too-few-for-the-streams",
        train("data.train_shards={w}/zero_tar"),
        "data.resampled=true",
    ),
    Case(
        "shards-zero-bytes",
        train("data.train_shards={w}/zero_tar", "data.streams=1"),
        "no usable sample",
    ),
    Case(
        "shards-truncated",
        train("data.train_shards={w}/truncated_tar", "data.streams=1"),
        "no usable sample",
    ),
    Case(
        "shards-wrong-layout",
        train("data.train_shards={w}/layout_tar", "data.streams=1"),
        "no usable sample",
    ),
    # --- other commands
    Case(
        "export-missing-checkpoint",
        [*CLI, "export", "--checkpoint", "{w}/nowhere", "--out", "{w}/export"],
        "holds no complete checkpoint",
    ),
    Case(
        "export-partial-checkpoint",
        [*CLI, "export", "--checkpoint", "{w}/partial", "--out", "{w}/new-export"],
        "holds no complete checkpoint",
    ),
    Case(
        "export-out-not-empty",
        [*CLI, "export", "--checkpoint", "{w}/run", "--out", "{w}/export"],
        "is not empty",
    ),
    Case("export-no-out", [*CLI, "export", "--checkpoint", "{w}/run"], "--out"),
    Case(
        "eval-missing-model",
        [*CLI, "eval", "--model", "{w}/nowhere", "--zeroshot", "{data}/val"],
        "does not exist",
    ),
    Case("eval-nothing-to-do", [*CLI, "eval", "--model", "{w}/run"], "--zeroshot"),
    Case("synthetic-out-not-empty", [*CLI, "make-synthetic", "--out", "{w}/export"], "not empty"),
    Case(
        "synthetic-negative",
        [*CLI, "make-synthetic", "--out", "{w}/syn", "--train-samples", "-5"],
        "make-synthetic",
    ),
    Case("plan-bad-batch", [*CLI, "plan", "--gpus", "3", "--batch", "100"], "not divisible"),
    Case("cli-unknown-command", [*CLI, "trian"], "invalid choice"),
    Case("train-unknown-flag", [*TRAIN, "--bogus"], "unrecognized arguments"),
]


def make_world(w: Path, data: Path) -> None:
    """The files the cases point at, and the precious ones they must not touch."""
    good = DEBUG_CONFIG.read_text().replace("demo/data/train", str(data / "train"))
    (w / "good.yaml").write_text(good)
    (w / "list.yaml").write_text("- train\n- steps\n")
    (w / "broken.yaml").write_text("train:\n  steps: [3\n")
    (w / "unknown.yaml").write_text(good + "trainer:\n  steps: 3\n")
    (w / "empty").mkdir()
    (w / "badtok").mkdir()
    (w / "badtok" / "tokenizer.json").write_text("{not json")
    (w / "badtok" / "tokenizer_config.json").write_text("{}")
    # A finished-looking run (precious: a checkpoint) and a run killed mid-write.
    tag = w / "run" / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("3\n")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"precious weights")
    (w / "run" / "config.yaml").write_text(good)
    partial = w / "partial" / "checkpoints" / "step_00000006"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (w / "export").mkdir()
    (w / "export" / "model.safetensors").write_bytes(b"an earlier export")
    # Shards: a 0-byte .tar, a real shard cut mid-member, members that are not image+caption.
    real = sorted((data / "train").glob("*.tar"))[0].read_bytes()
    for name, blob in [("zero_tar", b""), ("truncated_tar", real[:700])]:
        (w / name).mkdir()
        (w / name / "000000.tar").write_bytes(blob)
    (w / "layout_tar").mkdir()
    with tarfile.open(w / "layout_tar" / "000000.tar", "w") as tar:
        for i in range(40):
            payload = f"sample {i}".encode()
            info = tarfile.TarInfo(f"dir{i}/notes.md")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def results(synthetic_dir, tmp_path_factory) -> dict:
    data = Path(synthetic_dir)
    w = tmp_path_factory.mktemp("bad_inputs")
    make_world(w, data)
    before = snapshot(w)

    def argv(case: Case) -> list[str]:
        args = [a.replace("{w}", str(w)).replace("{data}", str(data)) for a in case.argv]
        if args[0] == "train" and not any(a.startswith("run.dir=") for a in args):
            args.append(f"run.dir={w}/fresh/{case.name}")  # cases that get far enough to write
        return args

    def real(case: Case) -> dict:
        args = argv(case)
        done = subprocess.run([*REAL[args[0]], *args[1:]], cwd=REPO, env=run_env(),
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}

    # Most cases: forks of one process that imported the CLI once (tests/e2e/cli_forks.py).
    forked = [{"name": c.name, "argv": argv(c)} for c in CASES if c.name not in REAL_CASES]
    (w / "cases.json").write_text(json.dumps(forked))
    driver = subprocess.Popen([sys.executable, "-m", "tests.e2e.cli_forks", str(w / "cases.json"),
                               str(w / "results.json")], cwd=REPO, env=run_env())  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(
            pool.map(lambda c: (c.name, real(c)), [c for c in CASES if c.name in REAL_CASES])
        )
    assert driver.wait(timeout=900) == 0
    done |= json.loads((w / "results.json").read_text())
    (w / "cases.json").unlink()
    (w / "results.json").unlink()
    after = snapshot(w)
    for scratch in ("fresh", "syn"):  # what the cases may create (nothing in it)
        shutil.rmtree(w / scratch, ignore_errors=True)
    return {"done": done, "before": before, "after": after}


def test_catalogue_size():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, results) -> None:
    done = results["done"][case.name]
    stderr = done["stderr"]
    shown = f"{' '.join(case.argv)}\nexit {done['code']}\nstderr:\n{stderr[-3000:]}"
    assert done["code"] == 2, shown
    assert "Traceback" not in stderr, shown
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and case.expect in errors[0], shown
    assert errors[0] == stderr.strip().splitlines()[-1], shown  # the last word


def test_nothing_written_is_touched(results) -> None:
    """No case changed or removed a file that existed before (the run's checkpoint, the
    earlier export, the configs, the shards)."""
    before, after = results["before"], results["after"]
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(before) <= set(after)
