"""`mvar data tokenize` with the tiny tokenizer: token shards round trip and fingerprint checks."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from mvar.checkpoint import save_tokenizer, tokenizer_fingerprint
from mvar.data.loader import build_eval_loader, build_train_loader
from mvar.data.manifest import DataError, read_manifest
from mvar.data.samples import decode_tokens, split_scales
from mvar.data.synth import write_synth
from mvar.data.tario import iter_tar_samples
from mvar.data.tokens import token_usage, tokenize, usage_report
from mvar.errors import UserError
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

PATCH_NUMS = (1, 2, 3, 4)
NUM_TOKENS = sum(pn * pn for pn in PATCH_NUMS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer directory, model, image shards at 64 px, token shards with flips)."""
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    cfg = TokenizerConfig.tiny()
    assert tuple(cfg.patch_nums) == PATCH_NUMS
    model = MultiScaleVQVAE(cfg).eval()
    save_tokenizer(str(root / "tokenizer"), model, cfg)
    images = str(root / "images")
    write_synth(images, num_images=24, image_size=64, num_classes=4, seed=3, shard_size=12)
    tokens = str(root / "tokens")
    tokenize(str(root / "tokenizer"), images, tokens, flip=True, batch_size=12, device="cpu", progress=False)
    return str(root / "tokenizer"), model, images, tokens


def _eval_batches(location: str, data_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, labels, indices = zip(*build_eval_loader(data_cfg(location, batch_size=8), 0, 1))
    return torch.cat(xs), torch.cat(labels), torch.cat(indices)


def test_token_shards_hold_the_tokenizer_indices(tiny, data_cfg):
    tok_dir, model, images, tokens = tiny
    manifest = read_manifest(tokens)
    assert manifest.kind == "tokens" and manifest.num_samples == 24
    assert manifest.tokens["tokenizer_sha256"] == tokenizer_fingerprint(tok_dir)
    assert manifest.tokens["dtype"] == "uint16" and manifest.tokens["patch_nums"] == list(PATCH_NUMS)
    x, labels, index = _eval_batches(images, data_cfg)
    idx, tok_labels, tok_index = _eval_batches(tokens, data_cfg)
    assert idx.dtype == torch.int64 and idx.shape == (24, NUM_TOKENS)
    assert torch.equal(index, tok_index) and torch.equal(labels, tok_labels)
    with torch.inference_mode():
        expected = model.img_to_idx(x)
    for got, want in zip(split_scales(idx, PATCH_NUMS), expected):
        assert torch.equal(got, want)


def test_usage_per_scale_counts_what_was_encoded(tiny, data_cfg, capsys):
    tok_dir, model, images, tokens = tiny
    x, _, _ = _eval_batches(images, data_cfg)
    with torch.inference_mode():
        expected = [torch.bincount(i.flatten(), minlength=32) for i in model.img_to_idx(x)]
    counts = token_usage(tokens, read_manifest(tokens))
    assert counts.shape == (4, 32) and counts.sum(1).tolist() == [24, 96, 216, 384]
    assert all(torch.equal(c.long(), e) for c, e in zip(counts, expected))
    report = usage_report(counts, list(PATCH_NUMS))
    used = int((expected[3] > 0).sum())
    assert f"scale 3 (4x4): {used:4d} codes ({100 * used / 32:5.1f} %)" in report


def test_flipped_variant_is_the_mirrored_image(tiny, data_cfg):
    _, model, images, tokens = tiny
    x, _, _ = _eval_batches(images, data_cfg)
    with torch.inference_mode():
        expected = torch.cat(model.img_to_idx(x.flip(-1)), dim=1)
    stored = []
    for name in sorted(n for n in os.listdir(tokens) if n.endswith(".tar")):
        with open(os.path.join(tokens, name), "rb") as fh:
            for _, sample in iter_tar_samples(fh):
                assert np.load(io.BytesIO(sample["npy"])).dtype == np.uint16
                stored.append(decode_tokens(sample, NUM_TOKENS, 32, flip=True))
    assert torch.equal(torch.stack(stored), expected)


def test_train_loader_reads_tokens(tiny, data_cfg):
    tok_dir, _, _, tokens = tiny
    loader = build_train_loader(data_cfg(tokens, kind="tokens", batch_size=4, steps_per_epoch=3),
                                tokenizer_fingerprint=tokenizer_fingerprint(tok_dir))
    batches = list(loader)
    assert len(batches) == 3
    for idx_BL, labels in batches:
        assert idx_BL.shape == (4, NUM_TOKENS) and idx_BL.dtype == torch.int64
        assert labels.dtype == torch.int64 and int(idx_BL.max()) < 32
        assert [t.shape[1] for t in split_scales(idx_BL, PATCH_NUMS)] == [1, 4, 9, 16]


def test_other_tokenizer_is_refused_naming_both(tiny, data_cfg):
    _, _, _, tokens = tiny
    made_with = read_manifest(tokens).tokens["tokenizer_sha256"]
    other = "ab" * 32
    with pytest.raises(DataError, match=f"made with tokenizer sha256 {made_with}.*uses tokenizer sha256 {other}"):
        build_train_loader(data_cfg(tokens), tokenizer_fingerprint=other)
    with pytest.raises(DataError, match=other):
        build_eval_loader(data_cfg(tokens), tokenizer_fingerprint=other)


def test_tokenize_refuses_mismatched_image_size(tiny, synth_set, tmp_path):
    tok_dir = tiny[0]
    with pytest.raises(UserError, match="takes 64 px images.*holds 32 px"):
        tokenize(tok_dir, synth_set, str(tmp_path / "t"), progress=False)
