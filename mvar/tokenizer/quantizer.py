"""Multi-scale residual vector quantizer (VAR's algorithm).

Scale s quantizes the area-downsampled residual at pn_s x pn_s, upsamples
the chosen code vectors bicubically to the latent size, refines them with a
shared 3x3 conv ``phi`` and adds them to ``f_hat``. Module names follow VAR's
released state dict (``quantize.quant_resi.qresi_ls.N``, ``quantize.embedding``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


def phi_anchors(num_phi: int) -> list[float]:
    """Positions in [0, 1] that the phi convs stand for.

    Four phis sit at linspace(1/12, 11/12, 4), any other count n at
    linspace(1/(2n), 1-1/(2n), n). Computed like numpy.linspace in float64
    (start + i*step, last one exact) because scales 2 and 7 of 10 are exact
    ties whose outcome depends on that rounding.
    """
    if num_phi == 1:
        return [0.5]
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    start, stop = margin, 1 - margin
    step = (stop - start) / (num_phi - 1)
    anchors = [start + i * step for i in range(num_phi)]
    anchors[-1] = stop
    return anchors


def phi_index_map(num_scales: int, num_phi: int) -> list[int]:
    """Which phi each scale uses: the anchor nearest to s/(K-1), first one on ties."""
    anchors = phi_anchors(num_phi)
    out = []
    for s in range(num_scales):
        at = s / (num_scales - 1)
        dists = [abs(a - at) for a in anchors]
        out.append(dists.index(min(dists)))
    return out


class _PhiBank(nn.Module):
    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...],
                 num_phi: int = 4, resi_ratio: float = 0.5, beta: float = 0.25, znorm: bool = False):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, z_channels, beta
        self.znorm = znorm  # cosine lookup (VAR's using_znorm); the chosen code's raw vector is still what is added
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.quant_resi = _PhiBank([Phi(z_channels, resi_ratio) for _ in range(num_phi)])
        self.phi_of_scale = phi_index_map(len(self.patch_nums), num_phi)
        # code usage per scale; kept for state-dict compatibility with VAR's tokenizer
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))

    def phi(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.qresi_ls[self.phi_of_scale[si]](h_BChw)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code vector for each row of z_NC: L2, or the largest cosine with ``znorm``."""
        codes_VC = self.embedding.weight.detach()
        if self.znorm:
            return (F.normalize(z_NC, dim=1) @ F.normalize(codes_VC, dim=1).T).argmax(dim=1)
        d_NV = z_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1)
        d_NV = torch.addmm(d_NV, z_NC, codes_VC.T, beta=1, alpha=-2)
        return d_NV.argmin(dim=1)

    def residual_at(self, si: int, f_rest: torch.Tensor) -> torch.Tensor:
        """The vectors scale si looks up: the residual area-resampled to pn x pn (itself on the last scale),
        (B * pn * pn, Cvae) in row-major order."""
        pn, C = self.patch_nums[si], f_rest.shape[1]
        z = f_rest if si == len(self.patch_nums) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        return z.permute(0, 2, 3, 1).reshape(-1, C)

    def _scale_step(self, si: int, f_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the residual at scale si: (indices (B, pn*pn), phi'd embedding at latent size)."""
        B, C, H, W = f_rest.shape
        pn, last = self.patch_nums[si], si == len(self.patch_nums) - 1
        idx_N = self.nearest_code(self.residual_at(si, f_rest))
        h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
        if not last:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        return idx_N.view(B, pn * pn), self.phi(si, h_BChw.contiguous())

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features -> code indices of every scale, each (B, pn*pn), row-major."""
        f_rest = f_BChw.detach().float().clone()
        out = []
        for si in range(len(self.patch_nums)):
            idx_Bl, h_BChw = self._scale_step(si, f_rest)
            f_rest = f_rest - h_BChw
            out.append(idx_Bl)
        return out

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: (f_hat with straight-through gradient, VQ loss, indices per scale).

        The VQ loss averages over scales: beta * ||sg(f_hat) - f||^2 (commitment)
        plus ||f_hat - sg(f)||^2 (codebook, through the embedding and phi).
        """
        f = f_BChw.float()
        f_detached = f.detach()
        f_rest = f_detached.clone()
        f_hat = torch.zeros_like(f_rest)
        vq_loss = f.new_zeros(())
        indices = []
        for si in range(len(self.patch_nums)):
            idx_Bl, h_BChw = self._scale_step(si, f_rest)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
            indices.append(idx_Bl)
            with torch.no_grad():
                self.ema_vocab_hit_SV[si].mul_(0.99).add_(torch.bincount(idx_Bl.flatten(), minlength=self.vocab_size), alpha=0.01)
        vq_loss = vq_loss / len(self.patch_nums)
        f_hat_st = (f_hat.detach() - f_detached) + f  # value of f_hat, gradient of f
        return f_hat_st, vq_loss, indices

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Sum over scales of the phi'd, upsampled code vectors: (B, Cvae, H, W)."""
        H = self.patch_nums[-1]
        B = idx_list[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        for si, idx_Bl in enumerate(idx_list):
            f_hat = self.add_scale(si, f_hat, self.codes_to_map(si, idx_Bl))
        return f_hat

    def codes_to_map(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        """(B, pn*pn) indices -> (B, Cvae, pn, pn) code vectors."""
        pn = self.patch_nums[si]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    def add_scale(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """f_hat + phi_s(upsample(h)) (no upsampling on the last scale)."""
        H = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return f_hat + self.phi(si, h_BChw)

    def next_input(self, si: int, f_hat: torch.Tensor) -> torch.Tensor:
        """Transformer input for scale si+1: f_hat area-resampled to pn_{si+1}, (B, pn^2, Cvae)."""
        pn = self.patch_nums[si + 1]
        B, C = f_hat.shape[:2]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").reshape(B, C, pn * pn).transpose(1, 2)

    def idx_to_teacher_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for scales 2..K: (B, L - pn_1^2, Cvae)."""
        H = self.patch_nums[-1]
        B = idx_list[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H)
        parts = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = self.add_scale(si, f_hat, self.codes_to_map(si, idx_list[si]))
            parts.append(self.next_input(si, f_hat))
        return torch.cat(parts, dim=1)
