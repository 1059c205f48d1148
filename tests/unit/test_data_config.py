"""DataConfig.validate: cheap checks whose messages name the field and the fix."""

from __future__ import annotations

import pytest

from data.config import DataConfig


def _ok(synthetic_dir, **overrides) -> DataConfig:
    fields = dict(
        train_shards=str(synthetic_dir / "train"), tokenizer=str(synthetic_dir / "tokenizer")
    )
    fields.update(overrides)
    return DataConfig(**fields)


def test_valid_config_passes(synthetic_dir):
    _ok(synthetic_dir).validate()
    _ok(
        synthetic_dir, train_shards=str(synthetic_dir / "train" / "{000000..000007}.tar")
    ).validate()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train_shards": "x/{0..3}.tar"},
            r"^train_shards: no \.tar files match 'x/\{0\.\.3\}\.tar'; run 'disco-clip make-synthetic",
        ),
        ({"train_shards": ""}, r"^train_shards: empty"),
        ({"train_shards": "pipe:curl http://x/a.tar"}, r"^train_shards: 'pipe:' .*allow_pipe"),
        ({"tokenizer": "/nonexistent"}, r"^tokenizer: '/nonexistent' lacks"),
        ({"source": "s3"}, r"^source: 's3' is not one of"),
        ({"image_size": 0}, r"^image_size: 0 must be a positive"),
        ({"context_length": 1}, r"^context_length: 1"),
        ({"shuffle_buffer": -1}, r"^shuffle_buffer: -1 < 0"),
        ({"workers": -1}, r"^workers: -1 < 0"),
        ({"random_resized_crop_scale": (0.0, 1.0)}, r"^random_resized_crop_scale: "),
        ({"random_resized_crop_scale": (0.9, 0.5)}, r"^random_resized_crop_scale: "),
        ({"source": "hf", "hf_path": ""}, r"^hf_path: empty"),
    ],
)
def test_bad_values_name_the_field(synthetic_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        _ok(synthetic_dir, **overrides).validate()


def test_tokenizer_dir_without_tokenizer_files_is_refused(synthetic_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^tokenizer: .*tokenizer_config\.json"):
        _ok(synthetic_dir, tokenizer=str(tmp_path)).validate()


def test_data_package_never_imports_trainer():
    """data/ is below trainer/ in the dependency order (the trainer passes config pieces in)."""
    import re
    from pathlib import Path

    import data

    pattern = re.compile(r"^\s*(from|import)\s+trainer\b", re.MULTILINE)
    offenders = [
        p.name for p in Path(data.__file__).parent.glob("*.py") if pattern.search(p.read_text())
    ]
    assert offenders == []
