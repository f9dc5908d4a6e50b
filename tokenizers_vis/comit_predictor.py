"""COMiT's predictor: the one DiT that both encodes (message updates) and decodes (velocity).

Davtyan et al. 2026 (arXiv 2602.20731), reference ``predictor/dit.py`` (``RuledDiT``). The
tokenizer, its crop loop, losses and decoding are in :mod:`tokenizers_vis.comit`; every
deviation from the reference is listed in that module's docstring.
"""
from __future__ import annotations

import torch
from torch import nn

from generators import flow
from generators.transformer import Block, RMSNorm, modulate, swiglu_hidden
from tokenizers_vis.qformer import sincos_2d


class StreamBlock(Block):
    """:class:`generators.transformer.Block` with two adaLN-Zero maps of the time embedding: the
    inherited ``adaln`` modulates the image tokens, ``adaln_msg`` the message / query tokens; the
    first token (the offset) is normalised but neither modulated nor gated (reference
    ``RuledDiTBlock``)."""

    def __init__(self, dim: int, heads: int, ffn_hidden: int, qkv_bias: bool = True):
        super().__init__(dim, heads, ffn_hidden=ffn_hidden, adaln_dim=dim, qkv_bias=qkv_bias)
        self.adaln_msg = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaln_msg[1].weight)
        nn.init.zeros_(self.adaln_msg[1].bias)

    def forward(self, h, temb, n_x: int, mask=None):
        B, T, D = h.shape
        ident = h.new_zeros(6 * D)
        ident[2 * D:3 * D] = 1  # gate of attention
        ident[5 * D:] = 1       # gate of FFN
        mods = torch.cat([ident.expand(B, 1, -1), self.adaln(temb)[:, None].expand(B, n_x, -1),
                          self.adaln_msg(temb)[:, None].expand(B, T - 1 - n_x, -1)], 1)
        sa, ca, ga, sm, cm, gm = mods.chunk(6, -1)
        h = h + ga * self.attention(modulate(self.attention_norm(h), sa, ca), None, mask)
        return h + gm * self.feed_forward(modulate(self.ffn_norm(h), sm, cm))


class MessageDiT(nn.Module):
    """COMiT's predictor (reference ``RuledDiT``): image latents + message + offset -> velocity of
    the image latents and/or a message update.

    Sequence: ``[offset (1), image patches (T), message (N), update queries (N, encode only)]``.
    Every token attends to the offset, image and message tokens; the queries also attend to
    each other causally; nothing attends to the queries. Image patches get fixed 2D sin-cos
    positions of *their own* grid (a crop is placed at the top-left positions, as the reference
    slices its position table): where a crop lies enters only through the offset.
    """

    def __init__(self, latent_channels: int, patch_size: int, dim: int, depth: int, heads: int,
                 num_tokens: int, token_dim: int, ffn_hidden: int | None = None, qkv_bias: bool = True):
        super().__init__()
        self.latent_channels, self.patch_size, self.dim = latent_channels, patch_size, dim
        self.num_tokens, self.token_dim = num_tokens, token_dim
        ffn_hidden = ffn_hidden or swiglu_hidden(dim, 64)
        self.x_embed = nn.Conv2d(latent_channels, dim, patch_size, patch_size)
        self.msg_embed = nn.Sequential(nn.Linear(token_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.offset_embed = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_embed = flow.TimestepEmbedding(dim)
        # unit-variance N(0, 1) as the reference's torch.randn (r_pos_embed, r_to_token,
        # r_to_pos_embed, c_pos_embed): all N message tokens start as the same prior code and
        # all queries as the same token, so only these positions tell them apart at init
        self.msg_pos = nn.Parameter(torch.randn(num_tokens, dim))
        self.query_token = nn.Parameter(torch.randn(dim))
        self.query_pos = nn.Parameter(torch.randn(num_tokens, dim))
        self.offset_pos = nn.Parameter(torch.randn(dim))
        self.blocks = nn.ModuleList(StreamBlock(dim, heads, ffn_hidden, qkv_bias) for _ in range(depth))
        self.x_norm = RMSNorm(dim, affine=False)
        self.x_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.x_out = nn.Linear(dim, patch_size * patch_size * latent_channels)
        self.msg_norm = RMSNorm(dim, affine=False)
        self.msg_out = nn.Linear(dim, token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: xavier-uniform linears, zero biases; adaLN maps and the velocity output zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for lin in self.t_embed.mlp:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        zero = [self.x_adaln[1], self.x_out] + [b.adaln[1] for b in self.blocks] + [b.adaln_msg[1] for b in self.blocks]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @staticmethod
    def attention_mask(total: int, queries: int, device=None) -> torch.Tensor:
        """Boolean (T, T), True = attend: every row sees the first ``T - queries`` tokens; the
        ``queries`` last rows also see the queries causally."""
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[:, :total - queries] = True
        if queries:
            mask[total - queries:, total - queries:] = torch.ones(queries, queries, dtype=torch.bool,
                                                                  device=device).tril()
        return mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, message: torch.Tensor, offset: torch.Tensor, *,
                update_message: bool = False, velocity: bool = True, repr_layer: int | None = None) -> dict:
        """``x`` (B, C, h, w) latents, ``t`` (B,), ``message`` (B, N, token_dim) FSQ codes, ``offset``
        (B, 2) -> dict with ``velocity`` (B, C, h, w) if ``velocity``, ``message`` (B, N, token_dim;
        the un-quantised update) if ``update_message``, ``repr`` (B, T, dim; image tokens after
        block ``repr_layer``) if given."""
        B, C, h, w = x.shape
        p = self.patch_size
        if C != self.latent_channels or h % p or w % p:
            raise ValueError(f"MessageDiT expects (B, {self.latent_channels}, h, w) latents with h, w divisible "
                             f"by {p}, got {tuple(x.shape)}")
        if message.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(f"message must be (B, {self.num_tokens}, {self.token_dim}), got {tuple(message.shape)}")
        gh, gw = h // p, w // p
        xt = self.x_embed(x).flatten(2).transpose(1, 2)
        xt = xt + sincos_2d(gh, gw, self.dim, xt.device, xt.dtype)
        parts = [(self.offset_embed(offset.to(xt.dtype)) + self.offset_pos)[:, None], xt,
                 self.msg_embed(message.to(xt.dtype)) + self.msg_pos]
        nq = self.num_tokens if update_message else 0
        if nq:
            parts.append((self.query_token + self.query_pos).expand(B, -1, -1))
        hid = torch.cat(parts, 1)
        mask = self.attention_mask(hid.shape[1], nq, hid.device) if nq else None
        temb = self.t_embed(t.to(xt.dtype).expand(B))
        n_x = gh * gw
        out = {}
        for i, blk in enumerate(self.blocks):
            hid = blk(hid, temb, n_x, mask)
            if repr_layer is not None and i == repr_layer:
                out["repr"] = hid[:, 1:1 + n_x]
        if velocity:
            shift, scale = self.x_adaln(temb)[:, None].chunk(2, -1)
            v = self.x_out(modulate(self.x_norm(hid[:, 1:1 + n_x]), shift, scale))  # (B, T, p*p*C)
            v = v.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h, w)
            out["velocity"] = v
        if nq:
            out["message"] = self.msg_out(self.msg_norm(hid[:, -nq:]))
        return out


__all__ = ["MessageDiT", "StreamBlock"]
