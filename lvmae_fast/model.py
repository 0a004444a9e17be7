"""LV-MAE over packed (varlen) sequences: the model and its config, top to bottom.

Math follows the paper and the amazon-science/lv-mae reference (MAE-derived): the encoder sees a CLS
token plus the *visible* embeddings only, with fixed 1-D sin-cos positions (table row 0 = CLS, all
zeros); pre-norm blocks (LayerNorm eps 1e-6, qkv bias, MLP ratio 4, GELU); the decoder embeds the
encoder output, puts a shared learnable mask token at every masked position, adds its own sin-cos
positions to all tokens, runs shallower blocks, a norm and a linear head back to the input dim.
Parameter names equal the reference's state-dict keys, so conversion is a rename-free copy.

Shape legend: T tokens in the batch, Tv visible, Tm masked, Te = B + Tv (encoder stream),
Td = B + T (decoder stream), d input dim, D encoder width, Dd decoder width, H heads, Dh head dim.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .attention import ATTN_IMPLS, _padded_layout, resolve_impl, varlen_attention
from .loss import LOSSES, masked_reconstruction_loss
from .masking import MASKING_STRATEGIES
from .packing import MAX_LEN_HINT, PackedBatch, pack_sequences, validate_sequences

# The longest max_len a config may ask for: 2^22 segments of 5 s are 243 days of video, and beyond it the
# position tables alone (max_len x width, fp32) run to tens of GB, a failed allocation deep inside torch.
MAX_LEN_LIMIT = 1 << 22

PRESETS: dict[str, dict] = {
    # The paper's model (Table 5 / reference): ~0.4B parameters.
    "paper": dict(embed_dim=1024, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16),
    # For CPU tests and the demo.
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
}


@dataclass
class LVMAEConfig:
    in_dim: int = 1024                # embedding dim of the frozen short-video encoder
    embed_dim: int = 1024
    depth: int = 32
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    max_len: int = 8192               # longest sequence accepted; positions are computed for any length
    mask_ratio: float = 0.5
    masking: str = "semantic"         # random | semantic (paper) | semantic_inverted (reference code)
    loss: str = "mse"                 # mse | cosine
    norm_targets: bool = False        # per-token standardised targets (MAE's norm_pix_loss)
    attn_impl: str = "auto"           # auto | flash | fa4 | torch_varlen | sdpa
    kernels: str = "auto"             # auto | triton | torch (semantic masking + masked loss)

    def __post_init__(self):
        # Types first: a config.json with "max_len": 2.5 or "depth": "2" failed later inside torch. numpy
        # scalars (a sweep table's) become Python ones: the config is saved as JSON.
        kinds = {"int": (numbers.Integral, int), "float": (numbers.Real, float), "str": (str, str),
                 "bool": ((bool, np.bool_), bool)}
        for f in fields(self):
            value = getattr(self, f.name)
            accepted, python_type = kinds[f.type]
            if not isinstance(value, accepted) or (isinstance(value, (bool, np.bool_)) and f.type != "bool"):
                raise ValueError(f"config: {f.name}={value!r} is not a{'n' if f.type == 'int' else ''} {f.type}")
            setattr(self, f.name, python_type(value))
        for name, value, choices in (("masking", self.masking, MASKING_STRATEGIES), ("loss", self.loss, LOSSES),
                                     ("attn_impl", self.attn_impl, ATTN_IMPLS),
                                     ("kernels", self.kernels, ("auto", "triton", "torch"))):
            if value not in choices:
                raise ValueError(f"config: {name}={value!r} is not one of {choices}")
        for name in ("in_dim", "embed_dim", "decoder_embed_dim", "depth", "decoder_depth", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name}={getattr(self, name)} must be >= 1")
        if self.max_len > MAX_LEN_LIMIT:  # its position tables alone would not fit: refused before allocating them
            raise ValueError(f"config: max_len={self.max_len} is beyond {MAX_LEN_LIMIT} segments (about "
                             f"{MAX_LEN_LIMIT * 5 / 86400:.0f} days of 5-second windows)")
        for width, heads, what in ((self.embed_dim, self.num_heads, "embed_dim/num_heads"),
                                   (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim/decoder_num_heads")):
            if heads < 1 or width % heads:
                raise ValueError(f"config: {what} = {width}/{heads} must divide evenly")
        if self.embed_dim % 2 or self.decoder_embed_dim % 2:
            raise ValueError("config: sin-cos positions need even embed_dim and decoder_embed_dim")
        if not (math.isfinite(self.mlp_ratio) and int(self.embed_dim * self.mlp_ratio) >= 1
                and int(self.decoder_embed_dim * self.mlp_ratio) >= 1):
            raise ValueError(f"config: mlp_ratio={self.mlp_ratio} must be finite and give MLP widths >= 1")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"config: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.norm_targets and self.in_dim < 2:  # each target is standardised over its dims
            raise ValueError(f"config: norm_targets needs in_dim >= 2 (the variance of {self.in_dim} value "
                             "is undefined: every loss would be NaN)")

    @classmethod
    def from_preset(cls, name: str, in_dim: int, **overrides) -> "LVMAEConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(in_dim=in_dim, **{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "LVMAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dims(self) -> tuple[int, int]:
        """(encoder, decoder) attention head dims: what the flash kernels' limit is checked against."""
        return self.embed_dim // self.num_heads, self.decoder_embed_dim // self.decoder_num_heads


