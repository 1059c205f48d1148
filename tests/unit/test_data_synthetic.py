"""make-synthetic: deterministic bytes, img2dataset layout, held-out val, CLI refusal."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

from PIL import Image

from data.concepts import class_names, folder_name
from data.synthetic import make_synthetic
from trainer.cli import main as cli_main


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    kwargs = dict(train_samples=40, val_per_class=1, image_size=32, samples_per_shard=16)
    a = _digests(make_synthetic(tmp_path / "a", seed=3, **kwargs))
    b = _digests(make_synthetic(tmp_path / "b", seed=3, **kwargs))
    c = _digests(make_synthetic(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/000000.tar"] != c["train/000000.tar"]


def test_layout_is_img2dataset_webdataset(synthetic_dir):
    shards = sorted((synthetic_dir / "train").glob("*.tar"))
    assert [s.name for s in shards] == [f"{i:06d}.tar" for i in range(8)]
    with tarfile.open(shards[1]) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        assert names[:3] == ["000000030.jpg", "000000030.txt", "000000030.json"]
        assert len(names) == 3 * 30
        assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", n) for n in names)
        meta = json.loads(tar.extractfile("000000030.json").read())
        text = tar.extractfile("000000030.txt").read().decode()
        image = Image.open(io.BytesIO(tar.extractfile("000000030.jpg").read()))
    assert image.size == (32, 32) and image.format == "JPEG"
    assert meta["key"] == "000000030" and meta["caption"] == text
    # the caption names the class of the image
    assert all(word in text for word in class_names()[meta["label"]].split())


def test_val_folders_classnames_and_pairs(synthetic_dir):
    names = (synthetic_dir / "classnames.txt").read_text().splitlines()
    assert names == class_names() and len(names) == 30 and "red circle" in names
    folders = sorted(p.name for p in (synthetic_dir / "val").iterdir())
    assert folders == sorted(folder_name(n) for n in names)
    assert len(list((synthetic_dir / "val" / "red_circle").glob("*.jpg"))) == 2
    with tarfile.open(synthetic_dir / "val_pairs" / "000000.tar") as tar:
        assert len(tar.getnames()) == 3 * 2 * 30
    assert (synthetic_dir / "tokenizer" / "tokenizer_config.json").is_file()


def test_val_images_are_held_out_from_train(synthetic_dir):
    train = set()
    for shard in (synthetic_dir / "train").glob("*.tar"):
        with tarfile.open(shard) as tar:
            train |= {tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    val = {p.read_bytes() for p in (synthetic_dir / "val").rglob("*.jpg")}
    assert not train & val


def test_cli_refuses_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["make-synthetic", "--out", str(out), "--train-samples", "8", "--val-per-class", "1",
            "--image-size", "16"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").exists()
    assert cli_main([*args, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "train" / "000000.tar").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp dir left behind
