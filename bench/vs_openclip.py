"""This trainer against OpenCLIP's own trainer (open_clip_train) on the same task, alternately.

    python -m bench.vs_openclip                  # 3 rounds, tiny model, 2 processes x 64
    python -m bench.vs_openclip --rounds 5 --ds-config ds_configs/zero2.json

The task (issue 17): the same synthetic webdataset shards, the same model shape (our `tiny`
preset; OpenCLIP gets an equivalent model config JSON, checked to have the same parameter
count, and our tokenizer through its HFTokenizer, so both see the same token ids), 2 local
processes under torchrun (gloo, OMP_NUM_THREADS=1 each), `--steps` steps of `--per-rank`
samples per rank, fp32. OpenCLIP runs with `--local-loss --gather-with-grad` (the loss ours
computes) and `--workers` loader processes per rank (ours: data.workers' default, 2). Ours runs
with the run config's defaults, only the task's settings overridden, and ZeRO stage 0
(`--ds-config`, default ds_configs/zero0.json): DeepSpeed's plain data parallelism, what
OpenCLIP's DDP is, and the stage for a model this small, where ZeRO has nothing worth
partitioning (the run config's default is ZeRO-2: `--ds-config ""` runs that). Each round runs
both, the order swapped every round, so a change in machine load hits both alike; the ratios are
per round, then their geometric mean.

What is measured, identically for both (every output line is time-stamped on arrival):
- start-up: from launching torchrun to the line the trainer prints after step 1 (ours
  `[train] step 1`, OpenCLIP's first `Train Epoch:` line): imports, process group, model,
  optimizer, data loader start and the first step. Start-up CPU: the CPU seconds the launcher
  and all its descendants had used by then (less sensitive to other load on the machine).
- steady samples/s: global batch x steps / wall time between the step lines of step `--skip`
  and of the last step (so the first steps' warm-up is left out).
- before the rounds, one short untimed launch of each trainer (`--warmup-launches`): each
  imports from its own venv, and the first launch of either reads those files from disk.
- peak RSS: the largest sum of the resident memory of the launcher and all its descendants
  (ranks, loader workers), sampled every 0.1 s.

OpenCLIP is installed by this bench into its own venv (`--venv`, git-ignored), with the same
torch pin as ours. On CPU it needs two work-arounds no flag gives; they live in
bench/openclip_shims/ and are put on PYTHONPATH for the OpenCLIP runs only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "vs_openclip"  # git-ignored (/runs/)
VENV = REPO / "bench" / ".venv-openclip"  # git-ignored
SHIMS = REPO / "bench" / "openclip_shims"
OPENCLIP = "open_clip_torch[training]==3.3.0"

GOAL_SAMPLES = 1.15  # ours / OpenCLIP steady samples/s, at least
GOAL_STARTUP = 1.0  # ours / OpenCLIP start-up seconds, at most

# The line each trainer prints after a step: ours names the step, OpenCLIP counts the samples
# all ranks have seen.
STEP_LINE = {
    "ours": re.compile(r"^\[train\] step (\d+) "),
    "openclip": re.compile(r"\| Train Epoch: \d+ \[\s*(\d+)/\d+"),
}


# ---- reading the runs (pure functions: tests/unit/test_vs_openclip.py) ----------------------


@dataclass
class Measured:
    startup_s: float
    startup_cpu_s: float
    samples_per_s: float
    cpu_ms_per_sample: float
    peak_rss_mib: float


COLUMNS = (  # (Measured field, header, format)
    ("samples_per_s", "samples/s", ".1f"),
    ("cpu_ms_per_sample", "CPU ms/sample", ".2f"),
    ("startup_s", "start-up s", ".2f"),
    ("startup_cpu_s", "start-up CPU s", ".1f"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
)

# (seconds since launch, line, CPU seconds the process tree had used then: sampled on step
# lines only, nan elsewhere)
Stamped = tuple[float, str, float]


def step_lines(lines: list[Stamped], trainer: str, global_batch: int) -> dict[int, Stamped]:
    """{step: the line printed after it}. OpenCLIP's line counts the samples all ranks have
    seen so far, ours names the step."""
    steps: dict[int, Stamped] = {}
    for stamped in lines:
        found = STEP_LINE[trainer].search(stamped[1])
        if found:
            count = int(found.group(1))
            steps.setdefault(count if trainer == "ours" else count // global_batch, stamped)
    return steps


def steady(steps: dict[int, Stamped], global_batch: int, skip: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) between the line of step `skip` and the last step's."""
    last = max(steps, default=0)
    if skip not in steps or last <= skip:
        raise ValueError(
            f"need the lines of step {skip} and a later one, got steps {sorted(steps)}"
        )
    (t0, _, cpu0), (t1, _, cpu1) = steps[skip], steps[last]
    samples = (last - skip) * global_batch
    return samples / (t1 - t0), 1000 * (cpu1 - cpu0) / samples


