"""`make demo` / `python -m trainer.demo`: the whole story on the built-in dataset, on CPU.

make the synthetic data (once) → train with 2 processes (periodic zero-shot + retrieval eval)
→ export to a Hugging Face directory → run that directory through the HF zero-shot pipeline
in a clean interpreter (no project code importable) → plot the curves → print where it all is.
Everything goes under demo/ in the clone. Re-running resumes the finished run (no retraining)
and re-exports.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path("trainer/configs/demo.yaml")
DATA, RUN, EXPORT = Path("demo/data"), Path("demo/run"), Path("demo/export")
PIPELINE_TEMPLATE = "a photo of a {}."


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def make_data() -> None:
    from data.synthetic import make_synthetic

    if (DATA / "classnames.txt").is_file():
        _say(f"dataset: reusing {DATA}")
        return
    _say(f"dataset: writing the built-in synthetic dataset to {DATA}")
    make_synthetic(DATA, train_samples=10000, val_per_class=20, image_size=32, seed=0)


def train(nproc: int) -> None:
    _say(f"train: {nproc} processes, config {DEMO_CONFIG}, run dir {RUN}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "trainer.train", "--config", str(DEMO_CONFIG)]  # fmt: skip
    subprocess.run(cmd, check=True)


def pipeline_top1() -> tuple[float, int]:
    """Top-1 of the exported model in the HF pipeline over every val image."""
    from data.eval_sets import imagefolder_samples, load_classnames
    from trainer.interop.pipeline_check import run_isolated

    names = load_classnames(DATA / "classnames.txt")
    samples = imagefolder_samples(DATA / "val", names)
    out = run_isolated(EXPORT, [p for p, _ in samples], names, PIPELINE_TEMPLATE)
    correct = sum(pred == names[y] for pred, (_, y) in zip(out["top1"], samples, strict=True))
    return correct / len(samples), len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    make_data()
    train(args.nproc)

    from trainer.eval.plot import plot_run
    from trainer.interop.hf_export import export
    from trainer.interop.run_checkpoint import logged_eval, resolve_checkpoint

    _say(f"export: {RUN} -> {EXPORT}")
    export(RUN, EXPORT, force=True)
    _say(f"HF pipeline: zero-shot-image-classification on {DATA / 'val'} ('{PIPELINE_TEMPLATE}')")
    top1, n = pipeline_top1()
    plots = plot_run(RUN)
    evals = logged_eval(RUN, resolve_checkpoint(RUN).step) or {}
    minutes = (time.perf_counter() - started) / 60
    print("\n" + "=" * 72)
    print(f"zero-shot top-1, exported model in the HF pipeline: {100 * top1:.1f}% ({n} val images)")
    if "zeroshot_top1" in evals:
        print(f"zero-shot top-1 / top-5, trainer's evaluator ({evals.get('zeroshot_images', '?')} "
              f"images, builtin templates): {100 * evals['zeroshot_top1']:.1f}% / "
              f"{100 * evals['zeroshot_top5']:.1f}%")  # fmt: skip
    if "retrieval_i2t_r1" in evals:
        r = {k: f"{100 * v:.1f}%" for k, v in evals.items() if k.startswith("retrieval_")}
        print(f"retrieval recall@1/5/10 image->text: {r['retrieval_i2t_r1']} / "
              f"{r['retrieval_i2t_r5']} / {r['retrieval_i2t_r10']}; text->image: "
              f"{r['retrieval_t2i_r1']} / {r['retrieval_t2i_r5']} / {r['retrieval_t2i_r10']}")  # fmt: skip
    print(f"HF export:  {EXPORT}/  (CLIPModel / CLIPProcessor / pipeline load it)")
    print(f"plots:      {', '.join(str(p) for p in plots)}")
    print(f"run:        {RUN}/  (metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"demo steps took {minutes:.1f} min (after setup)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
