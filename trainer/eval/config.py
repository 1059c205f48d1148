"""The `eval:` config section, and the checks that open every named eval set before step 1."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from trainer.eval.zeroshot import BUILTIN_TEMPLATE_SETS

T = TypeVar("T")


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many steps during training (0 = never; also runs at the end if > 0)."""
    zeroshot_dir: str = ""
    """Zero-shot set: an ImageFolder directory (one folder per class, e.g. DIR/val from
    make-synthetic) or webdataset shards (a dir of .tar, a brace pattern) whose .json has an
    int `label`. "" = no zero-shot eval."""
    classnames: str = ""
    """classnames.txt (one class per line, in label order); "" = look for classnames.txt in
    zeroshot_dir, then in its parent."""
    templates: str = "builtin"
    """Prompt templates: "builtin" (small set for the built-in dataset), "imagenet80" (CLIP's
    80 ImageNet prompts) or a text file with one template per line, each with one '{}'."""
    retrieval_shards: str = ""
    """Held-out captioned images for recall@1/5/10 (k captions per image allowed, see
    trainer/eval/retrieval.py): webdataset shards (e.g. DIR/val_pairs; captions = the .json's
    "captions" list, else the lines of the .txt) or a .json/.csv caption file (see
    data/eval_sets.load_caption_file). "" = no retrieval eval."""
    suites: dict[str, str] = field(default_factory=dict)
    """ImageNet-family zero-shot sets {name: ROOT}, in their standard layouts (see
    trainer/eval/suites.py): imagenet, imagenet_v2, imagenet_r, imagenet_sketch, imagenet_a.
    Logged as <name>_top1 / <name>_top5. {} = none."""
    suite_templates: str = "imagenet80"
    """Prompt templates for `suites` (same forms as `templates`)."""
    batch_size: int = 64
    """Images (or prompts) per forward, per rank."""
    max_samples: int = 0
    """Use at most this many images of each eval set (0 = all; over tar shards: the first
    this many stored samples, bad ones included)."""
    workers: int = 2
    """DataLoader worker processes per rank that decode eval images (0 = in the training
    process). Each rank decodes only its own share of every set (data/eval_loader.py)."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0 = off), got {self.every}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0 = decode in the main process), got "
                             f"{self.workers}")  # fmt: skip
        if self.max_samples < 0:
            raise ValueError(f"max_samples: must be >= 0 (0 = all), got {self.max_samples}")
        if self.templates not in BUILTIN_TEMPLATE_SETS and not Path(self.templates).is_file():
            raise ValueError(
                f"templates: {self.templates!r} is not a file; use builtin, imagenet80 or a "
                "text file with one template per line"
            )
        if (
            self.suite_templates not in BUILTIN_TEMPLATE_SETS
            and not Path(self.suite_templates).is_file()
        ):
            raise ValueError(
                f"suite_templates: {self.suite_templates!r} is not a file; use imagenet80, "
                "builtin or a text file with one template per line"
            )
        # Every named set is opened and checked here, so a bad one fails before training.
        if self.zeroshot_dir:
            self._check_zeroshot()
        if self.retrieval_shards:
            self._check_retrieval()
        if self.suites:
            from trainer.eval.suites import SUITE_BY_KEY, check_suite

            for key, root in self.suites.items():
                if key not in SUITE_BY_KEY:
                    raise ValueError(
                        f"suites: unknown set {key!r}; use one of {', '.join(SUITE_BY_KEY)}"
                    )
                try:
                    check_suite(key, root)
                except ValueError as err:
                    raise ValueError(f"suites.{key}: {err}") from None

    def _check_zeroshot(self) -> None:
        from data.eval_sets import check_shards, imagefolder_samples, load_classnames

        if not _is_imagefolder(self.zeroshot_dir):
            from data.shards import expand_shards

            if not expand_shards(self.zeroshot_dir):
                raise ValueError(
                    f"zeroshot_dir: {self.zeroshot_dir} is neither an ImageFolder directory nor "
                    "matches .tar shards; point it at e.g. DIR/val from make-synthetic"
                )
            try:
                check_shards(self.zeroshot_dir, "label")
            except ValueError as err:
                raise ValueError(f"zeroshot_dir: {err}") from None
            if self.every and not find_classnames(self):
                raise ValueError(
                    f"classnames: no classnames.txt in {self.zeroshot_dir} or its parent; set "
                    "eval.classnames to the file"
                )
            return
        hint = _wnid_hint(self.zeroshot_dir)
        path = find_classnames(self)
        if path is None:
            if self.every:
                raise ValueError(
                    f"classnames: no classnames.txt in {self.zeroshot_dir} or its parent; set "
                    f"eval.classnames to the file{hint}"
                )
            return
        names = load_classnames(path)
        if not names:
            raise ValueError(f"classnames: {path} lists no classes")
        try:
            samples = imagefolder_samples(self.zeroshot_dir, names)
        except ValueError as err:
            raise ValueError(f"zeroshot_dir: {err}{hint}") from None
        if not samples:
            raise ValueError(f"zeroshot_dir: no images in the class folders of {self.zeroshot_dir}")

    def _check_retrieval(self) -> None:
        from data.eval_sets import CAPTION_FILE_EXTS, check_shards, load_caption_file

        spec = self.retrieval_shards
        try:
            if Path(spec).suffix.lower() in CAPTION_FILE_EXTS:
                if not Path(spec).is_file():
                    raise ValueError(f"caption file {spec} does not exist")
                load_caption_file(spec)
                return
            from data.shards import expand_shards

            if not expand_shards(spec):
                raise ValueError(
                    f"no .tar files match {spec}; point it at held-out pairs, e.g. "
                    "DIR/val_pairs, or at a .json/.csv caption file"
                )
            check_shards(spec, "captions")
        except ValueError as err:
            raise ValueError(f"retrieval_shards: {err}") from None


def _wnid_hint(path: str) -> str:
    """A pointer to eval.suites when `path` holds ImageNet-style wnid (or V2 index) folders."""
    from trainer.eval.suites import WNID_RE

    folders = [p.name for p in Path(path).iterdir() if p.is_dir()]
    if folders and all(WNID_RE.match(name) for name in folders):
        return (
            f"; {path} looks like an ImageNet wnid layout (n01440764/...): give it as "
            "eval.suites.imagenet (or imagenet_r/_a/_sketch; disco-clip eval --imagenet ...)"
        )
    if folders and all(name.isdigit() for name in folders) and len(folders) > 100:
        return (
            f"; {path} looks like ImageNet-V2 (folders 0...999): give it as eval.suites.imagenet_v2"
        )
    return ""


def _is_imagefolder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(child.is_dir() for child in p.iterdir())


def find_classnames(cfg: EvalConfig) -> Path | None:
    if cfg.classnames:
        return Path(cfg.classnames) if Path(cfg.classnames).is_file() else None
    root = Path(cfg.zeroshot_dir)
    for candidate in (root / "classnames.txt", root.parent / "classnames.txt"):
        if candidate.is_file():
            return candidate
    return None


# ---- encoders that work on any CLIPModel (ours or a plain HF one) -------------------------