def measure(launch: Launch, trainer: str, global_batch: int, skip: int) -> Measured:
    steps = step_lines(launch.lines, trainer, global_batch)
    if 1 not in steps:
        raise ValueError(f"{trainer}: no line after step 1 in the output")
    samples_per_s, cpu_ms = steady(steps, global_batch, skip)
    return Measured(
        startup_s=steps[1][0],
        startup_cpu_s=steps[1][2],
        samples_per_s=samples_per_s,
        cpu_ms_per_sample=cpu_ms,
        peak_rss_mib=launch.peak_rss / 2**20,
    )


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _row(label: str, run: str, values: list[float]) -> str:
    cells = "".join(
        f"{v:>{len(h) + 2}{fmt}}" for v, (_, h, fmt) in zip(values, COLUMNS, strict=True)
    )
    return f"{label:<10}{run:>4}{cells}"


def report(results: dict[str, list[Measured]]) -> str:
    """Per-run rows for both trainers, their medians, then the ratios (per round, geomean)."""
    rows = [f"{'trainer':<10}{'run':>4}" + "".join(f"{h:>{len(h) + 2}}" for _, h, _ in COLUMNS)]
    for name, label in (("ours", "ours"), ("openclip", "OpenCLIP")):
        runs = results[name]
        for i, m in enumerate(runs, 1):
            rows.append(_row(label, str(i), [getattr(m, f) for f, _, _ in COLUMNS]))
        rows.append(_row(label, "med", [statistics.median(getattr(m, f) for m in runs)
                                        for f, _, _ in COLUMNS]))  # fmt: skip
    pairs = list(zip(results["ours"], results["openclip"], strict=True))

    def ratio(field: str) -> float:
        return geomean([getattr(a, field) / getattr(b, field) for a, b in pairs])

    speed, startup = ratio("samples_per_s"), ratio("startup_s")
    rows += [
        f"ratios ours/OpenCLIP, geometric mean over {len(pairs)} rounds:",
        f"  CPU per sample {ratio('cpu_ms_per_sample'):.2f}x, start-up CPU "
        f"{ratio('startup_cpu_s'):.2f}x, peak RSS {ratio('peak_rss_mib'):.2f}x (no goal)",
        f"  start-up {startup:.2f}x (goal <= {GOAL_STARTUP:.2f}x: {verdict(startup <= GOAL_STARTUP)})",
        f"  samples/s {speed:.2f}x (goal >= {GOAL_SAMPLES:.2f}x: {verdict(speed >= GOAL_SAMPLES)})",
    ]
    return "\n".join(rows)


# ---- running a launch: time-stamped lines and the process tree's peak RSS -------------------


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU clock ticks used so far by it and its reaped children), from
    /proc/PID/stat: after the parenthesised name come state, ppid, ..., then utime, stime,
    cutime and cstime as the 12th to 15th fields."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        table[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def tree_pids(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_usage(root: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of `root` and all its descendants now. A descendant that
    ended and was reaped (a loader worker at the end of an epoch) is counted in its parent's
    children's times."""
    table = _processes()
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    rss, ticks = 0, 0
    for pid in tree_pids(root, table):
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
        ticks += table.get(pid, (0, 0))[1]
    return rss, ticks / tick


@dataclass
class Launch:
    lines: list[Stamped]
    peak_rss: int  # bytes, the launcher and all its descendants together


