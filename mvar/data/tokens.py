"""`mvar data tokenize`: image shards -> token shards (the latent cache MVAR trains from).

Token shard i holds the samples of image shard i under the same keys:
`KEY.npy` is the flat code indices of all scales, coarsest first, (L,) with
L = sum(pn * pn), in the smallest unsigned dtype that holds the vocabulary;
`KEY.flip.npy` (with --flip) the same for the mirrored image; `KEY.cls` the
label. The manifest records the tokenizer's sha256 so a run with another
tokenizer refuses these shards.
"""
from __future__ import annotations

import logging
import tarfile
from typing import Iterator

import numpy as np
import torch

from mvar.checkpoint import load_tokenizer, tokenizer_fingerprint
from mvar.data import storage
from mvar.data.loader import open_shard_set
from mvar.data.manifest import DataError, Manifest, ShardInfo, write_manifest
from mvar.data.samples import (
    TOKEN_EXT,
    TOKEN_FLIP_EXT,
    decode_image,
    decode_tokens,
    encode_tokens,
    label_of,
    split_scales,
)
from mvar.data.tario import iter_tar_samples
from mvar.data.writer import ShardSetWriter
from mvar.errors import UserError

log = logging.getLogger("mvar.data")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65536 codes (VAR's is 4096): a quarter of int64's bytes."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def encode_batch(model, x_B3HW: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Images in [-1, 1] -> (B, L) code indices of all scales concatenated."""
    idx_list = model.img_to_idx(x_B3HW)          # one (B, pn * pn) LongTensor per scale
    return torch.cat(idx_list, dim=1).cpu().numpy().astype(dtype)


class _ShardTokenizer:
    """Turns one image shard into token samples, batch by batch."""

    def __init__(self, model, src: Manifest, flip: bool, batch_size: int, device: torch.device, bar):
        self.model, self.src, self.flip = model, src, flip
        self.batch_size, self.device, self.bar = batch_size, device, bar
        self.dtype = token_dtype(model.vocab_size)

    def _flush(self, batch: list[tuple[str, int, torch.Tensor]]) -> Iterator[tuple[str, dict]]:
        if not batch:
            return
        x_B3HW = torch.stack([x for _, _, x in batch]).to(self.device)
        if self.flip:  # one forward pass for both: per-call overhead dominates small batches
            both_2BL = encode_batch(self.model, torch.cat([x_B3HW, x_B3HW.flip(-1)]), self.dtype)
            idx_BL, flip_BL = both_2BL[:len(batch)], both_2BL[len(batch):]
        else:
            idx_BL, flip_BL = encode_batch(self.model, x_B3HW, self.dtype), None
        for b, (key, label, _) in enumerate(batch):
            sample = {TOKEN_EXT: encode_tokens(idx_BL[b]), "cls": str(label).encode()}
            if flip_BL is not None:
                sample[TOKEN_FLIP_EXT] = encode_tokens(flip_BL[b])
            yield key, sample
        self.bar.update(len(batch))

    def samples(self, url: str, info: ShardInfo, stats: dict) -> Iterator[tuple[str, dict]]:
        batch = []
        try:
            with storage.open_read(url) as stream:
                for key, sample in iter_tar_samples(stream):
                    try:
                        x = decode_image(sample, self.src.image_size, flip=False)
                        batch.append((key, label_of(sample, self.src.num_classes), x))
                    except Exception as err:  # one bad image: skip it, as pack does
                        log.warning("skipping sample %s of %s: %s", key, info.name, err)
                        stats["undecodable"].append(f"{info.name}:{key}")
                    if len(batch) == self.batch_size:
                        yield from self._flush(batch)
                        batch = []
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"source shard {url} is unreadable ({err}); run `mvar data verify`") from err
        yield from self._flush(batch)


def _plan(fingerprint: str, src: Manifest, flip: bool) -> dict:
    return dict(command="tokenize", tokenizer_sha256=fingerprint, flip=flip,
                src_shards_sha256=[s.sha256 for s in src.shards])


