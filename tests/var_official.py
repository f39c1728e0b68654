"""An independent transcription of the official VAR and CoDe inference code (FoundationVision/VAR
`models/var.py`, `basic_var.py`, `quant.py`; czg1225/CoDe `autoregressive_infer_cfg_draft/_refine`),
written from the reference's structure for tests: a growing (concatenated) KV cache per block, the
additive -inf training mask, `(1 + t) c - t u` guidance, PhiPartiallyShared's tick lookup. Sampling
is replaced by a callable so parity can be checked with a deterministic draw (argmax).

Module and parameter names follow the reference, so its state dicts have the released layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialAttn(nn.Module):
    def __init__(self, C, H, l2):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_l2_norm = H, C // H, l2
        if l2:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100)).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, on):
        self.caching, self.cached_k, self.cached_v = on, None, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), 2)
                v = self.cached_v = torch.cat((self.cached_v, v), 2)
        att = (q.mul(self.scale) @ k.transpose(-2, -1))
        if attn_bias is not None:
            att = att + attn_bias
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C))


class OfficialFFN(nn.Module):
    def __init__(self, C, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialBlock(nn.Module):
    def __init__(self, C, H, shared, l2, eps=1e-6):
        super().__init__()
        self.C, self.shared_aln = C, shared
        self.attn, self.ffn = OfficialAttn(C, H, l2), OfficialFFN(C, round(C * 4.0))
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        if shared:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond_BD, attn_bias):
        if self.shared_aln:
            g1, g2, s1, s2, h1, h2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            g1, g2, s1, s2, h1, h2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(h1), attn_bias=attn_bias).mul_(g1)
        return x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(h2)).mul(g2)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class OfficialPhi(nn.Conv2d):
    def __init__(self, C, quant_resi):
        super().__init__(C, C, 3, 1, 1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, ls):
        super().__init__()
        self.qresi_ls = ls
        K = len(ls)
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def __getitem__(self, at):
        return self.qresi_ls[np.argmin(np.abs(self.ticks - at)).item()]


class OfficialQuant(nn.Module):
    """VectorQuantizer2's inference half (embedding, shared phis, get_next_autoregressive_input)."""

    def __init__(self, V, Cvae, patch_nums, share=4, quant_resi=0.5):
        super().__init__()
        self.v_patch_nums, self.Cvae = patch_nums, Cvae
        self.quant_resi = PhiPartiallyShared(nn.ModuleList([OfficialPhi(Cvae, quant_resi) for _ in range(share)]))
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(patch_nums), V), 0.0))
        self.embedding = nn.Embedding(V, Cvae)

    def get_next_autoregressive_input(self, si, SN, f_hat, h_BChw):
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            h = self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(HW, HW), mode="bicubic"))
            f_hat.add_(h)
            return f_hat, F.interpolate(f_hat, size=(self.v_patch_nums[si + 1], self.v_patch_nums[si + 1]), mode="area")
        h = self.quant_resi[si / (SN - 1)](h_BChw)
        f_hat.add_(h)
        return f_hat, f_hat

    def f_to_idxBl(self, f):
        B, C, H, W = f.shape
        f_rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        SN = len(self.v_patch_nums)
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, C) if si != SN - 1 else f_rest.permute(0, 2, 3, 1).reshape(-1, C)
            d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(self.embedding.weight.data.square(), dim=1, keepdim=False)
            d.addmm_(z, self.embedding.weight.data.T, alpha=-2, beta=1)
            idx = torch.argmin(d, dim=1)
            h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode="bicubic").contiguous() if si != SN - 1 else h.contiguous()
            h = self.quant_resi[si / (SN - 1)](h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(idx.reshape(B, pn * pn))
        return out


class OfficialVAR(nn.Module):
    def __init__(self, quant: OfficialQuant, num_classes, depth, embed_dim, num_heads, shared_aln=False, attn_l2_norm=True,
                 patch_nums=(1, 2, 3, 4)):
        super().__init__()
        self.quant = (quant,)  # not registered: the VQVAE's weights live in its own file
        self.Cvae, self.V = quant.Cvae, quant.embedding.num_embeddings
        self.C = embed_dim
        self.num_classes, self.patch_nums = num_classes, patch_nums
        self.L = sum(pn ** 2 for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.num_stages_minus_1 = len(patch_nums) - 1
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(patch_nums), self.C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(self.C, 6 * self.C)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([OfficialBlock(self.C, num_heads, shared_aln, attn_l2_norm) for _ in range(depth)])
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer("lvl_1L", dT[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking", torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())
        self.head_nm_ln = nn.LayerNorm(self.C, eps=1e-6, elementwise_affine=False)
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(self.C, 2 * self.C))
        self.head = nn.Linear(self.C, self.V)

    def get_logits(self, h, cond_BD):
        scale, shift = self.head_nm.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.head(self.head_nm_ln(h.float()).mul(scale.add(1)).add_(shift).float()).float()

    def forward(self, label_B, x_BLCv_wo_first_l):
        B = x_BLCv_wo_first_l.shape[0]
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        c = self.shared_ada_lin(cond_BD)
        for b in self.blocks:
            x = b(x, c, self.attn_bias_for_masking)
        return self.get_logits(x.float(), cond_BD)

    @torch.no_grad()
    def infer(self, label_B, cfg, draw, stop=None, start=None, draft=None, f_hat=None):
        """autoregressive_infer_cfg (start=stop=None), CoDe's draft (stop=N: returns f_hat and the token
        hub) and refine (start=N with the drafter's hub and f_hat). draw(logits [B,l,V]) -> ids [B,l].
        Returns (f_hat, tokens per scale, [token hub])."""
        B = label_B.shape[0]
        quant = self.quant[0]
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        first = sos.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l]
        c = self.shared_ada_lin(cond_BD)
        tokens, hub = [], []
        if start is None:
            next_map, f_hat, bias = first, sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1]), None
        else:  # CoDe refine: the first step feeds the drafter's hub of every scale before the entry one, and the entry scale
            pindex = sum(p * p for p in self.patch_nums[:start + 1])
            next_map = torch.cat([first, (self.word_embed(draft) + lvl_pos[:, 1:pindex]).repeat(2, 1, 1)], 1)
            bias = self.attn_bias_for_masking[:, :, :pindex, :pindex]
        for b in self.blocks:
            b.attn.kv_caching(True)
        cur_L = 0
        for si, pn in enumerate(self.patch_nums):
            cur_L += pn * pn
            if stop is not None and si == stop:
                break
            if start is not None and si < start:
                continue
            ratio = si / self.num_stages_minus_1
            x = next_map
            for b in self.blocks:
                x = b(x, c, bias)
            bias = None
            logits = self.get_logits(x, cond_BD)
            if start is not None and si == start:
                logits = logits[:, cur_L - pn * pn:cur_L]
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = draw(logits)
            tokens.append(idx)
            h = quant.embedding(idx).transpose_(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h)
            if si != self.num_stages_minus_1:
                next_map = next_map.view(B, self.Cvae, -1).transpose(1, 2)
                hub.append(next_map)
                next_map = (self.word_embed(next_map) + lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]).repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return f_hat, tokens, (torch.cat(hub, 1) if hub else None)

    def released_state_dict(self):
        """The state dict with the reference's key names (head_nm's LayerNorm has no weights)."""
        return {k: v for k, v in self.state_dict().items()}


def official_pair(seed, V=40, Cvae=8, depth=2, C=64, H=2, patch_nums=(1, 2, 3, 4), num_classes=10, shared=False, l2=True):
    """A random transcription (VAR + its quantizer), every parameter ~ N(0, 0.1) (the phis 0.3)."""
    torch.manual_seed(seed)
    quant = OfficialQuant(V, Cvae, patch_nums)
    var = OfficialVAR(quant, num_classes, depth, C, H, shared_aln=shared, attn_l2_norm=l2, patch_nums=patch_nums)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (quant, var):
            for name, p in mod.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    p.copy_(torch.full_like(p, math.log(4.0)) + torch.randn(p.shape, generator=g) * 0.3)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "quant_resi" in name else 0.1))
    return var.eval(), quant.eval()
