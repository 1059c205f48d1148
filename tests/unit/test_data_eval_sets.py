"""Eval readers: class names, ImageFolder mapping, labelled and caption shards."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from data.concepts import class_names
from data.eval_loader import wds_labelled, wds_pairs
from data.eval_sets import imagefolder_samples, load_classnames


def test_imagefolder_maps_folders_to_classnames_in_order(synthetic_dir):
    names = load_classnames(synthetic_dir / "classnames.txt")
    samples = imagefolder_samples(synthetic_dir / "val", names)
    assert len(samples) == 2 * 30
    assert [label for _, label in samples] == [i // 2 for i in range(60)]
    assert samples[0][0].parent.name == "red_circle" and names[0] == "red circle"


def test_imagefolder_accepts_folders_named_exactly_like_the_class(tmp_path):
    (tmp_path / "big dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "big dog" / "a.png")
    assert imagefolder_samples(tmp_path, ["big dog"]) == [(tmp_path / "big dog" / "a.png", 0)]
    with pytest.raises(ValueError, match="no folder for class 'cat'"):
        imagefolder_samples(tmp_path, ["big dog", "cat"])


def test_labelled_and_pair_readers(synthetic_dir):
    spec = str(synthetic_dir / "val_pairs" / "000000.tar")
    labelled = list(wds_labelled(spec))
    assert len(labelled) == 60 and {label for _, label in labelled} == set(range(30))
    image, label = labelled[7]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 7
    pairs = list(itertools.islice(wds_pairs(spec), 3))
    assert all(isinstance(text, str) and text for _, text in pairs)
    # captions name the class of their image (pairs are in label order)
    assert all(w in pairs[1][1] for w in class_names()[1].split())
