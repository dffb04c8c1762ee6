"""Captions: path normalisation, alignment to the manifest, digit captions, text encoders, embed stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sourceflow.data import captions as cap
from sourceflow.data.manifest import manifest_hash, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def run_stage(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize(("path", "prefix", "expected"), [
    ("n01/x.JPEG", "", "n01/x.JPEG"),
    ("./n01/x.JPEG", "", "n01/x.JPEG"),
    ("n01//./x.JPEG", "", "n01/x.JPEG"),
    ("n01\\x.JPEG", "", "n01/x.JPEG"),
    ("train/n01/x.JPEG", "train", "n01/x.JPEG"),
    ("train/n01/x.JPEG", "train/", "n01/x.JPEG"),
    ("./train/n01/x.JPEG", "train", "n01/x.JPEG"),
    ("/data/imagenet/train/n01/x.JPEG", "/data/imagenet/train", "n01/x.JPEG"),
    ("trainer/x.JPEG", "train", "trainer/x.JPEG"),  # only on a folder boundary
    ("/abs/x.png", "", "/abs/x.png"),
    ("N01/X.jpeg", "", "N01/X.jpeg"),  # case kept
])
def test_normalize_path(path, prefix, expected):
    assert cap.normalize_path(path, prefix) == expected


def test_digit_captions():
    labels = np.array([7, 0, 3, 7, 9] * 20)
    a = cap.digit_captions(labels, seed=0)
    assert a == cap.digit_captions(labels, seed=0)
    assert a != cap.digit_captions(labels, seed=1)
    for y, c in zip(labels, a, strict=True):
        assert cap.NUMBER_WORDS[y] in c or str(y) in c
    assert "a handwritten digit seven" in cap.digit_captions([7] * 60, seed=0)
    assert len({t for t in a}) > 6  # several templates are used
    with pytest.raises(ValueError):
        cap.digit_captions([10], seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_caption_jsonl_errors(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"path": "a.png", "recaption_short": "x"}, {"file": "b.png", "txt": "y"}])
    with pytest.raises(KeyError, match=r"c.jsonl:2: no field 'path'"):
        cap.read_caption_jsonl(p)
    (tmp_path / "d.jsonl").write_text('{"path": "a", "recaption_short": "x"}\n\n{broken\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        cap.read_caption_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"img": "a", "txt": "x"}\n\n{"img": "b", "txt": "y"}\n')
    df = cap.read_caption_jsonl(tmp_path / "e.jsonl", path_field="img", caption_field="txt")
    assert df["path"].tolist() == ["a", "b"] and df["line"].tolist() == [1, 3]


def manifest_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(n), "path": [f"c{i % 3}/img{i:03d}.jpg" for i in range(n)],
                         "label": np.arange(n) % 3, "split": ["train"] * n})


def test_align_renamed_and_missing():
    rows = manifest_rows(10)
    caps = pd.DataFrame({
        "path": ["./c0/img000.jpg", "train/c1/img001.jpg", "c2/img002.jpg", "c0/img003.JPG",  # 3rd: no prefix; 4th: renamed
                 "c1/img004.jpg", "c2/img005.jpg", "c0/img006.jpg", "c1/img007.jpg", "c2/img008.jpg",
                 "c1/img004.jpg", "other/extra.jpg"],
        "caption": [f"caption {i}" for i in range(11)]})
    caps.loc[9, "caption"] = "caption 4 again"
    al = cap.align_captions(rows, caps, prefix="train")
    r = al.report
    assert r["images"] == 10 and r["images_matched"] == 8 and r["images_without_caption"] == 2
    assert r["images_without_caption_paths"] == ["c0/img003.jpg", "c0/img009.jpg"]
    assert r["caption_paths_unmatched"] == 2
    assert r["unmatched_caption_paths_examples"] == ["c0/img003.JPG", "other/extra.jpg"]
    assert r["duplicate_caption_lines"] == 1 and r["duplicate_caption_lines_with_a_different_caption"] == 1
    assert al.fraction == pytest.approx(0.8)
    a = al.aligned
    assert a["index"].tolist() == list(range(10)) and a["path"].tolist() == rows["path"].tolist()
    assert a["caption"].tolist()[:5] == ["caption 0", "caption 1", "caption 2", "", "caption 4"]  # first line wins
    assert a["caption"].iat[9] == ""


def test_align_split_roots():
    rows = pd.DataFrame({"index": [0, 1, 2], "path": ["train/a/x.jpg", "train/b/y.jpg", "val/a/z.jpg"],
                         "label": [0, 1, 0], "split": ["train", "train", "test"]})
    caps = pd.DataFrame({"path": ["a/x.jpg", "b/y.jpg"], "caption": ["x", "y"]})
    al = cap.align_captions(rows[rows.split == "train"], caps, split_roots={"train": "train", "test": "val"})
    assert al.fraction == 1.0 and al.aligned["caption"].tolist() == ["x", "y"]


def make_manifest(tmp_path: Path, n: int = 20) -> Path:
    rows = manifest_rows(n)
    rows["split"] = ["train"] * (n - 4) + ["test"] * 4
    out = tmp_path / "ds" / "manifest.parquet"
    write_manifest(out, rows, {"root": str(tmp_path / "img"), "split_roots": {"train": "", "test": ""},
                               "counts": {"train": n - 4, "test": 4}})
    return out


def test_align_stage_threshold_message(tmp_path):
    man = make_manifest(tmp_path, 20)
    rows = manifest_rows(20)
    caps = [{"path": p, "recaption_short": f"a photo number {i}"} for i, p in enumerate(rows["path"])]
    caps[2]["path"] = "c2/renamed_002.jpg"
    caps[5]["path"] = "c2/IMG005.jpg"
    jsonl = write_jsonl(tmp_path / "caps.jsonl", caps)
    out = tmp_path / "ds" / "captions" / "aligned.parquet"
    res = run_stage("align_captions", "--manifest", str(man), "--captions", str(jsonl), "--out", str(out))
    assert res.returncode == 2
    err = error_lines(res)
    assert len(err) == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    msg = err[0]
    assert "14 of 16 images" in msg and "87.50%" in msg
    for p in ["c2/img002.jpg", "c2/img005.jpg", "c2/renamed_002.jpg", "c2/IMG005.jpg"]:
        assert p in msg, msg
    assert not out.exists()
    assert json.loads(out.with_name("match_report.json").read_text())["ok"] is False
    # below the threshold it passes: the two images get an empty caption and are listed
    res = run_stage("align_captions", "--manifest", str(man), "--captions", str(jsonl), "--min-match-fraction",
                    "0.8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    a = pd.read_parquet(out)
    assert a["index"].tolist() == list(range(16))
    assert a.loc[a.caption == "", "path"].tolist() == ["c2/img002.jpg", "c2/img005.jpg"]
    rep = json.loads(out.with_name("match_report.json").read_text())
    assert rep["images_without_caption_paths"] == ["c2/img002.jpg", "c2/img005.jpg"]
    assert rep["caption_paths_unmatched"] == 2 + 4  # the 2 renamed paths + the captions of the 4 test images
    assert rep["manifest_hash"] == manifest_hash(man) and rep["ok"] is True
    # a later failed alignment removes the table it can no longer vouch for
    res = run_stage("align_captions", "--manifest", str(man), "--captions", str(jsonl), "--out", str(out))
    assert res.returncode == 2 and not out.exists()


# --- text encoders -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from sourceflow.encoders.text import load_text_encoder

    return load_text_encoder("minilm", max_length=32)


def reference_pooled(weights: str, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' own pipeline if it imports offline, else the same steps in plain transformers."""
    try:
        from sentence_transformers import SentenceTransformer
    except Exception:  # noqa: BLE001 - any import failure means: use the direct computation
        SentenceTransformer = None
    if SentenceTransformer is not None:
        st = SentenceTransformer(weights, device="cpu")
        return st.encode(texts, convert_to_tensor=True, batch_size=8)
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(weights), AutoModel.from_pretrained(weights).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)