def run_stamped(cmd: list[str], *, cwd: Path, env: dict, log: Path, timeout: float,
                mark: re.Pattern) -> Launch:  # fmt: skip
    """Run `cmd`, stamping each output line on arrival (a reader thread; on `mark` lines also
    with the process tree's CPU seconds) and sampling the tree's RSS every 0.1 s meanwhile."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
    launch = Launch([], 0)

    def read() -> None:
        for line in proc.stdout:
            stamp = time.monotonic() - started
            cpu = tree_usage(proc.pid)[1] if mark.search(line) else math.nan
            launch.lines.append((stamp, line.rstrip("\n"), cpu))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            proc.kill()
            break
        launch.peak_rss = max(launch.peak_rss, tree_usage(proc.pid)[0])
        time.sleep(0.1)
    reader.join(timeout=10)
    log.write_text("".join(f"{t:9.3f} {line}\n" for t, line, _ in launch.lines))
    if proc.returncode != 0:
        tail = "\n".join(line for _, line, _ in launch.lines[-30:])
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {proc.returncode} (log: {log}):\n{tail}")
    return launch


# ---- setup: OpenCLIP's venv, the shards, OpenCLIP's model directory ------------------------


def _pip(venv: Path, *args: str) -> None:
    """pip install into `venv`; its chatter goes to VENV/pip.log, shown only on failure."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args]
    with open(venv / "pip.log", "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (venv / "pip.log").read_text().splitlines()[-20:]
        raise SystemExit(f"{' '.join(cmd)} failed:\n" + "\n".join(tail))


def ensure_venv(venv: Path) -> Path:
    """OpenCLIP's venv, made once: torch pinned to ours first (as the Makefile does: an
    unpinned install pulls a CUDA build), then OpenCLIP with its training extras and our
    transformers version (OpenCLIP imports it at start-up, so both pay the same import)."""
    import torch
    import transformers

    wanted = [f"torch=={torch.__version__.split('+')[0]}", OPENCLIP,
              f"transformers=={transformers.__version__}"]  # fmt: skip
    stamp = venv / ".installed"
    if stamp.is_file() and stamp.read_text().split() == wanted:
        return venv / "bin" / "python"
    print(f"installing {', '.join(wanted)} into {venv} (once)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, wanted[0])
    _pip(venv, *wanted)
    stamp.write_text("\n".join(wanted) + "\n")
    return venv / "bin" / "python"


def ensure_shards(data: Path, samples: int, image_size: int) -> Path:
    from data.synthetic import make_synthetic

    info = data / "synthetic.json"
    made = json.loads(info.read_text()) if info.is_file() else {}
    if (made.get("train_samples"), made.get("image_size")) != (samples, image_size):
        print(f"writing {samples} synthetic samples to {data}", flush=True)
        make_synthetic(data, train_samples=samples, val_per_class=1, image_size=image_size,
                       samples_per_shard=500, force=True)  # fmt: skip
    return data / "train"


def openclip_model_config(config) -> dict:
    """OpenCLIP's model_cfg for the shape of an HF CLIPConfig: same widths, depths, heads, MLP
    ratios, patch, image size, context and vocabulary, OpenAI's quick_gelu where HF uses it,
    and the text pooled at the first eos token as HF's CLIP text tower does."""
    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != text.hidden_act or vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"no OpenCLIP equivalent of activations {vision.hidden_act}/{text.hidden_act}"
        )
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": {
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "width": vision.hidden_size, "layers": vision.num_hidden_layers,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        },
        "text_cfg": {
            "context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
            "width": text.hidden_size, "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": text.intermediate_size / text.hidden_size,
            # Any value selects HFTokenizer; with local-dir: models it reads the model dir.
            "hf_tokenizer_name": "local-dir", "pad_id": text.pad_token_id,
            "eos_id": text.eos_token_id, "pool_type": "eos",
        },
    }  # fmt: skip


def write_openclip_model(out: Path, preset: str, context_length: int, image_size: int) -> int:
    """open_clip_config.json + our tokenizer's files in `out` (OpenCLIP's local-dir: model);
    returns our model's parameter count for the same shape."""
    from data.paths import BUILTIN_TOKENIZER_DIR
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.model import ModelConfig, build_clip_config, build_model

    model_cfg = ModelConfig(preset=preset, image_size=image_size)
    config = build_clip_config(model_cfg, token_ids(load_tokenizer(BUILTIN_TOKENIZER_DIR)),
                               context_length)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(BUILTIN_TOKENIZER_DIR, out, dirs_exist_ok=True)
    body = {"model_cfg": openclip_model_config(config), "preprocess_cfg": {}}
    (out / "open_clip_config.json").write_text(json.dumps(body, indent=1) + "\n")
    model = build_model(model_cfg, config, with_bias=False, zero3=False)
    return sum(p.numel() for p in model.parameters())


