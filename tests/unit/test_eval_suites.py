"""ImageNet-family suites (trainer/eval/suites.py), k-caption retrieval (trainer/eval/retrieval.py,
data/eval_sets.py), eval-set checks in EvalConfig.validate, and `disco-clip eval --imagenet ...`.

A failure here localises to: the shipped class lists (trainer/templates/imagenet_*.txt), a
layout reader or the subset masking (suites.py), the k-caption recall definition
(retrieval.py) or its readers (eval_sets.py), the fail-early checks (evaluate.py) or the CLI
table (command.py). Fixtures are tiny folders of 8 px images made here; the model is a random
1-layer HF CLIPModel with the shipped tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.support.models import tiny_hf_clip
from trainer.eval.evaluate import EvalConfig, encode_images, encode_texts, evaluate
from trainer.eval.retrieval import recall_at_k, recall_at_k_multi
from trainer.eval.suites import (
    format_table,
    imagenet_classnames,
    imagenet_wnids,
    masked_topk,
    run_suites,
    shipped_list,
    suite_rows,
    suite_samples,
)

WNIDS = imagenet_wnids()


def _images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="JPEG")


def _wnid_set(root, indices, per_class=2):
    for k, i in enumerate(indices):
        _images(root / WNIDS[i], per_class, seed=k)
    return root


# ---- shipped lists --------------------------------------------------------------------------


def test_shipped_class_lists():
    names = imagenet_classnames()
    assert len(WNIDS) == len(set(WNIDS)) == 1000
    assert len(names) == len(set(names)) == 1000
    assert sorted(WNIDS) == WNIDS and all(re.match(r"^n\d{8}$", w) for w in WNIDS)
    known = [(0, "n01440764", "tench"), (1, "n01443537", "goldfish"),
             (207, "n02099601", "golden retriever"), (999, "n15075141", "toilet paper"),
             (2, "n01484850", "great white shark"), (9, "n01518878", "ostrich"),
             (657, "n03773504", "missile"), (744, "n04008634", "projectile")]  # fmt: skip
    for index, wnid, name in known:
        assert WNIDS[index] == wnid and names[index].lower() == name, index
    for subset, first in (("imagenet_r_wnids", "n01443537"), ("imagenet_a_wnids", "n01498041")):
        wnids = shipped_list(subset)
        assert len(wnids) == len(set(wnids)) == 200 and set(wnids) <= set(WNIDS), subset
        assert wnids == sorted(wnids) and wnids[0] == first
    assert suite_rows("imagenet_r")[:4] == [1, 2, 4, 6] and suite_rows("imagenet") is None
    assert suite_rows("imagenet_a")[:4] == [6, 11, 13, 15] and suite_rows("imagenet_a")[-1] == 988


# ---- layouts --------------------------------------------------------------------------------


def test_layout_readers(tmp_path):
    val = _wnid_set(tmp_path / "val", [0, 207, 999])
    samples = suite_samples("imagenet", val)
    assert [y for _, y in samples] == [0, 0, 207, 207, 999, 999]
    assert samples[2][0].parent.name == "n02099601"
    for index in (0, 5, 999):
        _images(tmp_path / "v2" / str(index), 1, seed=index)
    assert [y for _, y in suite_samples("imagenet_v2", tmp_path / "v2")] == [0, 5, 999]
    assert len(suite_samples("imagenet", val, max_samples=3)) == 3

    with pytest.raises(ValueError, match=r"class-index folder.*wnid layout"):
        suite_samples("imagenet_v2", val)
    with pytest.raises(ValueError, match=r"not an ImageNet wnid folder.*ImageNet-V2"):
        suite_samples("imagenet_sketch", tmp_path / "v2")
    with pytest.raises(ValueError, match="not one of ImageNet-R's 200 classes"):
        suite_samples("imagenet_r", val)  # tench (0) is not in ImageNet-R
    r = _wnid_set(tmp_path / "r", [1, 207])
    assert [y for _, y in suite_samples("imagenet_r", r)] == [1, 1, 207, 207]


def test_masking_changes_the_answer():
    """An image closest to tench (absent from ImageNet-R), then to goldfish (present): the
    1,000-way argmax is wrong, the argmax over R's 200 rows is right."""
    emb = torch.eye(1000)  # class c's embedding = basis vector c
    img = F.normalize(0.9 * emb[0] + 0.4 * emb[1] + 0.1 * emb[2], dim=0)[None]
    labels = torch.tensor([1])
    assert masked_topk(img, labels, emb)[1] == 0.0
    assert masked_topk(img, labels, emb, suite_rows("imagenet_r"))[1] == 1.0
    with pytest.raises(ValueError, match="outside the subset"):
        masked_topk(img, torch.tensor([0]), emb, suite_rows("imagenet_r"))


