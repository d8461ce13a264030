"""Method `weak`: targets from the label table, loss values and gradients against float64
references written from Mahajan et al. 2018's formulas, sampler wiring, engine run."""

import json
import math

import pytest
import torch
from torch import nn

from fastssl.data.labels import LabelTable, expand_hierarchy, inject_label_noise
from fastssl.engine import Trainer, resolve_config
from fastssl.method import StepContext
from fastssl.methods import METHODS
from fastssl.methods.weak import WeakConfig, WeakSupervised

CTX = StepContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, lr=0.1, weight_decay=0.0)


def tiny_backbone(width=8):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    return net, width


def cfg(**kw):
    base = dict(backbone="resnet18", image_size=16, batch_size=8, epochs=1, fused=False)
    return resolve_config(WeakConfig, overrides=base | kw)


TABLE = LabelTable([[0], [1, 2], [3], [0, 3, 4], [2], [1], [4, 0], [2, 3, 1, 0]], 5)


def softmax_ref(logits, rows):
    """-1/N sum_n sum_{c in L_n} (1/k_n) log softmax(z_n)_c, float64."""
    logp = logits.double().log_softmax(dim=1)
    return -sum(logp[n, row].sum() / len(row) for n, row in enumerate(rows)) / len(rows)


def sigmoid_ref(logits, rows):
    """1/N sum_n sum_c [log(1 + e^z) - y z]: per-label binary logistic loss, summed over labels."""
    z = logits.double()
    y = torch.zeros_like(z)
    for n, row in enumerate(rows):
        y[n, row] = 1
    return (nn.functional.softplus(z) - y * z).sum() / z.shape[0]


