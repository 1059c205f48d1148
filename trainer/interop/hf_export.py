"""Checkpoint → Hugging Face directory: `disco-clip export --checkpoint RUN_OR_CKPT --out DIR`.

Any ZeRO stage's DeepSpeed checkpoint is merged into fp32 weights and saved as a plain
CLIPModel (config.json + model.safetensors), with the run's tokenizer, a CLIPImageProcessor
matching the training eval transform (data/transforms.eval_transform) and a README model card
holding the training config and the eval numbers logged at that step. The result loads with
`CLIPModel` / `CLIPProcessor.from_pretrained` and `pipeline("zero-shot-image-classification")`
with nothing from this project installed.

SigLIP runs: CLIPModel has no `logit_bias`, so its value goes into config.json as the extra
attribute `logit_bias` (plus `disco_clip_loss: "siglip"`), and the card says how to use it.
Rankings (zero-shot argmax, retrieval) do not depend on it.

Reading the checkpoint (and its trust boundary) is trainer/interop/run_checkpoint.py's job;
exported directories hold safetensors only (no pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from trainer.interop.run_checkpoint import (
    CheckpointRef,
    InteropError,
    build_hf_model,
    logged_eval,
    resolve_checkpoint,
)

EXIT_USAGE = 2


def image_processor(size: int):
    """The CLIPImageProcessor equal to data.transforms.eval_transform(size)."""
    from transformers import CLIPImageProcessor

    from data.transforms import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )  # fmt: skip


def model_card(ref: CheckpointRef, cfg, evals: dict | None, bias: float | None) -> str:
    from trainer.config_io import dump_yaml

    lines = [
        "---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, disco-clip]", "---", "", "# CLIP trained with disco-clip", "",
        f"Exported from `{ref.ckpt_dir / ref.tag}` (step {ref.step}) of run `{ref.run_dir}`: "
        f"fp32 weights merged from the DeepSpeed checkpoint, loss `{cfg.loss.name}`.", "",
        "## Evaluation", "",
    ]  # fmt: skip
    if evals:
        lines += suites_table(evals, label=f"step {evals['step']}")
        lines += [f"Logged by the trainer at step {evals['step']}:", "", "| metric | value |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.4f} |" for k, v in evals.items() if k not in ("kind", "step")]
        lines += ["", f"Templates: `{cfg.eval.templates}`; zero-shot set: "
                  f"`{cfg.eval.zeroshot_dir}`; retrieval pairs: `{cfg.eval.retrieval_shards}`."]  # fmt: skip
        if cfg.eval.suites:
            sets = ", ".join(f"{k} `{v}`" for k, v in cfg.eval.suites.items())
            lines += ["", f"ImageNet-family sets: {sets}; templates `{cfg.eval.suite_templates}`."]
    else:
        lines += ["No evaluation was logged for this checkpoint (eval.every was 0)."]
    if bias is not None:
        lines += ["", "## SigLIP bias", "",
                  f"Trained with a sigmoid loss: `config.logit_bias` = {bias:.6f}. Pair "
                  "probability = sigmoid(exp(logit_scale) * cos + logit_bias). The HF pipeline "
                  "applies a softmax and ignores the bias; rankings are unaffected."]  # fmt: skip
    lines += ["", "## Usage", "", "```python", "from transformers import pipeline", "",
              'clf = pipeline("zero-shot-image-classification", model="THIS_DIR")',
              'clf("image.jpg", candidate_labels=["red circle", "blue square"],',
              '    hypothesis_template="a photo of a {}.")', "```", "",
              "## Training config", "", "```yaml", dump_yaml(cfg).rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def suites_table(evals: dict, label: str) -> list[str]:
    """The paper-style table (zero-shot top-1 % per ImageNet-family set) of an eval record,
    as card lines; none when the run evaluated no eval.suites."""
    from trainer.eval.suites import SUITES, format_table

    top1 = {s.key: evals[f"{s.key}_top1"] for s in SUITES if f"{s.key}_top1" in evals}
    if not top1:
        return []
    return ["Zero-shot top-1 (%), CLIP's prompts, as in the DisCo-CLIP and CLIP papers:", "",
            format_table({label: top1}), ""]  # fmt: skip


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InteropError(f"--out: {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InteropError(f"--out: {out} is not empty; pass --force to replace it")


def export(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the HF directory to a temporary sibling, then rename it to `out`."""
    from transformers import CLIPProcessor

    out = Path(out)
    ref = resolve_checkpoint(checkpoint)
    check_out(out, force)
    model, tokenizer, cfg = build_hf_model(ref)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor = image_processor(model.config.vision_config.image_size)
        processor.save_pretrained(tmp)  # preprocessor_config.json, for older readers
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp)
        bias = getattr(model.config, "logit_bias", None)
        card = model_card(ref, cfg, logged_eval(ref.run_dir, ref.step), bias)
        (tmp / "README.md").write_text(card)
        (tmp / "disco_clip.json").write_text(json.dumps(
            {"checkpoint": str(ref.ckpt_dir / ref.tag), "step": ref.step}, indent=1) + "\n")  # fmt: skip

    return write_dir_atomically(out, force, write)


def write_dir_atomically(out: str | Path, force: bool, write) -> Path:
    """`write(tmp)` into a temporary sibling of `out`, then rename it to `out`: a failure
    leaves `out` as it was and no temporary directory behind."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="checkpoint (any ZeRO stage) -> Hugging Face CLIP directory"
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, RUN/checkpoints, or RUN/checkpoints/step_XXXXXXXX")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--format", choices=["hf", "openclip"], default="hf",
                        help="hf: Hugging Face CLIP dir; openclip: open_clip_config.json + "
                             "open_clip_model.safetensors (open_clip 'local-dir:OUT')")  # fmt: skip
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.format == "openclip":
            from trainer.interop.openclip import export_openclip

            out = export_openclip(args.checkpoint, args.out, force=args.force)
        else:
            out = export(args.checkpoint, args.out, force=args.force)
    except (InteropError, FileNotFoundError) as err:
        print(f"disco-clip export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {out}")
    return 0
