"""CLIP and SigLIP: the text tower (causal, pooled at the end token), the training step through the
drop-in losses, GradCache accumulation equal to the full batch, captions missing from the data left
out and counted, exact resume, zero-shot and retrieval scores,
export of both towers."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_helpers import context, one_thread  # noqa: F401 (autouse fixture)
from PIL import Image

from fastssl.data.captions import tokenize, tokenizer
from fastssl.engine import Trainer, resolve_config
from fastssl.eval.zero_shot import retrieval_recall, zero_shot_scores
from fastssl.losses import ClipLoss, SigLipLoss
from fastssl.methods import METHODS
from fastssl.models.text import TextTransformer

TINY = dict(backbone="vit_tiny_patch4", image_size=16, vit_depth=1, embed_dim=16, context_length=8,
            text_width=16, text_layers=1, text_heads=2, batch_size=8, lr_batch_divisor=8, warmup_epochs=0.0,
            eval_knn=False, log_every=1)
CAPTIONS = [f"a photo of thing {k % 4}" for k in range(16)]


def build(name, seed=0, texts=CAPTIONS, **overrides):
    cls = METHODS[name]
    torch.manual_seed(seed)
    return cls(resolve_config(cls.config_class, overrides=TINY | overrides), captions=texts)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 16, 16, generator=g)], "index": torch.arange(n),
            "label": torch.zeros(n, dtype=torch.long)}


def test_text_tower_is_causal_and_pools_at_the_end_token():
    tok = tokenizer(8)
    tokens = tokenize(["a photo of a shoe on a plain white background", "a bag"], 8)
    assert tokens.shape == (2, 8) and tokens[1, 0] == tok.sot_token_id
    assert tokens[1, :4].tolist() == [tok.sot_token_id, *tok.encode("a bag"), tok.eot_token_id]
    assert tokens[0, -1] == tok.eot_token_id  # cut to the context, the end token kept
    torch.manual_seed(0)
    tower = TextTransformer(embed_dim=8, context_length=8, width=16, layers=2, heads=2)
    out = tower(tokens)
    after_end = tokens.clone()
    after_end[1, 5:] = 1234  # tokens after the end token cannot reach its row (causal mask)
    torch.testing.assert_close(tower(after_end), out)
    before_end = tokens.clone()
    before_end[1, 1] = 1234
    assert not torch.allclose(tower(before_end)[1], out[1])
    # the feature is the end token's row of the final LayerNorm, projected
    rows = {}
    tower.ln_final.register_forward_hook(lambda m, a, o: rows.setdefault("x", o))
    tower(tokens)
    torch.testing.assert_close(out[1], rows["x"][1, 3] @ tower.text_projection)
    with pytest.raises(ValueError, match=r"tokens: expected integer token ids \[B, 8\]"):
        tower(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="text_heads must divide text_width"):
        TextTransformer(embed_dim=8, context_length=8, width=10, layers=1, heads=4)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_step_is_the_drop_in_loss_on_both_towers(name):
    method = build(name)
    b = batch()
    out = method(b, context())
    tokens = tokenize(CAPTIONS[:8], 8)
    image = F.normalize(method.visual_projection(method.visual(b["views"][0])), dim=-1)
    text = F.normalize(method.text(tokens), dim=-1)
    if name == "clip":
        assert method.logit_bias is None
        assert math.isclose(method.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
        want = ClipLoss()(image, text, method.logit_scale.exp())
    else:  # the paper's initialisation: t = 10, b = -10
        assert math.isclose(method.logit_scale.exp().item(), 10, rel_tol=1e-6)
        assert method.logit_bias.item() == -10
        want = SigLipLoss()(image, text, method.logit_scale.exp(), method.logit_bias)
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    assert method.logit_scale.grad.abs() > 0 and method.text.token_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        method.logit_scale.fill_(7.0)
    method.after_optimizer_step(context())
    assert math.isclose(method.logit_scale.item(), math.log(100), rel_tol=1e-6)  # open_clip's clamp


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_grad_cache_accumulation_equals_the_full_batch(name):
    b = batch()
    results = {}
    for accum in (1, 4):
        method = build(name, accum_steps=accum).double()
        loss = method({**b, "views": [b["views"][0].double()]}, context())["loss"]
        loss.backward()
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        results[accum] = loss.detach(), grads
    (full, full_grads), (cached, cached_grads) = results[1], results[4]
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)
    assert cached_grads.keys() == full_grads.keys()
    for n, g in full_grads.items():
        torch.testing.assert_close(cached_grads[n], g, rtol=1e-9, atol=1e-12, msg=n)
    # plain accumulation (each micro-batch its own negatives) is another loss
    method = build(name).double()
    small = sum(method({"views": [b["views"][0][i:i + 2].double()], "index": torch.arange(i, i + 2)},
                       context())["loss"] for i in range(0, 8, 2)) / 4
    assert (small - full).abs() > 1e-6  # far above float64 round-off (SigLIP at b = -10: 4e-4)


class CaptionLoader:
    """16 fixed 16-px images in a per-epoch shuffle (the ssl_tiny loader's contract), batches of 8."""

    def __init__(self):
        self.x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        self.epoch = 0

    def __len__(self):
        return 2

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(self.epoch))
        for i in range(2):
            idx = perm[8 * i:8 * i + 8]
            yield {"views": [self.x[idx]], "index": idx, "label": torch.zeros(8, dtype=torch.long)}


