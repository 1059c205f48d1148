"""Periodic eval in real 2-process runs, and export → Hugging Face at ZeRO-2 and ZeRO-3.

Failures localise to: the sharded in-training eval (logged metrics differ from a
single-process eval of the export), the fp32 merge / key mapping (embeddings differ from the
trained TrainableCLIP), the saved tokenizer or image processor (isolated-process embeddings or
pipeline labels differ), or the CLI contract (exit codes, refusing to overwrite).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.e2e.conftest import EVAL_STAGES
from trainer.eval.evaluate import EvalConfig, encode_images, encode_texts, evaluate
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow
TEMPLATE = "a photo of a {}."


def _trained_model(run_dir):
    """The TrainableCLIP of the run, rebuilt as training builds it, holding the checkpoint's
    fp32 weights (loaded through its own [1]-shape hooks)."""
    from data.tokenizer import load_tokenizer
    from trainer.build import token_ids
    from trainer.interop.run_checkpoint import fp32_state_dict, load_run_config, resolve_checkpoint
    from trainer.model import TrainableCLIP, build_clip_config

    cfg = load_run_config(run_dir)
    tok = load_tokenizer(cfg.data.tokenizer)
    model = TrainableCLIP(build_clip_config(cfg.model, token_ids(tok), cfg.data.context_length))
    model.load_state_dict(fp32_state_dict(resolve_checkpoint(run_dir)), strict=False)
    return model.eval(), tok


def _hf_model(export_dir):
    from transformers import CLIPModel

    from data.tokenizer import load_tokenizer

    return CLIPModel.from_pretrained(export_dir).eval(), load_tokenizer(export_dir)


@pytest.mark.parametrize("zero", EVAL_STAGES)
def test_periodic_eval_is_logged_and_matches_single_process_eval(eval_runs, exported, zero):
    records = read_metrics(eval_runs[zero], "eval")
    assert [r["step"] for r in records] == [3, 6]
    last = records[-1]
    assert last["zeroshot_images"] == 60 and last["retrieval_pairs"] == 60
    model, tok = _hf_model(exported[zero])
    from trainer.interop.run_checkpoint import load_run_config

    cfg = load_run_config(eval_runs[zero]).eval  # the same eval sets as the run
    cfg.batch_size = 64  # one process, other batches
    single = evaluate(model, tok, cfg)
    for key, value in single.items():
        assert last[key] == pytest.approx(value, abs=1e-9), key


def test_zero2_merge_equals_module_weights(eval_runs):
    """fp32 ZeRO-2: the merged optimizer partitions equal the saved module weights."""
    from trainer.interop.run_checkpoint import fp32_state_dict, resolve_checkpoint

    ref = resolve_checkpoint(eval_runs[2])
    module = torch.load(ref.ckpt_dir / ref.tag / "mp_rank_00_model_states.pt", weights_only=False)
    merged = fp32_state_dict(ref)
    for key, value in module["module"].items():
        if key in merged:
            assert torch.equal(merged[key].reshape(value.shape), value.float()), key
    assert set(merged) <= set(module["module"])


@pytest.mark.parametrize("zero", EVAL_STAGES)
def test_export_loads_without_project_and_matches_trained_model(
    eval_runs, exported, synthetic_dir, tmp_path, zero
):
    from data.eval_sets import imagefolder_samples, load_classnames
    from data.tokenizer import tokenize
    from data.transforms import eval_transform
    from trainer.interop.pipeline_check import run_isolated

    names = load_classnames(synthetic_dir / "classnames.txt")
    samples = imagefolder_samples(synthetic_dir / "val", names)
    texts = [TEMPLATE.format(n) for n in names[:6]] + ["a small red circle on a dark background"]
    out = run_isolated(exported[zero], [p for p, _ in samples], names, TEMPLATE, texts, n_embed=8)

    # 1. embeddings: HF CLIPModel + CLIPProcessor in a clean process vs our trained model
    trained, tok = _trained_model(eval_runs[zero])
    size = trained.config.vision_config.image_size
    with torch.no_grad():
        pixels = torch.stack([eval_transform(size)(Image.open(p)) for p, _ in samples[:8]])
        ids, mask = tokenize(tok, texts, trained.config.text_config.max_position_embeddings)
        ours_img, ours_txt = trained.encode_image(pixels), trained.encode_text(ids, mask)
    assert torch.allclose(torch.tensor(out["pixel_values"]), pixels, atol=1e-5)
    hf_img = F.normalize(torch.tensor(out["image_features"]), dim=-1)
    hf_txt = F.normalize(torch.tensor(out["text_features"]), dim=-1)
    assert (hf_img - ours_img).abs().max() < 1e-5
    assert (hf_txt - ours_txt).abs().max() < 1e-5

    # 2. the HF pipeline's top-1 equals our evaluator's with the same single template
    model, tok = _hf_model(exported[zero])
    (tmp_path / "one.txt").write_text(TEMPLATE + "\n")
    cfg = EvalConfig(zeroshot_dir=str(synthetic_dir / "val"), templates=str(tmp_path / "one.txt"))
    with torch.no_grad():
        classes = encode_texts(model, tok, [TEMPLATE.format(n) for n in names])
        pix = torch.stack([eval_transform(size)(Image.open(p)) for p, _ in samples])
        ours = [names[i] for i in (encode_images(model, pix) @ classes.T).argmax(1).tolist()]
    assert out["top1"] == ours
    pipeline_top1 = sum(p == names[y] for p, (_, y) in zip(out["top1"], samples, strict=True))
    assert evaluate(model, tok, cfg)["zeroshot_top1"] == pytest.approx(pipeline_top1 / len(samples))


def test_export_layout_and_model_card(exported):
    files = {p.name for p in exported[3].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json", "README.md"} <= files  # fmt: skip
    card = (exported[3] / "README.md").read_text()
    assert "zeroshot_top1" in card and "retrieval_i2t_r1" in card
    assert "zero3.json" in card  # the training config is in the card


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run `disco-clip ARGS` in this process; (exit code, stderr)."""
    from trainer.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_export_cli_refuses_and_reports(eval_runs, tmp_path, capsys):
    code, err = _cli(
        capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--checkpoint" in err

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(capsys, "export", "--checkpoint", str(eval_runs[2]), "--out", str(out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"

    tag = eval_runs[2] / "checkpoints" / "step_00000003"
    code, err = _cli(capsys, "export", "--checkpoint", str(tag), "--out", str(out), "--force")
    assert code == 0, err[-2000:]
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken.tmp")]


def test_eval_cli_on_export_and_on_checkpoint(eval_runs, exported, synthetic_dir, capsys):
    from trainer.cli import main

    val = str(synthetic_dir / "val")
    assert main(["eval", "--model", str(exported[2]), "--zeroshot", val]) == 0
    from_export = capsys.readouterr().out
    assert main(["eval", "--model", str(eval_runs[2]), "--zeroshot", val]) == 0
    assert capsys.readouterr().out == from_export
    assert "zeroshot_top1:" in from_export
    assert main(["eval", "--model", "/no/such/model", "--zeroshot", val]) == 2


def test_eval_cli_device(exported, synthetic_dir, capsys):
    """--device cpu is the default's result on a CPU machine; a CUDA device the machine lacks
    is one error line and exit 2, before the model is loaded."""
    from trainer.cli import main

    base = ("eval", "--model", str(exported[2]), "--zeroshot", str(synthetic_dir / "val"))
    capsys.readouterr()
    assert main(list(base)) == 0
    default_out = capsys.readouterr().out
    assert main([*base, "--device", "cpu"]) == 0
    cpu_out = capsys.readouterr().out
    assert "zeroshot_top1:" in cpu_out
    if torch.cuda.is_available():
        pytest.skip("the CUDA-absent errors are checked on CPU machines only")
    assert cpu_out == default_out
    for device in ("cuda", "cuda:7"):
        code, err = _cli(capsys, *base, "--device", device)
        assert code == 2, device
        assert len(err.strip().splitlines()) == 1 and "--device: " + device in err


def test_siglip_bias_goes_to_config(eval_runs, tmp_path, monkeypatch):
    """CLIPModel has no logit_bias: it must leave as a config.json attribute, not be dropped."""
    from transformers import CLIPModel

    import trainer.interop.hf_export as export_mod
    import trainer.interop.run_checkpoint as reader_mod

    real = reader_mod.fp32_state_dict
    monkeypatch.setattr(
        reader_mod, "fp32_state_dict", lambda ref: {**real(ref), "logit_bias": torch.tensor([-7.5])}
    )
    out = export_mod.export(eval_runs[2], tmp_path / "siglip")
    config = CLIPModel.from_pretrained(out).config
    assert config.logit_bias == -7.5
    assert "logit_bias" in (out / "README.md").read_text()


def test_export_openclip_format_of_a_run(eval_runs, tmp_path):
    """`disco-clip export --format openclip` on a training run: OpenCLIP's two files, whose
    weights convert back to exactly the run's (the OpenCLIP-side load is checked against
    OpenCLIP itself in tests/unit/test_openclip_convert.py)."""
    import json

    from trainer.cli import main
    from trainer.interop.openclip import load_openclip_state, openclip_to_hf
    from trainer.interop.run_checkpoint import build_hf_model, resolve_checkpoint

    out = tmp_path / "oc"
    assert main(["export", "--format", "openclip", "--checkpoint", str(eval_runs[2]),
                 "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    config = json.loads((out / "open_clip_config.json").read_text())
    _, back = openclip_to_hf(load_openclip_state(out / "open_clip_model.safetensors"), config)
    model, _, _ = build_hf_model(resolve_checkpoint(eval_runs[2]))
    want = model.state_dict()
    for key, value in back.items():
        assert torch.equal(value.reshape(want[key].shape), want[key]), key