def _load(tokenizer: str, device: torch.device):
    fingerprint = tokenizer_fingerprint(tokenizer)
    model, cfg = load_tokenizer(tokenizer, device=device)
    return model, cfg, fingerprint


def _token_manifest(src: Manifest, cfg, fingerprint: str, flip: bool, records,
                    tokenizer: str, src_location: str) -> Manifest:
    undecodable = [key for _, stats in records for key in stats["undecodable"]]
    tokens = dict(tokenizer_sha256=fingerprint, tokenizer=str(tokenizer), patch_nums=list(cfg.patch_nums),
                  vocab_size=cfg.vocab_size, dtype=token_dtype(cfg.vocab_size).name, flip=flip)
    return Manifest(kind="tokens", num_samples=sum(info.num_samples for info, _ in records),
                    class_names=src.class_names, image_size=src.image_size, sample_format="npy",
                    shards=[info for info, _ in records], tokens=tokens,
                    skipped=dict(undecodable_images=len(undecodable), undecodable_examples=undecodable[:20]),
                    source=dict(command="tokenize", src=src_location, flip=flip))


def tokenize(tokenizer: str, src: str, out: str, flip: bool = False, batch_size: int = 64,
             device: str = "auto", progress: bool = True) -> Manifest:
    """Encode every image shard of `src` into a token shard under `out` (resumable)."""
    from mvar import progress as bars

    src_manifest = open_shard_set(src, kind="images")
    dev = _device(device)
    model, cfg, fingerprint = _load(tokenizer, dev)
    if cfg.image_size != src_manifest.image_size:
        raise UserError(f"tokenizer '{tokenizer}' takes {cfg.image_size} px images but '{src}' holds "
                        f"{src_manifest.image_size} px; pack with --image-size {cfg.image_size}")
    plan = _plan(fingerprint, src_manifest, flip)
    num_shards = len(src_manifest.shards)
    with ShardSetWriter(out, plan) as job:
        pending = [i for i in range(num_shards) if not job.is_done(i)]
        done = src_manifest.num_samples - sum(src_manifest.shards[i].num_samples for i in pending)
        with bars.bar(src_manifest.num_samples, f"tokenize {out}", initial=done, flag=progress) as bar:
            worker = _ShardTokenizer(model, src_manifest, flip, batch_size, dev, bar)
            for i in pending:
                info, stats = src_manifest.shards[i], {"undecodable": []}
                url = storage.join(src, info.name)
                job.write(i, worker.samples(url, info, stats), stats)
        records = job.records(num_shards)
        manifest = _token_manifest(src_manifest, cfg, fingerprint, flip, records, tokenizer, src)
        write_manifest(out, manifest)
    return manifest


def token_usage(location: str, manifest: Manifest) -> torch.Tensor:
    """(S, V) counts of each code at each scale over every token shard of ``location`` (the unflipped codes)."""
    from mvar.tokenizer.metrics import code_counts
    patch_nums, V = manifest.tokens["patch_nums"], manifest.tokens["vocab_size"]
    num_tokens = sum(pn * pn for pn in patch_nums)
    counts = torch.zeros(len(patch_nums), V)
    for info in manifest.shards:
        with storage.open_read(storage.join(location, info.name)) as stream:
            rows = [decode_tokens(sample, num_tokens, V, flip=False) for _, sample in iter_tar_samples(stream)]
        if rows:
            counts += code_counts(split_scales(torch.stack(rows), patch_nums), V)
    return counts


def usage_report(counts_SV: torch.Tensor, patch_nums: list[int]) -> str:
    """One line per scale: side, codes in use (% of the codebook), perplexity."""
    from mvar.tokenizer.metrics import perplexity
    V = counts_SV.shape[1]
    used, ppl = counts_SV.gt(0).sum(1).tolist(), perplexity(counts_SV).tolist()
    lines = [f"codebook usage per scale ({V} codes):"]
    for k, (pn, u, p) in enumerate(zip(patch_nums, used, ppl)):
        lines.append(f"  scale {k} ({pn}x{pn}): {u:4d} codes ({100 * u / V:5.1f} %), perplexity {p:7.1f}")
    return "\n".join(lines)
