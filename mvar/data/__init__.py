"""WebDataset shards: writing (synth, pack, tokenize), checking (verify) and reading (loaders).

The names below load lazily, so importing `mvar.data.commands` for the CLI
does not pull in torch and webdataset.

    from mvar.data import DataConfig, build_train_loader, build_eval_loader
    loader = build_train_loader(cfg.data, rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    for x, y in loader: ...                 # exactly len(loader) batches on every rank
    metrics["data/bad_samples"] = loader.bad_samples.value
"""
from __future__ import annotations

from mvar.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mvar.data.config": ["DataConfig"],
    "mvar.data.manifest": ["DataError", "Manifest", "read_manifest"],
    "mvar.data.counter": ["BadSampleCounter"],
    "mvar.data.loader": ["build_train_loader", "build_eval_loader", "open_shard_set", "verify_shard_checksums",
                         "TrainLoader", "EvalLoader"],
    "mvar.data.samples": ["split_scales"],
    "mvar.data.imaging": ["center_crop_arr"],
})
