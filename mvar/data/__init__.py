"""WebDataset shards: writing (synth, pack, tokenize), checking (verify) and reading (loaders).

The names below load lazily, so importing `mvar.data.commands` for the CLI
does not pull in torch and webdataset.

    from mvar.data import DataConfig, build_train_loader, build_eval_loader
    loader = build_train_loader(cfg.data, rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    for x, y in loader: ...                 # exactly len(loader) batches on every rank
    metrics["data/bad_samples"] = loader.bad_samples.value
"""
from __future__ import annotations

from mvar.lazy import lazy_getattr

_EXPORTS = {
    "DataConfig": "mvar.data.config",
    "DataError": "mvar.data.manifest",
    "Manifest": "mvar.data.manifest",
    "read_manifest": "mvar.data.manifest",
    "BadSampleCounter": "mvar.data.counter",
    "build_train_loader": "mvar.data.loader",
    "build_eval_loader": "mvar.data.loader",
    "open_shard_set": "mvar.data.loader",
    "verify_shard_checksums": "mvar.data.loader",
    "TrainLoader": "mvar.data.loader",
    "EvalLoader": "mvar.data.loader",
    "split_scales": "mvar.data.samples",
    "center_crop_arr": "mvar.data.imaging",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