def test_minilm_matches_sentence_transformers(minilm):
    texts = ["a handwritten digit seven", "", "the number 7 written by hand", "a dog on a beach at sunset"]
    tokens, mask, pooled = minilm.encode(texts)
    assert minilm.name == "minilm" and minilm.dim == 384 and minilm.max_length == 32
    assert tokens.shape == (4, 32, 384) and tokens.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.uint8 and pooled.shape == (4, 384)
    assert mask[1].sum() == 2  # [CLS] [SEP]
    assert (tokens[mask == 0] == 0).all()
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(pooled, reference_pooled(minilm.weights, texts), atol=1e-5, rtol=0)


def tiny_clip(path: Path) -> Path:
    """A random 2-layer CLIP text model with a character-level BPE tokenizer, saved like a real one."""
    from sourceflow.standins import save_clip_text

    return save_clip_text(path)


def test_clip_round_trip(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from sourceflow.encoders.text import load_text_encoder

    path = tiny_clip(tmp_path / "clip")
    enc = load_text_encoder("clip", str(path))
    assert enc.name == "clip" and enc.dim == 32 and enc.max_length == 77
    texts = ["a cat", "seven, written by hand!"]
    tokens, mask, pooled = enc.encode(texts)
    assert tokens.shape == (2, 77, 32) and mask.shape == (2, 77) and pooled.shape == (2, 32)
    tok = CLIPTokenizer.from_pretrained(path)
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    assert ids["input_ids"][0, :4].tolist() == [0, vocab_id(tok, "a</w>"), vocab_id(tok, "cat</w>"), 1]
    assert mask.sum(1).tolist() == ids["attention_mask"].sum(1).tolist() == [4, len(tok.tokenize(texts[1])) + 2]
    with torch.no_grad():
        out = CLIPTextModel.from_pretrained(path)(**ids)
    torch.testing.assert_close(tokens, out.last_hidden_state)
    torch.testing.assert_close(pooled, out.pooler_output)
    torch.testing.assert_close(pooled, out.last_hidden_state[torch.arange(2), mask.sum(1).long() - 1])  # the EOS token
    with pytest.raises(ValueError, match="exceeds"):
        load_text_encoder("clip", str(path), max_length=78)


def vocab_id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def test_text_encoder_missing_weights(tmp_path):
    from sourceflow.encoders.text import load_text_encoder

    with pytest.raises(FileNotFoundError, match=f"weights not found: {tmp_path / 'nope'}"):
        load_text_encoder("clip", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_text_encoder("minilm", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder("clip", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("t5")


@pytest.mark.slow
def test_embed_stage_end_to_end(tmp_path, minilm):
    """align + embed as subprocesses on 24 captions with the real MiniLM weights (12 s idle, ~30 s loaded)."""
    import zarr

    man = make_manifest(tmp_path, 24)
    rows = manifest_rows(24)
    texts = cap.digit_captions(rows["label"].to_numpy(), seed=0)
    texts[3] = ""
    jsonl = write_jsonl(tmp_path / "caps.jsonl", [{"path": p, "recaption_short": t} for p, t in
                                                   zip(rows["path"], texts, strict=True)])
    aligned = tmp_path / "ds" / "captions" / "aligned.parquet"
    res = run_stage("align_captions", "--manifest", str(man), "--captions", str(jsonl), "--split", "all",
                    "--out", str(aligned))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "ds" / "captions" / "minilm.zarr"
    res = run_stage("embed_captions", "--manifest", str(man), "--aligned", str(aligned), "--split", "train",
                    "--max-length", "32", "--batch-size", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    g = zarr.open_group(out, mode="r")
    assert g.attrs["complete"] is True and g.attrs["text_encoder"] == "minilm" and g.attrs["max_length"] == 32
    assert g.attrs["manifest_hash"] == manifest_hash(man) and g.attrs["num_rows"] == 20
    assert g["tokens"].shape == (20, 32, 384) and g["tokens"].dtype == np.float32
    assert g["mask"].dtype == np.uint8 and g["pooled"].shape == (20, 384)
    np.testing.assert_array_equal(g["index"][:], np.arange(20))
    ref = reference_pooled(minilm.weights, texts[:20]).numpy()
    np.testing.assert_allclose(g["pooled"][:], ref, atol=1e-5)
    t, m, _ = minilm.encode(texts[:20])
    np.testing.assert_array_equal(g["mask"][:], m.numpy())
    np.testing.assert_allclose(g["tokens"][:], t.numpy(), atol=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    # float16, trimmed to the longest caption, row-granular: the same numbers where a caption has tokens
    half = tmp_path / "ds" / "captions" / "half.zarr"
    res = run_stage("embed_captions", "--manifest", str(man), "--aligned", str(aligned), "--split", "train",
                    "--max-length", "32", "--batch-size", "8", "--dtype", "float16", "--trim", "--out", str(half))
    assert res.returncode == 0, res.stderr
    h = zarr.open_group(half, mode="r")
    keep = int(m.sum(1).max())
    assert keep < 32 and h.attrs["length"] == keep and h.attrs["dtype"] == "float16" and h.attrs["max_length"] == 32
    assert h["tokens"].shape == (20, keep, 384) and h["tokens"].dtype == np.float16
    from sourceflow.store.sharded import chunk_rows

    assert h["tokens"].chunks[0] == chunk_rows(8, keep * 384 * 2) < 8 and h["tokens"].shards[0] == 8
    np.testing.assert_array_equal(h["mask"][:], m.numpy()[:, :keep])
    assert not m.numpy()[:, keep:].any()  # nothing but padding was dropped
    np.testing.assert_array_equal(h["tokens"][:], g["tokens"][:, :keep].astype(np.float16))
    np.testing.assert_array_equal(h["pooled"][:], g["pooled"][:].astype(np.float16))
    from sourceflow.data.latent_data import _caption_rows

    rows_f16 = _caption_rows(half, np.arange(20), manifest_hash(man), 1e-6)  # streamed from the store
    rows_f32 = _caption_rows(out, np.arange(20), manifest_hash(man), 1000.0)
    got, want = rows_f16[np.array([3, 0, 19])], rows_f32[np.array([3, 0, 19])]
    assert got.dtype == torch.float32 and got.shape == (3, keep, 385)
    torch.testing.assert_close(got, want[:, :keep], atol=2e-3, rtol=1e-3)
    # the test split was aligned too (--split all); a train-only alignment cannot embed the test split
    res = run_stage("align_captions", "--manifest", str(man), "--captions", str(jsonl), "--out", str(aligned))
    assert res.returncode == 0, res.stderr
    res = run_stage("embed_captions", "--manifest", str(man), "--aligned", str(aligned), "--split", "test",
                    "--out", str(tmp_path / "t.zarr"))
    assert res.returncode == 2 and "--split test" in error_lines(res)[0]