def openclip_parameters(python: Path, model_dir: Path, env: dict) -> int:
    code = ("import open_clip, sys; m = open_clip.create_model('local-dir:' + sys.argv[1]); "
            "print(sum(p.numel() for p in m.parameters()))")  # fmt: skip
    out = subprocess.run([str(python), "-c", code, str(model_dir)], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return int(out.stdout.split()[-1])


# ---- the two launches ----------------------------------------------------------------------


def launcher(python: Path | str, nproc: int) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def ours_command(args, run_dir: Path, shards: Path) -> list[str]:
    return [*launcher(sys.executable, args.nproc), "-m", "trainer.train",
            f"run.dir={run_dir}", f"data.train_shards={shards}",
            f"data.image_size={args.image_size}", f"data.context_length={args.context_length}",
            f"model.preset={args.preset}", f"train.steps={args.steps}",
            f"train.global_batch_size={args.per_rank * args.nproc}",
            *([f"deepspeed.config={args.ds_config}"] if args.ds_config else []),
            "log.every=1"]  # fmt: skip


def openclip_command(args, python: Path, model_dir: Path, shards: Path) -> list[str]:
    tars = sorted(p.name for p in shards.glob("*.tar"))
    spec = f"{shards}/{{{tars[0][:-4]}..{tars[-1][:-4]}}}.tar"
    # No --logs: torchrun's own parser takes it for its --logs-specs; the default ./logs/ under
    # the run's working directory is used instead.
    return [*launcher(python, args.nproc), "-m", "open_clip_train.main",
            f"--model=local-dir:{model_dir}", f"--train-data={spec}",
            "--dataset-type=webdataset",
            f"--train-num-samples={args.steps * args.per_rank * args.nproc}",
            f"--batch-size={args.per_rank}", "--epochs=1", f"--workers={args.workers}",
            "--precision=fp32", "--local-loss", "--gather-with-grad", "--dist-backend=gloo",
            "--log-every-n-steps=1", "--report-to=", "--name=run"]  # fmt: skip


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per process, for both
    return {**env, **extra}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-launches", type=int, default=1,
                        help="untimed short launches of each trainer first (warm page cache)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--skip", type=int, default=8, help="steps left out of steady samples/s")
    parser.add_argument("--per-rank", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2,
                        help="OpenCLIP's loader processes per rank (ours: data.workers' default)")  # fmt: skip
    parser.add_argument("--ds-config", default="ds_configs/zero0.json",
                        help='our deepspeed.config ("": the run config\'s default, ZeRO-2)')  # fmt: skip
    parser.add_argument("--samples", type=int, default=10000, help="synthetic training samples")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--timeout", type=float, default=900)
    return parser.parse_args(argv)


@dataclass
class Setup:
    python: Path  # OpenCLIP's venv's
    shards: Path
    model_dir: Path  # OpenCLIP's local-dir: model
    parameters: int  # in both models


def prepare(args: argparse.Namespace) -> Setup:
    """OpenCLIP's venv, the shards and OpenCLIP's model, made once; the parameter counts of
    the two models checked equal."""
    python = ensure_venv(args.venv)
    shards = ensure_shards(args.work / "data", args.samples, args.image_size)
    model_dir = args.work / "openclip_model"
    ours = write_openclip_model(model_dir, args.preset, args.context_length, args.image_size)
    theirs = openclip_parameters(python, model_dir, _env({"PYTHONPATH": str(SHIMS)}))
    if theirs != ours:
        raise SystemExit(f"model shapes differ: ours {ours} parameters, OpenCLIP {theirs}")
    return Setup(python, shards, model_dir, ours)


def run_one(name: str, rnd: int, args: argparse.Namespace, setup: Setup, *,
            quiet: bool = False) -> Measured:  # fmt: skip
    run_dir = args.work / name / f"r{rnd}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if name == "ours":
        cmd, cwd, env = ours_command(args, run_dir, setup.shards), REPO, _env({})
    else:  # OpenCLIP writes ./logs/ under its working directory
        cmd = openclip_command(args, setup.python, setup.model_dir, setup.shards)
        cwd, env = run_dir, _env({"PYTHONPATH": str(SHIMS)})
    launch = run_stamped(cmd, cwd=cwd, env=env, log=run_dir / "stamped.log",
                         timeout=args.timeout, mark=STEP_LINE[name])  # fmt: skip
    m = measure(launch, name, args.per_rank * args.nproc, args.skip)
    if quiet:
        return m
    print(f"round {rnd} {name:<9} {m.samples_per_s:7.1f} samples/s "
          f"({m.cpu_ms_per_sample:.2f} CPU ms/sample), start-up {m.startup_s:5.2f} s "
          f"({m.startup_cpu_s:4.1f} CPU s), peak RSS {m.peak_rss_mib:5.0f} MiB", flush=True)  # fmt: skip
    return m


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = prepare(args)
    print(f"task: {args.preset} ({setup.parameters:,} parameters in both), {args.nproc} "
          f"processes x {args.per_rank}, fp32, {args.steps} steps, steady from step {args.skip}; "
          f"ours: deepspeed.config={args.ds_config or 'the default'}; OpenCLIP: --local-loss "
          f"--gather-with-grad --workers {args.workers}", flush=True)  # fmt: skip
    if args.warmup_launches:
        # Each trainer imports from its own venv (OpenCLIP's holds its own torch): the first
        # launch of either reads those files from disk, later ones from the page cache. One
        # short untimed launch each, so no round pays a cold start only one trainer has.
        short = argparse.Namespace(**{**vars(args), "steps": args.skip + 1})
        for name in ("ours", "openclip"):
            for _ in range(args.warmup_launches):
                run_one(name, 0, short, setup, quiet=True)
    results: dict[str, list[Measured]] = {"ours": [], "openclip": []}
    for rnd in range(1, args.rounds + 1):
        # The order swaps every round: neither trainer always runs on a warmer machine.
        for name in ("ours", "openclip") if rnd % 2 else ("openclip", "ours"):
            results[name].append(run_one(name, rnd, args, setup))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
