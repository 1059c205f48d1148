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
        (
            {"train_shards": "https://host/{000000..000003}.tar"},
            r"^train_shards: remote \(http/https/s3/gs\) URLs are refused; set data\.allow_remote=true",
        ),
        ({"train_shards": "s3://bucket/train/a.tar"}, r"^train_shards: remote .*allow_remote=true"),
        (
            {"train_shards": "https://host/train/*.tar", "allow_remote": True},
            r"^train_shards: '\*' globs match local files only",
        ),
        ({"image_key": " ; "}, r"^image_key: empty"),
        ({"caption_key": ""}, r"^caption_key: '' names no caption"),
        ({"caption_key": "txt;json:"}, r"^caption_key: 'txt;json:' names no caption"),
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


def test_remote_globbed_and_keyed_specs_that_pass(synthetic_dir):
    """Remote URLs, when allowed, are not checked (nothing to check without the network);
    a local glob works like the directory; the key fields take OpenCLIP-style lists."""
    for spec in ("https://host/train/{000000..000099}.tar", "s3://bucket/a.tar", "gs://b/a.tar"):
        _ok(synthetic_dir, train_shards=spec, allow_remote=True).validate()
    _ok(synthetic_dir, train_shards=str(synthetic_dir / "train" / "*.tar")).validate()
    _ok(synthetic_dir, image_key="webp;jpg", caption_key="txt;json:caption").validate()
    with pytest.raises(ValueError, match=r"^train_shards: no \.tar files match"):
        _ok(synthetic_dir, train_shards=str(synthetic_dir / "nothing" / "*.tar")).validate()


def test_key_defaults_are_openclip_style():
    from data.decode import DEFAULT_IMAGE_KEYS, parse_keys

    cfg = DataConfig()
    assert cfg.caption_key == "txt" and cfg.allow_remote is False
    assert cfg.image_key.startswith("jpg;png;jpeg;webp")  # OpenCLIP's order, then the rest
    assert parse_keys(cfg.image_key) == DEFAULT_IMAGE_KEYS  # decode()'s own default


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