def test_trainer_runs_grad_cache_and_resumes_exactly(tmp_path):
    """(GradCache through the Trainer equal to one process without accumulation: test_engine_fsdp.)"""
    def run(out, max_steps, resume=None):
        method = build("siglip", out=str(out), max_steps=max_steps, epochs=1, accum_steps=2,
                       checkpoint_every=1)
        summary = Trainer(method, CaptionLoader(), resume=resume, progress=False, log=lambda m: None).fit()
        return method.state_dict(), summary

    cached, summary = run(tmp_path / "a", 2)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    run(tmp_path / "b", 1)
    resumed, _ = run(tmp_path / "b", 2, resume="auto")
    for k, v in cached.items():
        assert torch.equal(resumed[k], v), k


def _jpeg(seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_img2dataset_shards_train_and_a_sample_without_caption_is_skipped(tmp_path):
    from fastssl.data import ShardSource, build_loader

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k in range(9):
            members = [("jpg", _jpeg(k))]
            if k == 4:  # no caption at all: left out and counted
                members.append(("json", json.dumps({"key": f"{k:09d}"}).encode()))
            elif k % 2:  # the caption in .json only
                members.append(("json", json.dumps({"caption": f"thing {k % 3}"}).encode()))
            else:
                members.append(("txt", f"a thing {k % 3}".encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{k:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = ShardSource(str(tmp_path))
    assert source.captions() == [None if k == 4 else f"a thing {k % 3}" if k % 2 == 0 else f"thing {k % 3}"
                                 for k in range(9)]
    method = build("clip", texts=None, out=str(tmp_path / "run"), max_steps=2, epochs=1, batch_size=4,
                   source=str(tmp_path))
    method.bind_data(source)
    loader = build_loader(source, method.recipe(), batch_size=4, seed=0, drop_last=True, loader="torchvision",
                          device="cpu", num_threads=1, sampler=method.build_sampler(source))
    assert len(loader) == 2
    seen = []
    method.register_forward_pre_hook(lambda m, args: seen.extend(args[0]["index"].tolist()))
    summary = Trainer(method, loader, progress=False, log=lambda m: None).fit()
    assert summary["skipped_samples"] == 1 and 4 not in seen and len(seen) == 8


def test_zero_shot_and_retrieval_scores_by_hand():
    e = torch.eye(3)
    image = F.normalize(torch.tensor([[1.0, 0.1, 0], [0, 1, 0.2], [0.9, 0, 0.1], [0, 0, 1]]), dim=1)
    scores = zero_shot_scores(image, torch.tensor([0, 1, 2, 2]), e)
    assert scores == {"zero_shot_top1": 0.75, "zero_shot_top5": 1.0}
    # texts: image 0 and 2 share text 0; image 1 -> text 1, image 3 -> text 2
    recall = retrieval_recall(image, e, torch.tensor([0, 1, 0, 2]), ks=(1, 2))
    assert recall == {"image_to_text_r1": 1.0, "text_to_image_r1": 1.0, "image_to_text_r2": 1.0,
                      "text_to_image_r2": 1.0}
    recall = retrieval_recall(image, e, torch.tensor([1, 0, 0, 2]), ks=(1, 2))  # images 0 and 1 swapped
    # image 0 ranks its text 1 second (text 0 scores higher); image 1 ranks its text 0 third;
    # text 0's best image, 2, loses to image 0; text 1's image 0 loses to image 1
    assert recall == pytest.approx({"image_to_text_r1": 0.5, "text_to_image_r1": 1 / 3,
                                    "image_to_text_r2": 0.75, "text_to_image_r2": 1.0})


def test_evaluator_scores_zero_shot_retrieval_and_exports_both_towers(tmp_path):
    from fastssl.data import ArraySource
    from fastssl.data.spec import DataSplits
    from fastssl.runs import export_backbone

    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16), dtype=np.uint8)
    test = ArraySource(images, np.arange(12) % 3)
    test.classes = ["cat", "dog", "bird"]
    method = build("clip", out=str(tmp_path / "run"), max_steps=1, epochs=1, loader="torchvision",
                   captions="synthetic", retrieval_images=8)
    Trainer(method, CaptionLoader(), progress=False, log=lambda m: None).fit()
    evaluator = method.evaluator(None, DataSplits(test, test, test), torch.device("cpu"))
    assert evaluator.takes_method
    result = evaluator(method.eval())
    assert result["retrieval_images"] == 8
    assert set(result) == {"zero_shot_top1", "zero_shot_top5", "retrieval_images",
                           *(f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))}
    assert result["zero_shot_top5"] == 1.0  # 3 classes
    assert all(0 <= v <= 1 for k, v in result.items() if k != "retrieval_images")

    info = export_backbone(tmp_path / "run", tmp_path / "model.pt")
    assert info["text_tower"] == str(tmp_path / "model.text.pt")
    text = torch.load(info["text_tower"], weights_only=True)
    assert info["text_load"] == ("fastssl.models.text.TextTransformer(embed_dim=16, context_length=8, "
                                 "width=16, layers=1, heads=2)")
    tower = TextTransformer(embed_dim=16, context_length=8, width=16, layers=1, heads=2)
    tower.load_state_dict({k[5:]: v for k, v in text.items() if k.startswith("text.")})
    tokens = tokenize(["a photo of a dog"], 8)
    torch.testing.assert_close(tower(tokens), method.text(tokens))
    assert {k for k in text if not k.startswith("text.")} == {"visual_projection.weight", "logit_scale"}
    backbone = torch.load(tmp_path / "model.pt", weights_only=True)
    assert backbone.keys() == method.visual.state_dict().keys()
