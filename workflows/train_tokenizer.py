"""Train the multi-scale VQ tokenizer on image shards with Ray Train: `mvar train-tokenizer`, as a module.

    python -m workflows.train_tokenizer --config workflows/configs/tokenizer_tiny_local.yaml [a.b=c ...]
    ray job submit --working-dir . -- python -m workflows.train_tokenizer --config workflows/configs/tokenizer_in256.yaml

Losses: L1 + L2 reconstruction and the multi-scale VQ loss, plus a VGG16
perceptual term when `losses.perceptual_weight` > 0 and `losses.perceptual_weights`
names a local torchvision vgg16 state dict (nothing is downloaded). The final
tokenizer checkpoint is written to `output` (default <run.storage_path>/<run.name>/tokenizer):
give it to `workflows.train` (`tokenizer: DIR`) and `mvar data tokenize --tokenizer DIR`.
Rerunning the same command resumes the run from its latest checkpoint and the same MLflow run.
"""
from __future__ import annotations

import sys

from mvar.commands import run_cli, standalone
from mvar.commands.train import TRAIN_TOKENIZER, configure_train_tokenizer


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.train_tokenizer", TRAIN_TOKENIZER, configure_train_tokenizer),
                   argv, name="workflows.train_tokenizer")


if __name__ == "__main__":
    sys.exit(main())
