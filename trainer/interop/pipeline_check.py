"""Use an exported directory the way a user without this project would, in a clean process.

`run_isolated(...)` starts a fresh interpreter with `-I -S` (no PYTHONPATH, user site or .pth
files, so the editable install of this project is not on the path), adds only the venv's
site-packages, and runs this file's `main()`: it asserts that `trainer` and `data` are not
importable, loads the directory with CLIPModel, CLIPProcessor and the zero-shot pipeline,
and writes the pipeline's top-1 labels and the model's embeddings as JSON.

Everything above `run_isolated` must import only the standard library and transformers/PIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--request", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    for name in ("trainer", "data"):
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(f"hf_check: project package {name!r} is importable; not isolated")
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, pipeline

    req = json.loads(args.request.read_text())
    model = CLIPModel.from_pretrained(req["model"], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(req["model"], local_files_only=True)
    classifier = pipeline("zero-shot-image-classification", model=req["model"])
    images = [Image.open(p).convert("RGB") for p in req["images"]]
    results = classifier(
        images, candidate_labels=req["classnames"], hypothesis_template=req["template"],
        batch_size=64,
    )  # fmt: skip
    top1 = [r[0]["label"] for r in results]
    with torch.no_grad():
        pix = processor(images=images[: req["n_embed"]], return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pix)
        txt_in = processor(text=req["texts"], return_tensors="pt", padding=True)
        txt = model.get_text_features(**txt_in)
    # transformers 5 may return a model output here; take the projected features either way
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
    args.out.write_text(json.dumps({
        "top1": top1, "image_features": img.tolist(), "text_features": txt.tolist(),
        "pixel_values": pix.tolist(),
    }))  # fmt: skip


def run_isolated(
    model_dir: str | Path,
    images: list[str | Path],
    classnames: list[str],
    template: str,
    texts: list[str] = ("a",),  # type: ignore[assignment]
    n_embed: int = 4,
) -> dict:
    """Run `main()` in a clean interpreter (see module doc); returns its JSON output."""
    site_packages = sysconfig.get_paths()["purelib"]
    with tempfile.TemporaryDirectory(prefix="hf_check-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "out.json"
        request.write_text(json.dumps({
            "model": str(Path(model_dir).resolve()), "images": [str(Path(p).resolve()) for p in images],
            "classnames": classnames, "template": template, "texts": list(texts), "n_embed": n_embed,
        }))  # fmt: skip
        bootstrap = (
            "import runpy, sys; sys.path.append(sys.argv[1]); "
            "sys.argv = [sys.argv[2], '--request', sys.argv[3], '--out', sys.argv[4]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-I", "-S", "-c", bootstrap, site_packages, __file__,
               str(request), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"isolated HF check failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
