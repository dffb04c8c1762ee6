"""train_feature_net: train the small CNN classifier whose penultimate activations are the feature
space of the image metrics (Fréchet distance, precision/recall, class coverage) on small datasets.

Trains on the manifest's train split (labels required), reports accuracy on the held-out test split.
Images are read like every other stage (ADM centre crop to --resolution, model range [-1, 1]).
Light augmentation: a random shift of up to --shift pixels (edge-padded, random crop). Adam with a
cosine learning-rate decay; seeded and deterministic on CPU for a fixed --threads.

Writes OUT (safetensors weights; the architecture config is JSON in its metadata) and a report JSON
(unless --report is given: report.json beside OUT) with held-out accuracy (overall and per class), train accuracy, loss
per epoch, sizes and the config (the timings go to the log as a `timings` line).

Example:
  python stages/train_feature_net.py --manifest results/digits/manifest.parquet --resolution 8 \\
      --epochs 30 --batch-size 128 --lr 0.002 --out results/digits/feature_net/model.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--manifest", required=True, help="manifest.parquet (train split to fit, test split to report)")
    p.add_argument("--resolution", type=int, default=None, help="image side R (unset: the manifest's resolution)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the train split")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimisation step")
    p.add_argument("--lr", type=float, default=0.002, help="peak Adam learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--shift", type=int, default=1, help="augmentation: random shift of up to this many pixels (0: off)")
    p.add_argument("--feature-dim", type=int, default=128, help="width of the penultimate (feature) layer")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--report", default=None, help="report JSON (unset: report.json beside --out)")
    p.add_argument("--out", required=True, help="output .safetensors")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    from sourceflow.data.images import load_images, to_model_range
    from sourceflow.data.manifest import manifest_hash, read_manifest
    from sourceflow.io import log_timings, write_json
    from sourceflow.models.feature_net import FeatureNet, FeatureNetConfig

    t_start = time.perf_counter()
    for name, v in (("--epochs", a.epochs), ("--batch-size", a.batch_size), ("--feature-dim", a.feature_dim)):
        if v < 1:
            raise ValueError(f"{name} must be positive, got {v}")
    if a.shift < 0:
        raise ValueError(f"--shift must be ≥ 0, got {a.shift}")
    m = read_manifest(a.manifest)
    res = a.resolution or int(m.meta.get("resolution", 0))
    if res < 4:
        raise ValueError(f"--resolution must be at least 4 (got {res}; set --resolution or the manifest's resolution)")
    train, test = m.split("train"), m.split("test")
    y_train = train.frame["label"].to_numpy()
    y_test = test.frame["label"].to_numpy()
    if (y_train < 0).any() or (y_test < 0).any():
        raise ValueError(f"{a.manifest}: the feature network needs a label on every image (found label -1)")
    num_classes = m.num_classes or int(max(y_train.max(), y_test.max()) + 1)
    if max(y_train.max(), y_test.max()) >= num_classes:
        raise ValueError(f"{a.manifest}: labels exceed num_classes {num_classes} of manifest.json")

    x_train = to_model_range(load_images(train, res, a.workers, desc="train images"))
    x_test = to_model_range(load_images(test, res, a.workers, desc="test images"))
    yt = torch.from_numpy(y_train.copy())
    t_loaded = time.perf_counter()

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    cfg = FeatureNetConfig(num_classes=num_classes, feature_dim=a.feature_dim, resolution=res,
                           class_names=[str(c) for c in m.meta.get("class_names", range(num_classes))])
    net = FeatureNet(cfg)
    steps_per_epoch = (len(x_train) + a.batch_size - 1) // a.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs * steps_per_epoch)

    def augment(x: torch.Tensor) -> torch.Tensor:
        """Random integer shift per image: replicate-pad by s, crop a random R×R window."""
        if a.shift == 0:
            return x
        s = a.shift
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        off = torch.randint(0, 2 * s + 1, (len(x), 2), generator=gen)
        rows = off[:, :1] + torch.arange(res)  # [B, R]
        cols = off[:, 1:] + torch.arange(res)
        b = torch.arange(len(x))[:, None, None]
        return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def predict(x: torch.Tensor) -> np.ndarray:
        net.eval()
        out = torch.cat([net(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)]).numpy()
        net.train()
        return out

    losses = []
    net.train()
    for epoch in range(a.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch_size:(i + 1) * a.batch_size]
            loss = F.cross_entropy(net(augment(x_train[idx])), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x_train))
        print(f"epoch {epoch + 1}/{a.epochs}: train loss {losses[-1]:.4f}", file=sys.stderr)
    t_trained = time.perf_counter()

    pred_test, pred_train = predict(x_test), predict(x_train)
    acc = float(np.mean(pred_test == y_test))
    per_class = {cfg.class_names[c]: float(np.mean(pred_test[y_test == c] == c))
                 for c in range(num_classes) if (y_test == c).any()}
    net.save(a.out, info={"test_accuracy": acc, "manifest_hash": manifest_hash(a.manifest)})
    report = {
        "test_accuracy": acc, "train_accuracy": float(np.mean(pred_train == y_train)),
        "test_accuracy_per_class": per_class, "num_train": len(y_train), "num_test": len(y_test),
        "num_classes": num_classes, "resolution": res, "epochs": a.epochs, "batch_size": a.batch_size,
        "lr": a.lr, "weight_decay": a.weight_decay, "shift": a.shift, "seed": a.seed, "threads": a.threads,
        "train_loss_per_epoch": losses,
        "manifest": str(a.manifest), "manifest_hash": manifest_hash(a.manifest), "weights": str(a.out),
        "config": {"widths": list(cfg.widths), "feature_dim": cfg.feature_dim, "grid": cfg.grid},
    }
    write_json(a.report or Path(a.out).parent / "report.json", report)
    log_timings("train_feature_net", seconds_loading=t_loaded - t_start, seconds_training=t_trained - t_loaded,
                seconds_total=time.perf_counter() - t_start)
    print(f"wrote {a.out}: held-out accuracy {acc:.4f} on {len(y_test)} test images "
          f"(train {report['train_accuracy']:.4f}), {t_trained - t_loaded:.1f} s training")


if __name__ == "__main__":
    cli.run(main)
