"""The adapter for VAR's released weights (`vae_ch160v4096z32.pth`, `var_d16.pth`): their state dicts
-> a checkpoint of this project.

The official key names are this project's own, so nothing is renamed: the configs are read off
the tensors' shapes, the derived buffers are dropped (``NextScaleTransformer.load_official_state_dict``),
and ``mvar.checkpoint`` writes the result. Kept apart from the checkpoint format, as torchtitan keeps its
``state_dict_adapter``: the format does not change when another source of weights is added.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mvar.checkpoint import load_into, load_state_dict, save_checkpoint
from mvar.config import from_dict
from mvar.errors import UserError
from mvar.files import file_sha256
from mvar.models.config import ModelConfig
from mvar.models.transformer import NextScaleTransformer
from mvar.tokenizer import PATCH_NUMS_256, PATCH_NUMS_512, MultiScaleVQVAE, TokenizerConfig


def infer_tokenizer_config(sd: dict[str, torch.Tensor], num_tokens: int | None = None,
                           patch_nums: tuple[int, ...] | None = None) -> TokenizerConfig:
    """Tokenizer config from a `vae_ch160v4096z32.pth`-format state dict.

    The scales are not stored in the weights: taken from ``patch_nums`` when given, else the
    standard 256 or 512 px ones, or 1..K, whose token count matches the generator's ``num_tokens``.
    """
    try:
        vocab, z = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        num_phi = len({k for k in sd if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight")})
        num_scales = sd["quantize.ema_vocab_hit_SV"].shape[0]
    except KeyError as err:
        raise UserError(f"not a VAR tokenizer state dict: key {err} is missing") from err
    if patch_nums is None:
        for cand in (PATCH_NUMS_256, PATCH_NUMS_512, tuple(range(1, num_scales + 1))):
            if len(cand) == num_scales and (num_tokens is None or sum(p * p for p in cand) == num_tokens):
                patch_nums = cand
                break
    if patch_nums is None or len(patch_nums) != num_scales:
        raise UserError(f"cannot tell the tokenizer's scales ({num_scales} in its weights): pass --patch-nums")
    down = 2 ** (len(ch_mult) - 1)
    return from_dict(TokenizerConfig, dict(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=list(ch_mult),
                                           share_quant_resi=num_phi, patch_nums=list(patch_nums),
                                           image_size=patch_nums[-1] * down))


def infer_model_config(sd: dict[str, torch.Tensor], **fields) -> ModelConfig:
    """Generator config from a `var_d16.pth`-format state dict; ``fields`` set the attention choice."""
    try:
        width = sd["word_embed.weight"].shape[0]
        depth = len({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else fields.pop("num_heads", depth)
        mlp_ratio = sd["blocks.0.ffn.fc1.weight"].shape[0] / width
        num_classes = sd["class_emb.weight"].shape[0] - 1
    except KeyError as err:
        raise UserError(f"not a VAR generator state dict: key {err} is missing") from err
    return from_dict(ModelConfig, dict(depth=depth, embed_dim=width, num_heads=heads, mlp_ratio=mlp_ratio,
                                       attn_l2_norm=l2, num_classes=num_classes, **fields))


def import_var(vae_path: str | Path, var_path: str | Path, out: str | Path,
               patch_nums: tuple[int, ...] | None = None, overwrite: bool = False, **model_fields) -> Path:
    """VAR's released tokenizer + generator weights -> a checkpoint of this project."""
    vae_sd, var_sd = load_state_dict(vae_path), load_state_dict(var_path)
    num_tokens = var_sd["pos_1LC"].shape[1] if "pos_1LC" in var_sd else None
    tok_cfg = infer_tokenizer_config(vae_sd, num_tokens, patch_nums)
    cfg = infer_model_config(var_sd, **model_fields)
    tokenizer = MultiScaleVQVAE(tok_cfg)
    load_into(tokenizer, vae_sd, vae_path)
    model = NextScaleTransformer(cfg, tok_cfg.vocab_size, tok_cfg.z_channels, tuple(tok_cfg.patch_nums))
    try:
        model.load_official_state_dict(var_sd)
    except ValueError as err:
        raise UserError(f"'{var_path}' does not fit the tokenizer of '{vae_path}': {err}") from err
    extra = {"source": {"vae": str(Path(vae_path).resolve()), "var": str(Path(var_path).resolve()),
                        "vae_sha256": file_sha256(vae_path), "var_sha256": file_sha256(var_path)}}
    return save_checkpoint(out, model, tokenizer, tok_cfg, extra=extra, overwrite=overwrite)