def test_format_table():
    table = format_table({"ours": {"imagenet": 0.3141, "imagenet_r": 0.5}, "ref": {"imagenet": 1}})
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" model ", " ImageNet ", " ImageNet-R "]
    assert "31.41" in lines[2] and "50.00" in lines[2] and lines[3].rstrip().endswith("- |")


# ---- k captions per image -------------------------------------------------------------------


def _brute_recall(img, txt, owner, ks):
    sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    out = {}
    for k in ks:
        i2t = [bool(set(sims[i].topk(k).indices.tolist()) & set((owner == i).nonzero().flatten().tolist()))
               for i in range(len(img))]  # fmt: skip
        t2i = [owner[t].item() in sims[:, t].topk(min(k, len(img))).indices.tolist()
               for t in range(len(txt))]  # fmt: skip
        out[f"retrieval_i2t_r{k}"] = sum(i2t) / len(i2t)
        out[f"retrieval_t2i_r{k}"] = sum(t2i) / len(t2i)
    return out


def test_multi_caption_recall_definition():
    # image 0's first caption looks like image 1, its second like itself, and image 2's caption
    # is closer to image 0 than image 0's first: one-caption recall (first captions only)
    # misses image 0 at R@1, k-caption recall finds it.
    img = torch.eye(3)
    txt = torch.tensor([[0.2, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.5, 0.0, 1.0]])
    owner = torch.tensor([0, 0, 1, 2])
    multi = recall_at_k_multi(img, txt, owner, ks=(1, 2))
    single = recall_at_k(img, txt[[0, 2, 3]], ks=(1, 2))
    assert multi["retrieval_i2t_r1"] == 1.0
    assert single["retrieval_i2t_r1"] == pytest.approx(2 / 3)
    assert multi["retrieval_t2i_r1"] == pytest.approx(3 / 4)  # caption 0 finds image 1 first
    torch.manual_seed(0)
    img, txt = torch.randn(7, 5), torch.randn(20, 5)
    owner = torch.cat([torch.arange(7), torch.randint(0, 7, (13,))])
    got = recall_at_k_multi(img, txt, owner, ks=(1, 3, 5))
    assert got == pytest.approx(_brute_recall(img, txt, owner, (1, 3, 5)))
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k_multi(img, txt[:3], owner[:3])


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_hf_clip()


def _caption_fixture(tmp_path):
    _images(tmp_path / "imgs", 4, seed=7)
    caps = {
        "imgs/img0.JPEG": ["a red circle", "a small red circle on black"],
        "imgs/img1.JPEG": ["a blue square"],
        "imgs/img2.JPEG": ["a green triangle", "green shape", "a triangle"],
        "imgs/img3.JPEG": ["a yellow star", "star"],
    }
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    rows = ["image,caption"] + [f'{i},"{c}"' for i, cs in caps.items() for c in cs]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    return caps


def test_retrieval_from_caption_files(tiny_model, tmp_path):
    from data.transforms import eval_transform

    model, tok = tiny_model
    caps = _caption_fixture(tmp_path)
    got = evaluate(
        model, tok, EvalConfig(retrieval_shards=str(tmp_path / "caps.json"), batch_size=3)
    )
    assert got["retrieval_images"] == 4 and got["retrieval_pairs"] == 8
    with torch.no_grad():
        pixels = torch.stack(
            [eval_transform(32)(Image.open(tmp_path / p).convert("RGB")) for p in caps]
        )
        img = encode_images(model, pixels)
        txt = encode_texts(model, tok, [c for cs in caps.values() for c in cs])
    owner = torch.tensor([i for i, cs in enumerate(caps.values()) for _ in cs])
    for key, value in recall_at_k_multi(img, txt, owner).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    from_csv = evaluate(model, tok, EvalConfig(retrieval_shards=str(tmp_path / "caps.csv")))
    assert from_csv == pytest.approx(got)


def test_retrieval_from_shards_with_caption_lists(tiny_model, tmp_path):
    import io

    from data.eval_loader import wds_captioned
    from data.shards import write_shard

    def jpeg(seed):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (seed * 40, 0, 0)).save(buf, format="JPEG")
        return buf.getvalue()

    members = [("a.jpg", jpeg(1)), ("a.json", json.dumps({"captions": ["x one", "x two"]}).encode()),
               ("b.jpg", jpeg(2)), ("b.txt", b"first caption\nsecond caption\n"),
               ("c.jpg", jpeg(3)), ("c.txt", b"just one")]  # fmt: skip
    write_shard(tmp_path / "s-0.tar", members)
    assert [c for _, c in wds_captioned(str(tmp_path / "s-0.tar"))] == [
        ["x one", "x two"], ["first caption", "second caption"], ["just one"]]  # fmt: skip
    model, tok = tiny_model
    got = evaluate(model, tok, EvalConfig(retrieval_shards=str(tmp_path)))
    assert got["retrieval_images"] == 3 and got["retrieval_pairs"] == 5


