"""MM-FM's top-k CLS posteriors (sourceflow.gmm.posteriors, stages/cls_posteriors.py): the table holds each
row's most probable modes and their exact probabilities (brute force), draws from it with the step's
uniforms are the exact sampler's draws, and training from the table gives the exact posterior's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sourceflow.build import build_method, build_model, training_dataset
from sourceflow.data.latent_data import load_latent_data
from sourceflow.flow.couplings import ModeCoupling
from sourceflow.gmm.diag import DiagGMM
from sourceflow.gmm.posteriors import PosteriorTable, top_k_posteriors
from sourceflow.io import unpack_metadata
from sourceflow.train.loop import TrainSettings, train

from .test_image_methods import image_config
from .test_latent_data import D, files  # noqa: F401  (fixture: a real store over 12 images with flips)
from .test_store import run_stage


def random_gmm(k: int, d: int, seed: int = 0, spread: float = 1.0) -> DiagGMM:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return DiagGMM(w / w.sum(), spread * torch.randn(k, d, generator=g, dtype=torch.float64),
                   0.5 + torch.rand(k, d, generator=g, dtype=torch.float64))


def test_table_is_the_brute_force_top_k_and_draws_like_the_exact_sampler():
    gmm = random_gmm(7, 5)
    x = torch.randn(3000, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # brute force: log w_k + sum_d log N(x_d | mu_kd, v_kd), normalised
    logp = (torch.log(gmm.weights) - 0.5 * (((x[:, None] - gmm.means) ** 2) / gmm.variances
                                            + torch.log(2 * torch.pi * gmm.variances)).sum(-1))
    post = torch.softmax(logp, 1)
    table, residual = top_k_posteriors(gmm, [x[:1000].numpy(), x[1000:].numpy()], 3000, 3)
    top = post.topk(3, 1)
    assert torch.equal(table.modes.long().sort(1).values, top.indices.sort(1).values)
    assert bool((table.modes[:, 1:] > table.modes[:, :-1]).all())  # ascending mode index
    np.testing.assert_allclose(table.probs.double().sum(1), top.values.sum(1), rtol=1e-6)
    np.testing.assert_allclose(residual, 1 - top.values.sum(1), atol=1e-7)
    # k = K: the draws are the exact sampler's, uniform for uniform (float32 probabilities aside)
    full, res = top_k_posteriors(gmm, [x.numpy()], 3000, 7)
    assert float(res.max()) < 1e-6
    exact, tabled = ModeCoupling(gmm), ModeCoupling(gmm, table=full)
    a = exact.modes(x, torch.Generator().manual_seed(5))
    b = tabled.modes(None, torch.Generator().manual_seed(5), torch.arange(3000))
    assert float((a == b).double().mean()) > 0.999
    # k < K on separated modes (nearly one-hot posteriors, as MM-FM's in 768-D): the exact draws
    sep = random_gmm(7, 20, spread=1.5)
    g = torch.Generator().manual_seed(2)
    comp = torch.randint(0, 7, (3000,), generator=g)
    xs = sep.means[comp] + sep.variances[comp].sqrt() * torch.randn(3000, 20, generator=g, dtype=torch.float64)
    two, left = top_k_posteriors(sep, [xs.numpy()], 3000, 2)
    assert float(left.mean()) < 1e-3
    a2 = ModeCoupling(sep).modes(xs, torch.Generator().manual_seed(5))
    c = ModeCoupling(sep, table=two).modes(None, torch.Generator().manual_seed(5), torch.arange(3000))
    assert float((a2 == c).double().mean()) > 0.998
    assert torch.equal(ModeCoupling(gmm, "hard", table=table).modes(None, None, torch.arange(3000)), post.argmax(1))
    with pytest.raises(ValueError, match="top-k must be in"):
        top_k_posteriors(gmm, [x.numpy()], 3000, 8)


def test_stage_and_training_from_the_table(files, tmp_path, capsys):  # noqa: F811
    store, stats, manifest, arrays = files
    k = 4
    gmm = DiagGMM(torch.full((k,), 1 / k).double(), torch.from_numpy(arrays["cls"][:k]).double(),
                  torch.ones(k, D).double())
    gmm.save(tmp_path / "cls.safetensors")
    out = tmp_path / "post.safetensors"
    run_stage("cls_posteriors", "--store", store, "--gmm", tmp_path / "cls.safetensors", "--top-k", k,
              "--batch-rows", 5, "--out", out)
    assert "probability left out: max" in capsys.readouterr().out
    table = PosteriorTable.load(out, 24)
    want = torch.softmax(gmm.log_prob_components(torch.from_numpy(arrays["cls"]).double()), 1)
    np.testing.assert_allclose(table.probs, want.gather(1, table.modes.long()), rtol=1e-5)
    with safe_open(str(out), "pt") as f:
        meta = unpack_metadata(f.metadata())
    assert meta["k"] == "4" and meta["rows"] == "24" and float(meta["max_residual"]) < 1e-6
    with pytest.raises(ValueError, match="posteriors of 24 rows, the training data has 30"):
        PosteriorTable.load(out, 30)

    def run(name, topk, posteriors=None):
        data = load_latent_data(store, stats, manifest)
        spec = image_config("mmfm", source={"kind": "gmm", "components": k}, conditioning="mode",
                            coupling={"kind": "mode", "posterior_topk": topk})
        spec["train"].update(batch_size=8, steps=6, checkpoint_every=3)
        torch.manual_seed(0)
        model = build_model(spec, data)
        spatial = tmp_path / "spatial.safetensors"
        if not spatial.exists():
            from safetensors.torch import save_file
            save_file({"weights": torch.full((k,), 1 / k).double(), "means": torch.randn(k, 3, 8, 8),
                       "variances": torch.full((k,), 0.5)}, str(spatial))
        method = build_method(spec, data, 0, tmp_path / "cls.safetensors", spatial, posteriors)
        ds = training_dataset(spec, data)
        assert (ds.cls is None) == bool(topk)  # the table replaces the CLS reads
        train(model, method, ds, TrainSettings.from_spec(spec["train"]), 0, tmp_path / name, "h", progress=False)
        return load_file(str(tmp_path / name / "model.safetensors"))

    exact, tabled = run("exact", 0), run("table", k, out)
    assert exact.keys() == tabled.keys() and all(torch.equal(exact[n], tabled[n]) for n in exact)
    with pytest.raises(ValueError, match="posterior_topk 4: the mode coupling needs --posteriors"):
        run("missing", k)
