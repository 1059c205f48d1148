"""Zero-shot and retrieval math against direct computations; template files; EvalConfig errors;
the sharded gather over 3 gloo processes; `disco-clip eval --device`.

A failure here localises to the metric math (trainer/eval/zeroshot.py, trainer/eval/retrieval.py),
the evaluation path (trainer/eval/evaluate.py) or the eval command's device handling
(trainer/eval/command.py) — no training or DeepSpeed involved. CUDA-only, not reached here:
evaluation on a CUDA model and the gather over NCCL (trainer.dist.collective_device).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.support.models import tiny_hf_clip
from trainer.eval.evaluate import EvalConfig, encode_images, encode_texts, evaluate
from trainer.eval.retrieval import recall_at_k
from trainer.eval.zeroshot import class_embeddings, load_templates, topk_accuracy


def test_class_embedding_is_normalised_mean_of_normalised_prompts():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 5.0], [1.0, 1.0]])
    cls = torch.tensor([0, 0, 1, 1])
    emb = class_embeddings(feats, cls, 2)
    # class 0: mean of (1,0) and (0,1) -> (0.5,0.5) -> normalised
    s = 2**-0.5
    assert torch.allclose(emb[0], torch.tensor([s, s]))
    expected1 = F.normalize(torch.tensor([0.0, 1.0]) + torch.tensor([s, s]), dim=0)
    assert torch.allclose(emb[1], expected1)


def test_topk_accuracy_known_case():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3)  # only row 0
    assert acc[2] == pytest.approx(2 / 3)  # row 1's label is second
    assert acc[5] == 1.0  # k capped at the 3 classes


def test_recall_at_k_known_case():
    # Text j is image j rotated a little, except texts 0 and 1 are swapped: images 0 and 1
    # find their partner second, image 2 first; same for texts.
    img = torch.eye(3)
    txt = torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    rec = recall_at_k(img, txt, ks=(1, 2))
    assert rec["retrieval_i2t_r1"] == pytest.approx(1 / 3)
    assert rec["retrieval_i2t_r2"] == 1.0
    assert rec["retrieval_t2i_r1"] == pytest.approx(1 / 3)
    assert rec["retrieval_t2i_r2"] == 1.0


def test_templates_files():
    assert len(load_templates("imagenet80")) == 80
    assert all(t.count("{}") == 1 for t in load_templates("builtin"))
    with pytest.raises(ValueError, match="templates"):
        load_templates("no/such/file.txt")


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_hf_clip()


def test_zeroshot_eval_equals_direct_computation(tiny_model, synthetic_dir, tmp_path):
    """evaluate() (ImageFolder, template averaging, batching) vs a plain loop."""
    from data.eval_sets import imagefolder_samples, load_classnames
    from data.transforms import eval_transform

    model, tok = tiny_model
    templates = ["a photo of a {}.", "a {} on a dark background."]
    (tmp_path / "t.txt").write_text("\n".join(templates) + "\n")
    cfg = EvalConfig(zeroshot_dir=str(synthetic_dir / "val"), templates=str(tmp_path / "t.txt"),
                     batch_size=7)  # fmt: skip
    got = evaluate(model, tok, cfg)

    names = load_classnames(synthetic_dir / "classnames.txt")
    with torch.no_grad():
        emb = []
        for name in names:
            per_template = [encode_texts(model, tok, [t.format(name)])[0] for t in templates]
            emb.append(F.normalize(torch.stack(per_template).mean(0), dim=0))
        samples = imagefolder_samples(synthetic_dir / "val", names)
        transform = eval_transform(32)
        pixels = torch.stack([transform(Image.open(p)) for p, _ in samples])
        logits = encode_images(model, pixels) @ torch.stack(emb).T  # (N, C)
    labels = torch.tensor([y for _, y in samples])
    top1 = (logits.argmax(1) == labels).float().mean().item()
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert got["zeroshot_images"] == len(samples) == 60
    assert got["zeroshot_top1"] == pytest.approx(top1, abs=1e-9)
    assert got["zeroshot_top5"] == pytest.approx(top5, abs=1e-9)
    assert model.training is False


def test_retrieval_eval_runs_on_pairs(tiny_model, synthetic_dir):
    model, tok = tiny_model
    cfg = EvalConfig(retrieval_shards=str(synthetic_dir / "val_pairs"), batch_size=16)
    got = evaluate(model, tok, cfg)
    assert got["retrieval_pairs"] == 60
    assert 0.0 <= got["retrieval_i2t_r1"] <= got["retrieval_i2t_r5"] <= got["retrieval_i2t_r10"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"templates": "nope.txt"}, "templates"),
        ({"zeroshot_dir": "/no/such/dir"}, "zeroshot_dir"),
        ({"retrieval_shards": "/no/such/*.tar"}, "retrieval_shards"),
    ],
)
def test_eval_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        EvalConfig(**kwargs).validate()


def test_plot_writes_pngs(tmp_path):
    import json

    from trainer.eval.plot import plot_run

    lines = [{"kind": "train", "step": s, "loss": 3.0 / s} for s in range(1, 11)]
    lines += [{"kind": "eval", "step": s, "zeroshot_top1": s / 10} for s in (5, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    paths = plot_run(tmp_path)
    assert {p.name for p in paths} == {"loss.png", "zeroshot_top1.png", "curves.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_max_samples_spreads_over_classes(synthetic_dir):
    from trainer.eval.evaluate import zeroshot_samples

    cfg = EvalConfig(zeroshot_dir=str(synthetic_dir / "val"), max_samples=30)
    names, source = zeroshot_samples(cfg)
    assert len(source.items) == 30 and {y for _, y in source.items} == set(range(len(names)))


def test_evaluate_on_an_explicit_device_equals_the_default(tiny_model, synthetic_dir):
    model, tok = tiny_model
    cfg = EvalConfig(zeroshot_dir=str(synthetic_dir / "val"), max_samples=20, batch_size=8)
    assert evaluate(model, tok, cfg, device="cpu") == evaluate(model, tok, cfg)


# ---- sharded gather (gloo, 3 processes); the NCCL path is CUDA-only ------------------------


def _encode_items(batch: list[int]) -> dict[str, torch.Tensor]:
    values = torch.tensor(batch)
    return {"feat": torch.stack([values.float(), -values.float()], 1), "item": values}


def _gather_on_ranks(rank: int, world_size: int) -> dict:
    from trainer.eval.evaluate import gather_encoded, rank_batches

    def batches(n: int):
        return rank_batches(range(n), 2, rank, world_size)

    return {
        n: gather_encoded(_encode_items, batches(n), dummy=[-1], world_size=world_size)
        for n in (7, 2, 0)
    }  # 7: ragged ranks and batches; 2: the last rank has nothing (dummy forwards); 0: none


def test_gather_encoded_over_ranks_returns_every_row_once_on_every_rank():
    from tests.support.localdist import run_ranks

    for got in run_ranks(_gather_on_ranks, 3):
        for n in (7, 2):
            order = got[n]["item"].argsort()
            assert got[n]["item"].dtype == torch.long
            assert got[n]["item"][order].tolist() == list(range(n))
            assert got[n]["feat"][order].tolist() == [[float(i), -float(i)] for i in range(n)]
        assert got[0] == {}


# ---- `disco-clip eval --device` -------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny_model(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    out = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _eval_cli(capsys, *args: str) -> tuple[int, str, str]:
    from trainer.cli import main

    capsys.readouterr()
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_cli_device_cpu_equals_default(saved_tiny_model, synthetic_dir, capsys):
    args = ("--model", str(saved_tiny_model), "--zeroshot", str(synthetic_dir / "val"))
    code, default_out, err = _eval_cli(capsys, *args)
    assert code == 0, err
    code, cpu_out, err = _eval_cli(capsys, *args, "--device", "cpu")
    assert code == 0, err
    assert "zeroshot_top1:" in cpu_out
    if not torch.cuda.is_available():  # the default is cpu here
        assert cpu_out == default_out


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "cuda:x"])
def test_eval_cli_bad_device_is_one_line_exit_2(saved_tiny_model, synthetic_dir, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:x":
        pytest.skip("this machine has CUDA")
    args = ("--model", str(saved_tiny_model), "--zeroshot", str(synthetic_dir / "val"))
    code, out, err = _eval_cli(capsys, *args, "--device", device)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("disco-clip eval: error: --device:") and "Traceback" not in err