def test_registered_and_configurable():
    assert METHODS["weak"] is WeakSupervised and WeakSupervised.config_class is WeakConfig
    c = resolve_config(WeakConfig, overrides={"loss": "sigmoid", "sampling": "natural", "rare_factor": "10"})
    assert (c.method.loss, c.method.sampling, c.method.rare_factor, c.method.name) == (
        "sigmoid", "natural", 10.0, "weak")
    assert WeakConfig().loss == "softmax" and WeakConfig().sampling == "sqrt"
    preset = resolve_config(WeakConfig, preset=WeakSupervised.presets["fashion-mnist"])
    got = (preset.data.image_size, preset.method.num_classes, preset.method.crop_scale)
    assert got == (28, 10, (0.25, 1.0))


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_loss_and_gradient_match_float64_reference(loss):
    method = WeakSupervised(cfg(loss=loss, num_classes=5), labels=TABLE, backbone=tiny_backbone()).double()
    index = torch.tensor([7, 3, 0, 1, 6, 2])  # k = 4, 3, 1, 2, 2, 1
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = method({"views": [x], "index": index, "label": torch.zeros(6, dtype=torch.long)}, CTX)
    out["loss"].backward()
    got = [p.grad.clone() for p in method.classifier.parameters()]
    method.zero_grad()
    logits = method.classifier(method.backbone(x))
    rows = [TABLE.labels[i] for i in index.tolist()]
    want = (softmax_ref if loss == "softmax" else sigmoid_ref)(logits, rows)
    want.backward()
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-6, atol=1e-9)
    for g, p in zip(got, method.classifier.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
    # precision@1: is the argmax one of the row's labels
    top = logits.argmax(1).tolist()
    assert out["precision_at_1"].item() == pytest.approx(sum(t in r for t, r in zip(top, rows)) / 6)


def test_targets_from_table_and_from_source_labels():
    method = WeakSupervised(cfg(num_classes=5), labels=TABLE, backbone=tiny_backbone())
    t = method.targets({"index": torch.tensor([3, 1])})
    assert t.tolist() == [[1, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    plain = WeakSupervised(cfg(num_classes=4), backbone=tiny_backbone())
    assert plain.targets({"label": torch.tensor([2, 0])}).tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"batch\['label'\] must lie in \[0, num_classes=4\), got 0..4"):
        plain.targets({"label": torch.tensor([0, 4])})
    with pytest.raises(ValueError, match=r"batch\['index'\] must lie in \[0, 8\)"):
        method.targets({"index": torch.tensor([8])})
    with pytest.raises(ValueError, match=r"batch\['index'\] \(dataset indices\) is needed"):
        method.targets({"label": torch.tensor([0])})


def test_label_files_hierarchy_and_noise_from_config(tmp_path):
    (tmp_path / "vocab.txt").write_text("dog\ncat\nanimal\napple\nfruit\n")
    (tmp_path / "labels.csv").write_text("".join(f"{i},{'dog' if i % 2 else 'apple'}\n" for i in range(40)))
    (tmp_path / "parents.csv").write_text("dog,animal\ncat,animal\napple,fruit\n")
    c = cfg(labels_file=str(tmp_path / "labels.csv"), vocabulary=str(tmp_path / "vocab.txt"),
            hierarchy=str(tmp_path / "parents.csv"), num_classes=99)
    method = WeakSupervised(c, backbone=tiny_backbone())
    assert c.method.num_classes == 5 and method.classifier.out_features == 5
    assert method.labels.labels[:2] == [[3, 4], [0, 2]]
    m = c.method
    noisy = WeakSupervised(cfg(labels_file=m.labels_file, vocabulary=m.vocabulary, hierarchy=m.hierarchy,
                               label_noise=0.25, seed=3), backbone=tiny_backbone())
    # Noise hits the labels as annotated (40 single labels), then the hierarchy expands them.
    raw = [[0] if i % 2 else [3] for i in range(40)]
    noisy_raw = inject_label_noise(raw, 0.25, 5, seed=3)
    assert sum(a != b for a, b in zip(raw, noisy_raw)) == 10
    assert noisy.labels.labels == expand_hierarchy(noisy_raw, {0: [2], 1: [2], 3: [4]})


def test_noise_on_source_labels_comes_with_bind_data():
    method = WeakSupervised(cfg(num_classes=3, label_noise=0.5, seed=1), backbone=tiny_backbone())
    with pytest.raises(ValueError, match=r"call bind_data\(source\) before training"):
        method.targets({"index": torch.tensor([0]), "label": torch.tensor([0])})
    source_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method.bind_data(source_labels)
    want = inject_label_noise([[c] for c in source_labels.tolist()], 0.5, 3, seed=1)
    assert method.labels.labels == want
    assert method.targets({"index": torch.arange(8)}).argmax(1).tolist() == [r[0] for r in want]


def test_build_sampler():
    c = cfg(num_classes=5, sampling="sqrt", seed=4)
    method = WeakSupervised(c, labels=TABLE, backbone=tiny_backbone())
    s = method.build_sampler(rank=1, world_size=2, num_samples=10)
    assert (s.mode, s.rank, s.world_size, s.seed, len(s)) == ("sqrt", 1, 2, 4, 5)
    counts = [sum(c in row for row in TABLE.labels) for c in range(5)]
    w = torch.tensor([sum(counts[c] ** -0.5 for c in row) / len(row) for row in TABLE.labels],
                     dtype=torch.float64)
    torch.testing.assert_close(s.probabilities, w / w.sum())
    swag = WeakSupervised(cfg(num_classes=5, sampling="inverse_sqrt", rare_threshold=3.0, rare_factor=7.0),
                          labels=TABLE, backbone=tiny_backbone()).build_sampler()
    assert (swag.rare_threshold, swag.rare_factor) == (3.0, 7.0)
    plain = WeakSupervised(cfg(num_classes=3, sampling="uniform"), backbone=tiny_backbone())
    s = plain.build_sampler(torch.tensor([0, 0, 0, 1, 2, 2]))
    torch.testing.assert_close(s.probabilities, torch.tensor([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2,
                                                             dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no label table; pass the source \(or its labels\)"):
        plain.build_sampler()
    with pytest.raises(ValueError, match="the label table has 8 items but the source has 3"):
        method.build_sampler([0, 1, 2])


class FolderSource:
    """The two attributes bind_data reads from an image-folder source."""

    def __init__(self, paths):
        self.paths, self.labels = paths, [0] * len(paths)


def test_path_keyed_labels_follow_the_source_order(tmp_path):
    (tmp_path / "labels.csv").write_text("path,labels\ncat/2.jpg,1\ndog/1.jpg,0,2\ncat/1.jpg,1,3\n")
    c = cfg(labels_file=str(tmp_path / "labels.csv"), num_classes=4)
    method = WeakSupervised(c, backbone=tiny_backbone())
    assert method.labels.labels == [[1], [0, 2], [1, 3]]  # file order until the source is known
    source = FolderSource(["/d/cat/1.jpg", "/d/cat/2.jpg", "/d/dog/1.jpg"])
    method.bind_data(source)
    sampler = method.build_sampler(source, rank=0, world_size=1)
    assert method.labels.labels == [[1, 3], [1], [0, 2]] and len(sampler.probabilities) == 3
    assert method.targets({"index": torch.tensor([0, 2])}).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    # the reordered table is keyed by the source's paths
    with pytest.raises(ValueError, match=r"labels row 1: path '/d/cat/1.jpg' is not in the source's 2 files"):
        method.labels.reorder(["/d/cat/2.jpg", "/d/dog/1.jpg"])


def test_config_errors():
    with pytest.raises(ValueError, match=r"loss must be one of softmax, sigmoid; got 'hinge'"):
        cfg(loss="hinge")
    with pytest.raises(ValueError, match="sampling must be one of"):
        cfg(sampling="balanced")
    with pytest.raises(ValueError, match="label_noise must be a number >= 0 and <= 1, got 1.5"):
        cfg(label_noise=1.5)
    with pytest.raises(ValueError, match=r"crop_scale must be \(min, max\) with min <= max"):
        cfg(crop_scale=(0.9, 0.5))


def test_steps_decrease_the_loss():
    method = WeakSupervised(cfg(num_classes=5), labels=TABLE, backbone=tiny_backbone())
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = {"views": [x], "index": torch.arange(8), "label": torch.zeros(8)}
    losses = []
    for _ in range(8):
        loss = method(batch, CTX)["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in method.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)


def test_registry_builds_the_configured_backbone():
    torch.manual_seed(0)
    method = METHODS["weak"](cfg(num_classes=5, image_size=8), labels=TABLE)
    assert method.classifier.in_features == 512 and method.encoder() is method.backbone
    assert method.recipe().views[0].size == 8 and method.recipe().views[0].scale == (0.08, 1.0)
    with torch.no_grad():
        out = method({"views": [torch.randn(2, 3, 8, 8)], "index": torch.tensor([0, 3])}, CTX)
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())


class TensorLoader:
    """Batches of fixed images in the order the method's sampler gives (set_epoch, len)."""

    def __init__(self, images, sampler, batch_size):
        self.images, self.sampler, self.batch_size = images, sampler, batch_size

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        idx = torch.tensor(list(self.sampler))
        for b in range(len(self)):
            i = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield {"views": [self.images[i]], "label": torch.zeros_like(i), "index": i}


def test_trainer_runs_weak_with_the_sampler(tmp_path):
    c = cfg(num_classes=5, out=str(tmp_path / "run"), batch_size=4, max_steps=3, eval_knn=False)
    method = WeakSupervised(c, labels=TABLE, backbone=tiny_backbone())
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = TensorLoader(images, method.build_sampler(num_samples=16), 4)
    summary = Trainer(method, loader, progress=False, log=lambda msg: None).fit()
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0.0 <= r["precision_at_1"] <= 1.0 for r in records)


def _stream_class_shares(mode, counts, epochs=300, **kw):
    """Class frequencies over many epochs of a StreamResampler on single-label data with
    `counts` images per class, spread over 4 shards."""
    import numpy as np

    from fastssl.data.sampler import StreamResampler

    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    rows = [[c] for c in labels]
    shard_of = np.arange(len(labels)) * 4 // len(labels)
    s = StreamResampler(rows, range(len(labels)), shard_of, mode, seed=2, buffer_size=16, **kw)
    drawn = np.zeros(len(counts))
    for e in range(epochs):
        s.set_epoch(e)
        idx = list(s)
        assert len(idx) == len(labels) == len(s)  # every epoch the same length
        drawn += np.bincount([labels[i] for i in idx], minlength=len(counts))
    return drawn / drawn.sum()


def test_stream_repeat_factors_give_square_root_class_frequencies():
    """Mahajan et al. 2018: square-root sampling gives class c a share sqrt(n_c) / sum sqrt(n_c')."""
    import numpy as np

    counts = [200, 50, 8, 2]
    got = _stream_class_shares("sqrt", counts)
    want = np.sqrt(counts) / np.sqrt(counts).sum()
    np.testing.assert_allclose(got, want, atol=0.01)
    # SWAG's inverse_sqrt with rare labels upsampled: share n_c * n_c^-1/2 * (factor if n_c < threshold).
    got = _stream_class_shares("inverse_sqrt", counts, rare_threshold=10, rare_factor=3.0)
    w = np.sqrt(counts) * np.where(np.asarray(counts) < 10, 3.0, 1.0)
    np.testing.assert_allclose(got, w / w.sum(), atol=0.01)
    natural = _stream_class_shares("natural", counts, epochs=2)
    np.testing.assert_allclose(natural, np.asarray(counts) / sum(counts))


def test_weak_on_img2dataset_shards_takes_targets_from_hashtags(tmp_path):
    """Captions' hashtags through a `fastssl vocab` vocabulary: 1/k targets; untagged samples
    are never drawn and are counted as skipped."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from fastssl.cli import main
    from fastssl.data import ShardSource, build_loader

    captions = ["#dog in the park #Cat", "just a photo", "#dog", "#cat #bird", "#dog again", "#fish"]
    folder = tmp_path / "laion"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{k:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert main(["vocab", str(folder), "--top", "3", "--out", str(tmp_path / "vocab.json")]) == 0
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab == {"tags": ["dog", "cat", "bird"], "counts": [3, 2, 1]}
    method = WeakSupervised(cfg(vocabulary=str(tmp_path / "vocab.json"), sampling="natural"),
                            backbone=tiny_backbone())
    source = ShardSource(folder)
    method.bind_data(source)   # the tag vocabulary sizes the classifier; the sampler only samples
    assert method.classifier.out_features == 3
    sampler = method.build_sampler(source)
    assert method.classifier.out_features == 3 and method.cfg.method.num_classes == 3
    assert [name.rsplit(":", 1)[-1] for name, _ in sampler.excluded] == ["00001", "00005"]
    loader = build_loader(source, method.recipe(), batch_size=4, loader="torchvision", device="cpu",
                          num_threads=1, sampler=sampler)
    assert loader.skipped_samples == 2
    batch = next(iter(loader))
    assert sorted(batch["index"].tolist()) == [0, 2, 3, 4]
    want = {0: [0.5, 0.5, 0], 2: [1, 0, 0], 3: [0, 0.5, 0.5], 4: [1, 0, 0]}
    t = method.targets(batch)
    t = t / t.sum(1, keepdim=True)  # the softmax loss's 1/k target
    for row, i in zip(t.tolist(), batch["index"].tolist()):
        assert row == want[i]