# ---- fail early -----------------------------------------------------------------------------


def test_validate_opens_every_named_set(tmp_path, synthetic_dir):
    val = _wnid_set(tmp_path / "in" / "val", [0, 1])
    shutil.copy(synthetic_dir / "classnames.txt", tmp_path / "in" / "classnames.txt")
    cfg = EvalConfig(every=5, zeroshot_dir=str(val))
    with pytest.raises(ValueError, match=r"^zeroshot_dir: no folder for class .*eval\.suites"):
        cfg.validate()
    with pytest.raises(ValueError, match=r"^classnames: .*wnid layout"):
        EvalConfig(every=5, zeroshot_dir=str(tmp_path / "in" / "val"),
                   classnames=str(tmp_path / "none.txt")).validate()  # fmt: skip
    EvalConfig(every=5, suites={"imagenet": str(val)}).validate()
    with pytest.raises(ValueError, match=r"^suites\.imagenet_v2: .*class-index folder"):
        EvalConfig(suites={"imagenet_v2": str(val)}).validate()
    with pytest.raises(ValueError, match=r"^suites: unknown set 'imagenet_x'"):
        EvalConfig(suites={"imagenet_x": str(val)}).validate()
    EvalConfig(every=5, zeroshot_dir=str(synthetic_dir / "val"),
               retrieval_shards=str(synthetic_dir / "val_pairs")).validate()  # fmt: skip

    _caption_fixture(tmp_path)
    EvalConfig(retrieval_shards=str(tmp_path / "caps.json")).validate()
    (tmp_path / "bad.json").write_text(json.dumps({"imgs/img0.JPEG": ["line one\nline two"]}))
    with pytest.raises(ValueError, match=r"^retrieval_shards: .*spans several lines"):
        EvalConfig(retrieval_shards=str(tmp_path / "bad.json")).validate()
    (tmp_path / "gone.json").write_text(json.dumps({"nope.jpg": ["a"]}))
    with pytest.raises(ValueError, match=r"^retrieval_shards: .*nope.jpg not found"):
        EvalConfig(retrieval_shards=str(tmp_path / "gone.json")).validate()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "x-0.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match=r"^retrieval_shards: .*x-0.tar"):
        EvalConfig(retrieval_shards=str(tmp_path / "shards")).validate()
    with pytest.raises(ValueError, match=r"^zeroshot_dir: .*x-0.tar"):
        EvalConfig(zeroshot_dir=str(tmp_path / "shards" / "x-0.tar")).validate()


# ---- the command ----------------------------------------------------------------------------


def test_eval_cli_prints_the_table(tiny_model, tmp_path, capsys):
    from data.tokenizer import BUILTIN_TOKENIZER_DIR
    from trainer.cli import main

    model, tok = tiny_model
    export = tmp_path / "tiny-clip"
    model.save_pretrained(export)
    for f in BUILTIN_TOKENIZER_DIR.iterdir():
        shutil.copy(f, export / f.name)
    val = _wnid_set(tmp_path / "val", [1, 2, 207, 500])
    r = _wnid_set(tmp_path / "r", [1, 2, 207])
    (tmp_path / "one.txt").write_text("a photo of a {}.\n")
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(export), "--imagenet", str(val), "--imagenet-r", str(r),
                 "--suite-templates", str(tmp_path / "one.txt"), "--device", "cpu",
                 "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| model" in printed.out and "ImageNet-R" in printed.out and "tiny-clip" in printed.out
    results = json.loads(out.read_text())
    assert (
        results["sets"]["imagenet"]["images"] == 8
        and results["sets"]["imagenet_r"]["classes"] == 200
    )
    with torch.no_grad():
        direct = run_suites(model, tok, {"imagenet": str(val), "imagenet_r": str(r)},
                            templates=str(tmp_path / "one.txt"))  # fmt: skip
    for key in ("imagenet", "imagenet_r"):
        assert results["sets"][key]["top1"] == pytest.approx(direct[key]["top1"], abs=1e-9)
        assert f"{100 * direct[key]['top1']:.2f}" in printed.out
    assert main(["eval", "--model", str(export), "--imagenet-v2", str(val)]) == 2
    assert "suites.imagenet_v2" in capsys.readouterr().err
