"""sample: draw samples from a trained run over a solver × steps sweep.

For every entry of spec.sample.solvers (e.g. euler with steps [1, 2, 4, 8], dopri5), from the EMA
weights, with classifier-free guidance (sample.guidance_scale) or autoguidance (sample.autoguidance:
--guide-model/--guide-spec name the guide run), MM-FM's modes drawn by mixture weight, CSFM's
conditional source shared by guided branches.

Toy points (--data): OUT/{tag}/samples.npz with `x` (samples), `x0` (source draws), `cond` (the
test-split condition of each sample), `mode` (GMM mode, MM-FM), `energy` (∫‖v‖²dt per trajectory) and
`displacement` (‖x1 − x0‖²), plus info.json (solver, steps, true NFE, time).

Image latents (--latents …): samples are decoded by the encoder's decoder (identity for pixels,
AutoencoderKL.decode for sd-vae) and written shard by shard (sample.shard_rows) to
OUT/{tag}/samples.zarr (images uint8 NHWC, cond_row, label, mode, energy, displacement, nfe); a
killed run resumes at the first unwritten shard, and every shard is a pure function of (seed, tag,
shard), so the result does not depend on kills or on the number of processes. Once complete:
OUT/{tag}/samples.npz in ADM's layout (arr_0 uint8 [N, H, W, 3], plus label and mode) and info.json.
Conditions (class labels, captions) are those of a seeded shuffle of the training images. Several
processes split the shards: `torchrun --nproc_per_node N stages/sample.py …` (ACCELERATE_USE_CPU=1 on CPU).

OUT/index.json lists every entry once the sweep is complete. Entries already written for the same
model are skipped (resumable).

Examples:
  python stages/sample.py --spec results/moons/runs/fm/spec_sample.json --data results/moons/toy.safetensors \\
      --model results/moons/runs/fm/seed0/model.safetensors --out results/moons/runs/fm/seed0/samples
  python stages/sample.py --spec results/digits/runs/fm/spec_sample.json \\
      --latents results/digits/pixels/latents.zarr --stats results/digits/pixels/latent_stats.safetensors \\
      --manifest results/digits/manifest.parquet --model results/digits/runs/fm/seed0/model.safetensors \\
      --out results/digits/runs/fm/seed0/samples
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import build, cli  # noqa: E402


def _model_id(path: str | None) -> str | None:
    import hashlib

    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _guide(a, spec, data, device):
    """The autoguidance guide model (its own spec and weights), or None."""
    from sourceflow.config import load_spec
    from sourceflow.train.checkpoint import load_trained

    g = spec["sample"].get("autoguidance")
    if g is None:
        return None, 1.0
    if a.guide_model is None or a.guide_spec is None:
        raise ValueError(f"sample.autoguidance names {g['experiment']!r}: give --guide-model and --guide-spec")
    gspec = load_spec(a.guide_spec)
    model = build.build_model(gspec, data)
    load_trained(a.guide_model, model, build.build_method(gspec, data, a.seed, a.gmm, a.source_gmm))
    return model.to(device), float(g.get("scale", 1.5))


def _identity(s: dict, ids: dict, seed: int, tag: str, solver: str, steps: int | None, n: int) -> dict:
    """Everything a sweep entry's samples depend on: the model (and guide) bytes, the entry, the seed and
    every sampling setting (batch_size too: it decides how the draws are split and dopri5's steps)."""
    return {**ids, "tag": tag, "solver": solver, "steps": steps, "num_samples": n, "seed": seed,
            "settings": {k: s[k] for k in ("shift", "rtol", "atol", "guidance_scale", "traj_points", "batch_size",
                                           "shard_rows", "t_end", "uint8") if k in s},
            **({"precision": s["precision"]} if s.get("precision", "fp32") != "fp32" else {}),
            "autoguidance": s.get("autoguidance")}


def _done(d: Path, identity: dict) -> bool:
    """Whether ``d`` already holds this entry's finished samples for exactly this identity."""
    from sourceflow.io import read_json

    info = d / "info.json"
    return info.exists() and (d / "samples.npz").exists() and read_json(info).get("identity") == identity


def toy_mode(a, spec) -> dict:
    import numpy as np
    import torch

    from sourceflow.config import sweep_tags
    from sourceflow.io import atomic_path, log_timings, read_json, write_json
    from sourceflow.sampling import generate
    from sourceflow.train.checkpoint import load_trained

    s = spec["sample"]
    train_data = build.load_points(a.data, "train")
    test = build.load_points(a.data, "test")
    model = build.build_model(spec, train_data)
    method = build.build_method(spec, train_data, a.seed, a.gmm)
    load_trained(a.model, model, method)
    guide, guide_scale = _guide(a, spec, train_data, "cpu")
    model_id = _model_id(a.model)
    ids = {"model_id": model_id, "guide_id": _model_id(a.guide_model)}
    n = s["num_samples"]
    reps = -(-n // len(test))
    cond_all = test.condition(spec["conditioning"])
    cond = None if cond_all is None else cond_all.repeat(reps, *([1] * (cond_all.dim() - 1)))[:n]
    cs = build.cond_spec(spec, train_data)
    index = {}
    for i, (tag, solver, steps) in enumerate(sweep_tags(s)):
        d = Path(a.out) / tag
        info_path = d / "info.json"
        identity = _identity(s, ids, a.seed, tag, solver, steps, n)
        if _done(d, identity):
            print(f"{tag}: already sampled, skipping")
            index[tag] = read_json(info_path)
            continue
        g = torch.Generator().manual_seed(a.seed * 1000 + i)
        res = generate(model, method, n, cond, solver, steps, g, batch_size=s["batch_size"], shift=s["shift"],
                       rtol=s["rtol"], atol=s["atol"], guidance_scale=s["guidance_scale"],
                       null_id=cs.null_id if cs.kind == "discrete" else None, traj_points=s["traj_points"],
                       guide=guide, guide_scale=guide_scale, t_end=s["t_end"], precision=s["precision"])
        arrays = {"x": res.x, "x0": res.x0, "energy": res.energy, "displacement": res.displacement}
        if cond is not None:
            arrays["cond"] = cond.numpy()
        if res.mode is not None:
            arrays["mode"] = res.mode
        with atomic_path(d / "samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        info = {"solver": solver, "steps": steps, "nfe": res.nfe, "num_samples": n, "model_id": model_id,
                "seed": a.seed, "identity": identity}
        write_json(info_path, info)
        index[tag] = info
        log_timings("sample", tag=tag, seconds=round(res.seconds, 3))
        print(f"{tag}: {n} samples, NFE {res.nfe}, {res.seconds:.2f} s")
    return index


def image_mode(a, spec) -> dict | None:
    """Sample, decode and store images; returns the index on rank 0 (None on other ranks)."""
    import time

    import numpy as np
    import torch
    from accelerate import PartialState

    from sourceflow.config import sweep_entries
    from sourceflow.data.images import to_uint8
    from sourceflow.io import log_timings, read_json, write_json, write_npz_rows
    from sourceflow.sampling import generate, sample_store_arrays, write_sample_store
    from sourceflow.train.checkpoint import load_trained
    from sourceflow.train.loop import step_generator

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    rank, world = state.process_index, state.num_processes
    device = state.device
    s = spec["sample"]
    if s["precision"] != "fp32" and rank == 0:
        print(f"sample.precision {s['precision']}: " + ("the velocity model only; solver and decoder fp32" if cuda
                                                        else "no GPU, fp32 (the identity still records it)"))
    data = build.load_data(a, spec, "train")
    model = build.build_model(spec, data)
    method = build.build_method(spec, data, a.seed, a.gmm, a.source_gmm)
    load_trained(a.model, model, method)
    model.to(device)
    method.to(device)
    guide, guide_scale = _guide(a, spec, data, device)
    decoder = build.load_decoder(data, device)
    cs = build.cond_spec(spec, data)
    kind = spec["conditioning"]
    cond_src = data.condition(kind) if method.cond_from == "data" else None
    n_max = max(e[3] for e in sweep_entries(s))
    # the same conditions, in the same order, for every entry (an entry with fewer samples takes the first)
    cond_rows_all = data.condition_rows(n_max, a.seed) if cond_src is not None else np.full(n_max, -1, np.int64)
    res_px = int(data.store_attrs["resolution"])
    ids = {"model_id": _model_id(a.model), "guide_id": _model_id(a.guide_model)}
    index = {}
    for tag, solver, steps, n in sweep_entries(s):
        cond_rows = cond_rows_all[:n]
        d = Path(a.out) / tag
        info_path = d / "info.json"
        identity = _identity(s, ids, a.seed, tag, solver, steps, n)
        if _done(d, identity):
            if rank == 0:
                print(f"{tag}: already sampled, skipping")
            index[tag] = read_json(info_path)
            continue

        def make_shard(sh: int, lo: int, hi: int, tag=tag, solver=solver, steps=steps, cond_rows=cond_rows
                       ) -> dict[str, np.ndarray]:
            gen = step_generator(a.seed, sh, f"sample/{tag}")
            rows = cond_rows[lo:hi]
            cond = None if cond_src is None else cond_src[torch.from_numpy(rows)]
            out = generate(model, method, hi - lo, cond, solver, steps, gen, batch_size=s["batch_size"],
                           shift=s["shift"], rtol=s["rtol"], atol=s["atol"], guidance_scale=s["guidance_scale"],
                           null_id=cs.null_id if cs.kind == "discrete" else None, traj_points=s["traj_points"],
                           guide=guide, guide_scale=guide_scale, t_end=s["t_end"], precision=s["precision"])
            with torch.no_grad():
                x = data.stats.denormalize(torch.from_numpy(out.x).to(device))
                images = np.concatenate([to_uint8(decoder.decode(x[i:i + s["batch_size"]]), mode=s["uint8"])
                                         for i in range(0, len(x), s["batch_size"])])
            label = data.label[torch.from_numpy(np.maximum(rows, 0))].numpy()
            return {"images": images, "cond_row": rows, "label": np.where(rows >= 0, label, -1),
                    "mode": out.mode if out.mode is not None else np.full(hi - lo, -1), "energy": out.energy,
                    "displacement": out.displacement, "nfe": np.full(hi - lo, out.nfe)}

        arrays = sample_store_arrays(n, res_px, None)
        arrays["nfe"] = ((n,), "int64")
        t0 = time.time()
        store = d / "samples.zarr"
        done = write_sample_store(store, identity, arrays, s["shard_rows"], make_shard, rank, world,
                                  state.wait_for_everyone, progress=not a.no_progress, max_shards=a.stop_after_shards)
        if done == "stopped":
            print(f"{tag}: stopped after {a.stop_after_shards} shard(s) (--stop-after-shards)")
            return None
        if rank != 0:
            continue
        import zarr

        z = zarr.open_group(str(store), mode="r")
        images = z["images"]  # streamed into the npz a chunk at a time (50k 256² samples are 9.8 GB)
        write_npz_rows(d / "samples.npz", {"arr_0": images, "label": z["label"], "mode": z["mode"]})
        nfe = np.asarray(z["nfe"][:])
        info = {"solver": solver, "steps": steps, "nfe": float(nfe.mean()) if solver == "dopri5" else int(nfe.max()),
                "model_evals_per_step": 2 if (guide is not None or s["guidance_scale"] != 1.0) else 1,
                "num_samples": n, "seed": a.seed, "processes": world,
                "image_shape": list(images.shape[1:]), **ids, "identity": identity}
        write_json(info_path, info)
        index[tag] = info
        seconds = log_timings("sample", tag=tag, seconds=round(time.time() - t0, 3))["seconds"]
        print(f"{tag}: {n} images, NFE {info['nfe']}, {seconds:.1f} s")
    state.wait_for_everyone()
    return index if rank == 0 else None


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--gmm", default=None, help="CLS GMM .safetensors (mmfm: the mode coupling; toy points: also the source)")
    p.add_argument("--source-gmm", default=None, help="spatial GMM .safetensors (mmfm on images: the source)")
    p.add_argument("--model", required=True, help="model.safetensors written by the train stage")
    p.add_argument("--guide-model", default=None, help="autoguidance: the guide run's model.safetensors")
    p.add_argument("--guide-spec", default=None, help="autoguidance: the guide run's spec_train.json")
    p.add_argument("--out", required=True, help="samples directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after-shards", type=int, default=None,
                   help="images: stop after writing this many shards of the first unfinished entry, without "
                        "finishing it (simulates a kill; for tests)")
    build.add_data_args(p, "test (conditions)")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    from sourceflow.config import load_spec
    from sourceflow.io import write_json

    spec = load_spec(a.spec)
    index = toy_mode(a, spec) if a.data is not None else image_mode(a, spec) if a.latents is not None else None
    if a.data is None and a.latents is None:
        raise ValueError("give either --data (toy points) or --latents (image latents)")
    if index is not None:
        write_json(Path(a.out) / "index.json", index)  # last: marks the sweep complete


if __name__ == "__main__":
    cli.run(main)
