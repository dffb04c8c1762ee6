"""Every damaged input named in one line (issue 10, item 4).

One case per damaged input: the file is truncated to half, overwritten in the middle, or (Zarr) loses a
chunk or gets broken metadata after the store is marked complete; the real stage that reads it runs in
this process (``sourceflow.cli.run``) and must exit 2 with exactly ONE ``error:`` line that names the file
and says what to do, print no traceback, and leave no half-written output (the output is absent or
unchanged, no ``*.tmp`` / ``*.partial`` files). The mechanism is ``sourceflow.io.reading``.

Messages (paths shortened to their last parts; the stage in brackets):

- store chunk missing [latent_stats]: ``s.zarr: the latent store is marked complete but 1 chunk file(s) are
  missing (first: spatial/c/1/0/0/0); delete the store and rerun the extract_latents stage``
- store chunk truncated [latent_stats]: ``s.zarr/spatial: not a readable Zarr array (a chunk file) (damaged or
  truncated? ValueError: Stored and computed checksum do not match. ...); delete the store and rerun ...``
- store array zarr.json truncated [latent_stats]: ``s.zarr/spatial/zarr.json: not a readable Zarr array
  metadata (damaged or truncated? JSONDecodeError: ...); delete the store and rerun the extract_latents stage``
- store group zarr.json overwritten [latent_stats]: ``s.zarr/zarr.json: not a readable Zarr group metadata
  (damaged or truncated? ...); delete the store and rerun the extract_latents stage``
- latent stats truncated [build_spatial_gmm]: ``latent_stats.safetensors: not a readable safetensors file
  (damaged or truncated? SafetensorError: ...); delete this latent stats and rerun the stage that writes it
  (run the latent_stats stage)``
- CLS GMM truncated [build_spatial_gmm] and header overwritten [train, mmfm]: ``cls_K4.safetensors: not a
  readable safetensors file (... SafetensorError ...); delete this GMM file and rerun ...``
- toy data truncated [train]: ``toy.safetensors: not a readable toy data file (safetensors) (...); delete it
  and rerun the make_toy_data stage``
- checkpoint model part truncated / trainer.json overwritten [train, resume]: ``checkpoints/last/model.safetensors:
  not a readable checkpoint file (...); delete .../checkpoints/last to start this run over (or rerun with
  --no-resume)``
- model.safetensors truncated [sample]: ``model.safetensors: not a readable trained model (safetensors) (...);
  delete it and rerun the train stage``
- reference npz truncated / overwritten [reference_stats --adm-npz]: ``VIRTUAL_x.npz: not a readable npz of
  plain arrays (damaged or truncated? BadZipFile: ...); delete it and rerun the reference_stats stage (or
  fetch the reference batch again)``
- caption JSONL with a non-JSON line [align_captions]: ``caps.jsonl:3: not valid JSON (...)``
- caption JSONL whose paths match no image [align_captions]: the match report line (``... of 16 manifest images
  have a caption ...``), naming the JSONL.
- caption store chunk missing / zarr.json truncated (read by train through ``load_latent_data``; checked
  through ``cli.run`` on that reader): ``minilm.zarr: the caption store is marked complete but ...``

- sample store shard missing / truncated / zarr.json truncated (read by evaluate through
  ``open_sample_store``): ``samples.zarr: the sample store is marked complete but 1 chunk file(s) are missing
  ...; delete it and rerun the sample stage``

Not covered: bytes overwritten inside a safetensors tensor payload or an uncompressed Zarr chunk hold no
checksum and read back as other numbers (no reader can tell); those cases overwrite a header instead.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sourceflow import cli
from sourceflow.store.sharded import create_sharded_group

from .test_store import random_store

ROOT = Path(__file__).resolve().parents[2]


def truncate(p: Path) -> None:
    """Cut the file to half its length (a copy or a write killed midway)."""
    b = p.read_bytes()
    p.write_bytes(b[:len(b) // 2])


def overwrite(p: Path, at: float = 0.5, n: int = 16) -> None:
    """Overwrite ``n`` bytes at fraction ``at`` of the file with 0xFF (bad sectors, a stray writer)."""
    b = bytearray(p.read_bytes())
    i = min(int(len(b) * at), max(0, len(b) - n))
    b[i:i + n] = b"\xff" * min(n, len(b) - i)
    p.write_bytes(bytes(b))


def first_chunk(array_dir: Path, k: int = 0) -> Path:
    return sorted(f for f in (array_dir / "c").rglob("*") if f.is_file())[k]


def stage(monkeypatch, capsys, name: str, *args) -> tuple[int, str]:
    """Run ``stages/<name>.py`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    code = 0
    try:
        runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def leftovers(d: Path) -> list[str]:
    return sorted(str(p) for p in d.rglob("*") if p.name.endswith((".tmp", ".partial")))


def assert_one_line(code: int, err: str, names: Path | str, *, also: str = "") -> str:
    """Exit 2, exactly one ``error:`` line naming ``names``, no traceback; returns the line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert str(names) in errors[0], errors[0]
    assert also in errors[0], errors[0]
    return errors[0]


# --- the inputs, built once ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory, points) -> dict[str, Path]:
    """Toy data, a CLS GMM, a finished toy fm run (model.safetensors) and a stopped one (a checkpoint)."""
    from sourceflow.build import save_points
    from sourceflow.gmm.diag import DiagGMM

    from .test_train import make_spec

    d = tmp_path_factory.mktemp("toy_runs")
    pts, _ = points
    data = d / "toy.safetensors"
    test = type(pts)(pts.x.clone(), pts.label.clone(), pts.num_classes)
    save_points(data, {"train": pts, "test": test}, {"distribution": "moons", "seed": "0"})  # sample reads test
    gmm = d / "cls_K4.safetensors"
    DiagGMM(torch.full((4,), 0.25).double(), torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).double(),
            torch.ones(4, 2).double()).save(gmm)
    spec = make_spec("fm")
    spec["train"]["steps"] = 6
    (d / "spec.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    try:
        for out, extra in ((d / "done", []), (d / "stopped", ["--stop-after", "5"])):
            mp.setattr(sys, "argv", ["train", "--spec", str(d / "spec.json"), "--data", str(data), "--out", str(out),
                                     "--no-progress", *extra])
            try:
                runpy.run_path(str(ROOT / "stages" / "train.py"), run_name="__main__")
            except SystemExit as e:
                assert e.code in (0, None, 75), e
    finally:
        mp.undo()
    assert (d / "done" / "model.safetensors").is_file() and (d / "stopped" / "checkpoints" / "last").is_dir()
    mmfm = make_spec("mmfm", conditioning="mode", source={"components": 4})
    (d / "spec_mmfm.json").write_text(json.dumps(mmfm))
    return {"dir": d, "data": data, "gmm": gmm, "spec": d / "spec.json", "spec_mmfm": d / "spec_mmfm.json"}


def copy(src: Path, dst: Path) -> Path:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


# --- the table ----------------------------------------------------------------------------------------------


def _store(tmp: Path) -> Path:
    s = tmp / "s.zarr"
    w, _ = random_store(s)
    w.mark_complete()
    return s


def case_store(damage: Callable[[Path], Path]) -> Callable:
    def run(tmp: Path, toy, monkeypatch, capsys) -> tuple[int, str, Path, list[Path]]:
        s = _store(tmp)
        named = damage(s)
        out = tmp / "out" / "latent_stats.safetensors"
        code, err = stage(monkeypatch, capsys, "latent_stats", "--store", s, "--out", out)
        return code, err, named, [out]
    return run


def _rm_chunk(s: Path) -> Path:
    first_chunk(s / "spatial", 1).unlink()
    return s


def _trunc_chunk(s: Path) -> Path:
    truncate(first_chunk(s / "spatial"))
    return s / "spatial"


def _trunc_array_meta(s: Path) -> Path:
    truncate(s / "spatial" / "zarr.json")
    return s / "spatial" / "zarr.json"


def _garble_group_meta(s: Path) -> Path:
    overwrite(s / "zarr.json", 0.3)
    return s / "zarr.json"


def case_spatial_gmm(which: str, damage: Callable[[Path], None]) -> Callable:
    """build_spatial_gmm on a complete store with a damaged latent stats or CLS GMM file."""
    def run(tmp: Path, toy, monkeypatch, capsys):
        from sourceflow.io import save_safetensors
        from sourceflow.store.latents import LatentStore
        from sourceflow.store.stats import compute_latent_stats

        s = _store(tmp)
        stats = tmp / "latent_stats.safetensors"
        compute_latent_stats(LatentStore.open(s)).save(stats)
        gmm = copy(toy["gmm"], tmp / "cls_K4.safetensors")
        labels = tmp / "cls_K4_labels.safetensors"
        save_safetensors(labels, {"index": torch.arange(37), "labels": torch.arange(37) % 4})
        named = stats if which == "stats" else gmm
        damage(named)
        out = tmp / "out" / "spatial_K4.safetensors"
        code, err = stage(monkeypatch, capsys, "build_spatial_gmm", "--store", s, "--stats", stats, "--cls-gmm", gmm,
                          "--labels", labels, "--out", out)
        return code, err, named, [out, out.with_suffix(".json")]
    return run


def case_train(what: str, damage: Callable[[Path], None]) -> Callable:
    """The train stage on damaged toy data, a damaged CLS GMM (mmfm) or a damaged checkpoint (resume)."""
    def run(tmp: Path, toy, monkeypatch, capsys):
        data, gmm, spec = toy["data"], toy["gmm"], toy["spec"]
        out = tmp / "run"
        extra: list = []
        if what == "data":
            named = data = copy(data, tmp / "toy.safetensors")
        elif what == "gmm":
            named = gmm = copy(gmm, tmp / "cls_K4.safetensors")
            spec, extra = toy["spec_mmfm"], ["--gmm", gmm]
        else:
            copy(toy["dir"] / "stopped", out)
            named = out / "checkpoints" / "last" / what
        damage(named)
        before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
        code, err = stage(monkeypatch, capsys, "train", "--spec", spec, "--data", data, "--out", out, "--no-progress",
                          *extra)
        after = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
        assert after == before  # the stopped run's files are as they were: nothing rewritten, nothing added
        return code, err, named, [out / "model.safetensors", out / "train_summary.json"]
    return run


def case_sample(tmp: Path, toy, monkeypatch, capsys):
    model = copy(toy["dir"] / "done" / "model.safetensors", tmp / "run" / "model.safetensors")
    truncate(model)
    out = tmp / "samples"
    code, err = stage(monkeypatch, capsys, "sample", "--spec", toy["spec"], "--data", toy["data"], "--model", model,
                      "--out", out, "--no-progress")
    return code, err, model, [out]


def case_reference(damage: Callable[[Path], None]) -> Callable:
    def run(tmp: Path, toy, monkeypatch, capsys):
        adm = tmp / "VIRTUAL_x.npz"
        rng = np.random.default_rng(0)
        np.savez(adm, mu=rng.normal(size=64).astype(np.float32), sigma=np.eye(64, dtype=np.float32))
        damage(adm)
        out = tmp / "ref" / "adm.npz"
        code, err = stage(monkeypatch, capsys, "reference_stats", "--adm-npz", adm, "--device", "cpu", "--out", out)
        return code, err, adm, [out]
    return run


def case_captions(kind: str) -> Callable:
    def run(tmp: Path, toy, monkeypatch, capsys):
        from .test_captions import make_manifest, manifest_rows

        man = make_manifest(tmp, 20)
        rows = manifest_rows(20)
        lines = [json.dumps({"path": p, "recaption_short": f"a digit {i}"}) for i, p in enumerate(rows["path"])]
        if kind == "bad_line":
            lines[2] = '{"path": "c2/img002.jpg", "recaption_short": '  # cut mid-object
        else:
            lines = [json.dumps({"path": f"elsewhere/{i}.png", "recaption_short": "x"}) for i in range(20)]
        jsonl = tmp / "caps.jsonl"
        jsonl.write_text("\n".join(lines) + "\n")
        out = tmp / "captions" / "aligned.parquet"
        code, err = stage(monkeypatch, capsys, "align_captions", "--manifest", man, "--captions", jsonl, "--out", out)
        # a failed alignment keeps its (complete, ok: false) match report on purpose; the table is not written
        return code, err, jsonl, [out] if kind == "no_match" else [out, out.parent / "match_report.json"]
    return run


def through_cli(read: Callable[[], object], capsys) -> tuple[int, str]:
    """A reader run as a stage runs it (``cli.run``): (exit code, stderr)."""
    code = 0
    try:
        cli.run(read)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def case_caption_store(damage: Callable[[Path], Path]) -> Callable:
    """The caption store as train reads it (``load_latent_data`` → ``_caption_rows``), through ``cli.run``."""
    def run(tmp: Path, toy, monkeypatch, capsys):
        import zarr

        from sourceflow.data.latent_data import _caption_rows

        p = tmp / "minilm.zarr"
        g = zarr.open_group(str(p), mode="w", zarr_format=3)
        n = 12
        g.create_array("tokens", data=np.ones((n, 4, 3), np.float32), chunks=(4, 4, 3))
        g.create_array("mask", data=np.ones((n, 4), np.uint8), chunks=(4, 4))
        g.create_array("pooled", data=np.ones((n, 3), np.float32), chunks=(4, 3))
        g.create_array("index", data=np.arange(n), chunks=(4,))
        g.attrs.update({"complete": True, "manifest_hash": "h"})
        named = damage(p)
        return *through_cli(lambda: _caption_rows(p, np.arange(n), "h", 100.0), capsys), named, []
    return run


def _rm_caption_chunk(p: Path) -> Path:
    first_chunk(p / "index", 1).unlink()
    return p


def _trunc_caption_meta(p: Path) -> Path:
    truncate(p / "mask" / "zarr.json")
    return p / "mask" / "zarr.json"


def case_sample_store(damage: Callable[[Path], Path]) -> Callable:
    """The image sample store as evaluate reads it (``sourceflow.sampling.open_sample_store``), through ``cli.run``."""
    def run(tmp: Path, toy, monkeypatch, capsys):
        from sourceflow.sampling import open_sample_store
        from sourceflow.store.sharded import ShardedWriter

        p = tmp / "euler-2" / "samples.zarr"
        create_sharded_group(p, {"images": ((12, 4, 4, 3), "uint8"), "energy": ((12,), "float32")}, 4, {})
        w = ShardedWriter(p, ["images", "energy"])
        for sh in range(w.num_shards):
            w.write_shard(sh, {"images": np.full((4, 4, 4, 3), sh, np.uint8), "energy": np.ones(4, np.float32)})
        w.mark_complete()
        named = damage(p)
        return *through_cli(lambda: np.asarray(open_sample_store(p)["images"][:]), capsys), named, []
    return run


def _rm_sample_shard(p: Path) -> Path:
    first_chunk(p / "images", 1).unlink()
    return p


def _trunc_sample_shard(p: Path) -> Path:
    f = first_chunk(p / "images", 0)
    truncate(f)
    return p / "images"


CASES: dict[str, tuple[str, Callable]] = {
    "sample-store-shard-missing": ("evaluate's sample reader", case_sample_store(_rm_sample_shard)),
    "sample-store-shard-truncated": ("evaluate's sample reader", case_sample_store(_trunc_sample_shard)),
    "sample-store-zarr.json-truncated": ("evaluate's sample reader",
                                         case_sample_store(lambda p: truncate(p / "zarr.json") or p / "zarr.json")),
    "store-chunk-missing": ("latent_stats", case_store(_rm_chunk)),
    "store-chunk-truncated": ("latent_stats", case_store(_trunc_chunk)),
    "store-array-zarr.json-truncated": ("latent_stats", case_store(_trunc_array_meta)),
    "store-group-zarr.json-overwritten": ("latent_stats", case_store(_garble_group_meta)),
    "latent-stats-truncated": ("build_spatial_gmm", case_spatial_gmm("stats", truncate)),
    "cls-gmm-truncated": ("build_spatial_gmm", case_spatial_gmm("gmm", truncate)),
    "cls-gmm-header-overwritten": ("train", case_train("gmm", lambda p: overwrite(p, 0.0, 24))),
    "toy-data-truncated": ("train", case_train("data", truncate)),
    "checkpoint-model-truncated": ("train (resume)", case_train("model.safetensors", truncate)),
    "checkpoint-optimizer-truncated": ("train (resume)", case_train("optimizer.safetensors", truncate)),
    "checkpoint-trainer.json-overwritten": ("train (resume)", case_train("trainer.json", overwrite)),
    "model.safetensors-truncated": ("sample", case_sample),
    "reference-npz-truncated": ("reference_stats", case_reference(truncate)),
    "reference-npz-overwritten": ("reference_stats", case_reference(lambda p: overwrite(p, 0.6, 64))),
    "caption-jsonl-bad-line": ("align_captions", case_captions("bad_line")),
    "caption-jsonl-paths-match-nothing": ("align_captions", case_captions("no_match")),
    "caption-store-chunk-missing": ("train's caption reader", case_caption_store(_rm_caption_chunk)),
    "caption-store-zarr.json-truncated": ("train's caption reader", case_caption_store(_trunc_caption_meta)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_input_is_one_line(case, tmp_path, toy, monkeypatch, capsys):
    _, run = CASES[case]
    code, err, named, outputs = run(tmp_path, toy, monkeypatch, capsys)
    line = assert_one_line(code, err, named)
    print(f"{case} [{CASES[case][0]}]: {line}")
    for o in outputs:
        assert not o.exists(), f"{o} was written"
    assert leftovers(tmp_path) == []


def test_failed_store_creation_waits_for_zarr_writes_before_removing_its_folder(tmp_path, monkeypatch):
    """Zarr writes an array's metadata and its parent's concurrently and raises on the first failure while the
    other write runs on (and its ``mkdir(parents=True)`` recreates the folder): the atomic creation must wait for
    it before removing the temporary folder, or a full disk leaves a stray ``.name.*.tmp`` behind (seen in CI)."""
    import asyncio
    import errno
    import time

    from zarr.storage import LocalStore

    set_, set_new = LocalStore.set, LocalStore.set_if_not_exists

    async def failing_set(self, key, value):  # the array's zarr.json fails at once, as on a full disk
        if key.startswith("images/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await set_(self, key, value)

    async def slow_set_if_not_exists(self, key, value):  # the parent group's write, still running then
        await asyncio.sleep(0.4)
        return await set_new(self, key, value)

    # the stores' public write methods, so the test keeps reproducing the race across Zarr 3 releases
    monkeypatch.setattr(LocalStore, "set", failing_set)
    monkeypatch.setattr(LocalStore, "set_if_not_exists", slow_set_if_not_exists)
    with pytest.raises(OSError) as e:
        create_sharded_group(tmp_path / "s.zarr", {"images": ((8, 2), "uint8")}, 4, {})
    assert e.value.errno == errno.ENOSPC
    time.sleep(0.6)  # past the slow write: nothing may reappear
    assert list(tmp_path.iterdir()) == []
