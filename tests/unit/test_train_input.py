"""The training input path (sourceflow.train.batches): rows streamed from a Zarr store and read ahead by
DataLoader worker processes train bitwise the weights of rows held in memory and read in line, with
gradient accumulation, a stop and a resume; no worker outlives the loop; ``workers: auto`` reads with
workers only when the latents are streamed."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from sourceflow.build import build_method, build_model, training_dataset
from sourceflow.data.latent_data import load_latent_data
from sourceflow.flow.rng import normal_on
from sourceflow.train.batches import resolve_workers, streamed
from sourceflow.train.loop import TrainSettings, train

from .test_image_methods import image_config
from .test_latent_data import files  # noqa: F401  (the fixture: a real store over 12 images with flips)


def run(files, out, *, in_memory: bool, workers, accum: int = 1, **kw):  # noqa: F811
    store, stats, manifest, _ = files
    data = load_latent_data(store, stats, manifest, max_memory_mb=1000.0 if in_memory else 1e-6)
    assert streamed(training_dataset(image_config("fm"), data)) is not in_memory
    spec = image_config("fm", conditioning="label")
    spec["train"].update(batch_size=8, steps=9, checkpoint_every=3, grad_accum=accum,
                         loader={"workers": workers, "prefetch": 2})
    torch.manual_seed(0)
    model = build_model(spec, data)
    method = build_method(spec, data, 0, None, None)
    return train(model, method, training_dataset(spec, data), TrainSettings.from_spec(spec["train"]), 0, out, "h",
                 progress=False, **kw)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_rows_read_by_workers_train_the_in_memory_weights(files, tmp_path):  # noqa: F811
    run(files, tmp_path / "mem", in_memory=True, workers="auto")
    run(files, tmp_path / "w2", in_memory=False, workers=2)
    run(files, tmp_path / "w0", in_memory=False, workers=0)
    ref = weights(tmp_path / "mem")
    assert same(ref, weights(tmp_path / "w2")) and same(ref, weights(tmp_path / "w0"))
    # accumulation, a stop after 4 steps and a resume (from the step-3 checkpoint), all with workers
    run(files, tmp_path / "acc-ref", in_memory=True, workers=0, accum=2)
    assert run(files, tmp_path / "acc", in_memory=False, workers=2, accum=2, stop_after=4) == {"stopped_at": 4}
    assert not mp.active_children()  # the stop shut the reading workers down
    assert run(files, tmp_path / "acc", in_memory=False, workers=2, accum=2)["resumed_from"] == 3
    assert not mp.active_children()
    assert same(weights(tmp_path / "acc-ref"), weights(tmp_path / "acc"))


def test_auto_workers_only_for_streamed_data(files, monkeypatch):  # noqa: F811
    store, stats, manifest, _ = files
    spec = image_config("fm", conditioning="label")
    mem = training_dataset(spec, load_latent_data(store, stats, manifest))
    lazy = training_dataset(spec, load_latent_data(store, stats, manifest, max_memory_mb=1e-6))
    assert resolve_workers("auto", mem) == 0 and resolve_workers(3, mem) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", lazy, local_world=1) == 8 and resolve_workers("auto", lazy, local_world=8) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert resolve_workers("auto", lazy, local_world=1) == 1


def test_normal_on_cpu_is_the_generators_own_stream():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(normal_on((4, 5), g1, "cpu"), torch.randn(4, 5, generator=g2))
    assert torch.equal(torch.rand(2, generator=g1), torch.rand(2, generator=g2))  # nothing else consumed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normal_on_gpu_is_drawn_there_and_a_function_of_the_cpu_generator():
    a = normal_on((64, 768, 4, 4), torch.Generator().manual_seed(5), "cuda")
    b = normal_on((64, 768, 4, 4), torch.Generator().manual_seed(5), "cuda")
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01


def test_gmm_means_on_host_draw_what_device_means_draw():
    """source.means_on: host keeps the K x D means out of the module's buffers (``.to(device)`` leaves them,
    the plan's fake step does not count them on the device) and draws the same x0 as means on the device."""
    from sourceflow.flow.sources import GMMSource

    g = torch.Generator().manual_seed(0)
    w, mu, var = torch.rand(5, generator=g) + 0.1, torch.randn(5, 3, 4, 4, generator=g), torch.rand(5) + 0.5
    dev, host = GMMSource(w, mu, var, "spherical"), GMMSource(w, mu, var, "spherical", means_on="host")
    assert "means" in dict(dev.named_buffers()) and "means" not in dict(host.named_buffers())
    a = dev.sample(64, torch.Generator().manual_seed(3))
    b = host.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.mode, b.mode)
    mode = torch.tensor([4, 0, 0, 2])
    z = torch.randn(4, 3, 4, 4, generator=g)
    assert torch.equal(dev.transform(z, None, mode=mode).x0, host.transform(z, None, mode=mode).x0)
    with pytest.raises(ValueError, match="means_on must be"):
        GMMSource(w, mu, var, means_on="gpu")


def test_plan_counts_host_means_off_the_device():
    import copy

    from sourceflow.plan import ShapeData, measure_train_step

    from .test_image_methods import K

    spec = image_config("mmfm", source={"kind": "gmm", "components": K}, conditioning="mode")
    data = ShapeData((3, 32, 32), 10, None, 1000)
    got = {}
    for on in ("device", "host"):
        s = copy.deepcopy(spec)
        s["source"]["means_on"] = on
        got[on] = measure_train_step(s, data, 8, use_cache=False)
    assert got["device"].buffer_bytes - got["host"].buffer_bytes == K * 3 * 32 * 32 * 4 + K * 4  # means, spherical stds