def sincos_table(dim: int, num_positions: int, chunk_rows: int = 1 << 13) -> torch.Tensor:
    """[num_positions + 1, dim]: row 0 zeros (CLS), row p+1 = [sin(p w), cos(p w)], w_i = 10000^(-i/(dim/2)).
    Computed in float64 then rounded to fp32, exactly as MAE's numpy get_1d_sincos_pos_embed, `chunk_rows`
    positions at a time: the float64 temporaries stay a few MB whatever max_len is (whole-table float64
    temporaries peaked at ~6x the fp32 table: 1.5 GB for 65536 x 1024)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / (dim / 2.0))
    table = torch.zeros(num_positions + 1, dim, dtype=torch.float32)
    for start in range(0, num_positions, chunk_rows):
        stop = min(start + chunk_rows, num_positions)
        angles = torch.arange(start, stop, dtype=torch.float64)[:, None] * omega[None, :]
        table[start + 1: stop + 1, :half] = angles.sin()   # float64 -> fp32: round to nearest, as .float()
        table[start + 1: stop + 1, half:] = angles.cos()
    return table


class VarlenMeta:
    """One stream's varlen metadata: cu_seqlens, max_seqlen, the concrete attention backend (resolved
    once per step, outside any compiled region) and, for sdpa, the padded layout built once per step."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, attn_impl: str,
                 device: torch.device, dtype: torch.dtype, head_dim: int | None = None):
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen
        self.impl = resolve_impl(attn_impl, device, dtype, head_dim)
        self.layout = _padded_layout(cu_seqlens, total, max_seqlen) if self.impl == "sdpa" else None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype the attention inputs will have: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_finite_rows(x_Td: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """ValueError naming the first sequence (and row) holding NaN/Inf. Reads the result on the host:
    a device sync when x is on CUDA, so only forward(check_finite=True) calls it."""
    bad = ~torch.isfinite(x_Td).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        seq = int((cu_seqlens[1:].long() <= row).sum())
        raise ValueError(f"sequence {seq}: contains NaN or Inf values (packed row {row})")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_TD: torch.Tensor, meta: VarlenMeta) -> torch.Tensor:
        T, D = x_TD.shape
        q_THD, k_THD, v_THD = self.qkv(x_TD).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o_THD = varlen_attention(q_THD, k_THD, v_THD, meta.cu_seqlens, meta.max_seqlen, meta.impl,
                                 layout=meta.layout, resolved=True)
        return self.proj(o_THD.reshape(T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x_TD, meta: VarlenMeta):
        x_TD = x_TD + self.attn(self.norm1(x_TD), meta)
        return x_TD + self.mlp(self.norm2(x_TD))


class LVMAE(nn.Module):
    def __init__(self, config: LVMAEConfig):
        super().__init__()
        self.config = c = config
        D, Dd = c.embed_dim, c.decoder_embed_dim
        # Input projection only when the encoder is wider/narrower than the embeddings (reference: none).
        self.input_proj = nn.Linear(c.in_dim, D) if c.in_dim != D else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList(Block(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, c.in_dim)
        # Fixed positions are derived, not learned: not saved in checkpoints (persistent=False).
        self.register_buffer("pos_embed", sincos_table(D, c.max_len), persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_table(Dd, c.max_len), persistent=False)
        self._init_weights()

    def _init_weights(self):
        # MAE init: xavier-uniform Linear, zero bias, LayerNorm 1/0, tokens ~ N(0, 0.02).
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- packed forward pieces -------------------------------------------------------------------
    def _check_batch(self, batch: PackedBatch):
        if batch.x.dim() != 2 or batch.x.shape[1] != self.config.in_dim:
            raise ValueError(f"batch rows have shape {tuple(batch.x.shape)}, model expects [T, {self.config.in_dim}]")
        if batch.max_seqlen > self.config.max_len:
            raise ValueError(f"batch holds a sequence of length {batch.max_seqlen} > max_len={self.config.max_len}"
                             f"{MAX_LEN_HINT}")

    def forward_encoder(self, batch: PackedBatch) -> torch.Tensor:
        """Encoder stream after the final norm: [Te, D] (CLS at enc_cls_slots, tokens at enc_token_slots)."""
        tokens = batch.x.index_select(0, batch.visible_rows)
        if self.input_proj is not None:  # fp16/bf16 rows meet fp32 weights outside autocast: cast first
            tokens = self.input_proj(tokens if torch.is_autocast_enabled() else tokens.to(self.input_proj.weight.dtype))
        # In the CLS token's dtype (the model's): rows of another dtype (bf16/fp16 projections under
        # autocast, fp64 or bf16 rows given by hand) would otherwise round the CLS token, or fail to add up.
        src = torch.cat([self.cls_token.view(1, -1), tokens.to(self.cls_token.dtype)], 0)
        h = src.index_select(0, batch.enc_src) + self.pos_embed.index_select(0, batch.enc_pos)
        meta = VarlenMeta(batch.enc_cu_seqlens, batch.enc_max_seqlen, h.shape[0], self.config.attn_impl,
                          h.device, _compute_dtype(h), self.config.head_dims[0])
        for block in self.blocks:
            h = block(h, meta)
        return self.norm(h)

    def forward_decoder(self, batch: PackedBatch, enc_out: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Decoder predictions [len(slots), d] for the given decoder-stream slots."""
        e = self.decoder_embed(enc_out)
        src = torch.cat([e.to(self.mask_token.dtype), self.mask_token.view(1, -1)], 0)  # as CLS above
        h = src.index_select(0, batch.dec_src) + self.decoder_pos_embed.index_select(0, batch.dec_pos)
        meta = VarlenMeta(batch.dec_cu_seqlens, batch.dec_max_seqlen, h.shape[0], self.config.attn_impl,
                          h.device, _compute_dtype(h), self.config.head_dims[1])
        for block in self.decoder_blocks:
            h = block(h, meta)
        # The norm and head are per-token: run them only on the rows asked for.
        return self.decoder_pred(self.decoder_norm(h.index_select(0, slots)))

    def forward(self, batch: PackedBatch, check_finite: bool = False) -> torch.Tensor:
        """Masked-reconstruction loss of a packed batch (scalar).

        check_finite=True raises ValueError naming the first sequence with a NaN/Inf row. It is opt-in on
        every device: on CUDA it is a host sync per step, and the trainer (CPU or CUDA alike) already
        turns a non-finite loss into a skipped update without one; by default NaN/Inf rows give a NaN loss."""
        self._check_batch(batch)
        if check_finite:
            _check_finite_rows(batch.x, batch.cu_seqlens)
        enc_out = self.forward_encoder(batch)
        pred_rows = self.forward_decoder(batch, enc_out, batch.dec_masked_slots)
        return masked_reconstruction_loss(pred_rows, batch.x, batch.masked_rows, loss=self.config.loss,
                                          norm_targets=self.config.norm_targets, kernels=self.config.kernels,
                                          row_weights=batch.row_weights)

    # ---- list-of-sequences API -------------------------------------------------------------------
    def _batch_from(self, seqs: Sequence[torch.Tensor], masked_T: torch.Tensor | None) -> PackedBatch:
        """Pack sequences the caller has already run through validate_sequences."""
        device = self.cls_token.device
        x_Td, cu, lengths = pack_sequences([s.to(device=device, dtype=self.cls_token.dtype) for s in seqs])
        # Any dtype reaching further than the model's (fp32 into fp16, and bf16 into fp16 too, though both
        # are 2 bytes) can overflow in the cast.
        if (any(s.is_floating_point() and torch.finfo(s.dtype).max > torch.finfo(x_Td.dtype).max for s in seqs)
                and not bool(torch.isfinite(x_Td).all())):
            raise ValueError(f"values beyond the range of the model's {x_Td.dtype} (they become Inf when cast)")
        if masked_T is None:
            masked_T = torch.zeros(x_Td.shape[0], dtype=torch.bool, device=device)
        return PackedBatch.from_mask(x_Td, cu, lengths, masked_T.to(device))

    @torch.no_grad()
    def encode(self, seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """No masking: (cls [B, D], tokens [sum L_i, D]) after the encoder's final LayerNorm, input order.
        `seqs` are used as given: a model trained by `lvmae pretrain` saw L2-normalised rows (the sampler
        normalises store rows), so normalise raw embeddings the same way (F.normalize(x, dim=-1)).
        Inference only (no gradients): to fine-tune, call forward_encoder on a PackedBatch."""
        validate_sequences(seqs, self.config.in_dim, self.config.max_len)
        batch = self._batch_from(seqs, None)
        enc_out = self.forward_encoder(batch)
        return enc_out.index_select(0, batch.enc_cls_slots), enc_out.index_select(0, batch.enc_token_slots)

    @torch.no_grad()
    def reconstruct(self, seqs: Sequence[torch.Tensor], visible: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder predictions (after decoder_pred) for every position given an explicit visible set.
        `seqs` as in encode: L2-normalised rows for a model trained by `lvmae pretrain`. A model trained
        with norm_targets predicts each row standardised (zero mean, unit variance over its dims), not
        the row itself: compare with targets standardised the same way."""
        # Sequences first, so that an empty batch or an empty sequence is named as such.
        validate_sequences(seqs, self.config.in_dim, self.config.max_len)
        if isinstance(visible, torch.Tensor) and visible.dim() == 2:
            visible = list(visible)   # [B, L] for B sequences of one length: one row each
        if isinstance(visible, torch.Tensor):
            raise ValueError(f"expected a list of visible masks, one per sequence, got one tensor of shape "
                             f"{tuple(visible.shape)} (for one sequence pass [mask])")
        if not isinstance(visible, (list, tuple)):
            raise ValueError(f"expected a list of visible masks, got a {type(visible).__name__} (pass list(...))")
        if len(visible) != len(seqs):
            raise ValueError(f"got {len(seqs)} sequences but {len(visible)} visible masks")
        for i, (s, v) in enumerate(zip(seqs, visible)):
            if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.shape != (s.shape[0],):
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"visible[{i}] must be a bool tensor of shape ({s.shape[0]},), got {got}")
            if v.is_meta:
                raise ValueError(f"visible[{i}]: a meta tensor holds no data")
            if not bool(v.any()):
                raise ValueError(f"visible[{i}] has no visible token; the encoder needs at least one")
        masked_T = ~torch.cat([v.to(self.cls_token.device) for v in visible])
        batch = self._batch_from(seqs, masked_T)
        pred = self.forward_decoder(batch, self.forward_encoder(batch), batch.dec_token_slots)
        return list(pred.split(batch.lengths, 0))

    # ---- training helpers ------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases and norms (1-D parameters); everything else, the cls and mask
        tokens included, decays. This is the reference's rule (timm's add_weight_decay in MAE's
        main_pretrain.py: ndim <= 1 or a '.bias' name, no skip list)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def save_pretrained(self, directory) -> None:
        from .checkpoint import save_model_dir
        save_model_dir(self, directory)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", **overrides) -> "LVMAE":
        from .checkpoint import load_model_dir
        return load_model_dir(directory, map_location=map_location, **overrides)

    def compile_blocks(self, **compile_kwargs) -> "LVMAE":
        """torch.compile each transformer block (torchtitan-style): fuses norms/GELU/residuals and cuts
        the per-op launch cost that bounds small-batch steps. dynamic=True: packed sizes vary per batch,
        one graph serves all of them."""
        for block in list(self.blocks) + list(self.decoder_blocks):
            block.compile(**{"dynamic": True, **compile_kwargs})
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def matmul_flops(config: LVMAEConfig, enc_tokens: int, dec_tokens: int, seq_sq_enc: int,
                           seq_sq_dec: int, pred_tokens: int, num_videos: int = 0) -> int:
    """Forward matmul FLOPs for a batch, counting real tokens only (no padding): 2*m*n*k per matmul.
    seq_sq_* = sum over sequences of L^2 for the attention score and value products. enc_tokens
    includes one CLS token per video; the input projection runs on the enc_tokens - num_videos
    visible tokens only."""
    c = config

    def stack(tokens, sq, width, depth, mlp_ratio):
        per_block = 2 * tokens * width * (3 * width + width + 2 * int(width * mlp_ratio)) + 2 * 2 * sq * width
        return depth * per_block

    flops = stack(enc_tokens, seq_sq_enc, c.embed_dim, c.depth, c.mlp_ratio)
    flops += stack(dec_tokens, seq_sq_dec, c.decoder_embed_dim, c.decoder_depth, c.mlp_ratio)
    flops += 2 * enc_tokens * c.embed_dim * c.decoder_embed_dim          # decoder_embed
    flops += 2 * pred_tokens * c.decoder_embed_dim * c.in_dim           # decoder_pred
    if c.in_dim != c.embed_dim:
        flops += 2 * (enc_tokens - num_videos) * c.in_dim * c.embed_dim
    return flops
