"""The packed batch: the one data type that flows from the sampler to the loss.

Shape legend (torchtitan style): T = total tokens of all videos, B = videos, d = input embedding dim,
Tv / Tm = visible / masked tokens, Te = encoder stream (B CLS + Tv), Td = decoder stream (B CLS + T).

A batch holds ragged videos concatenated row-wise (no padding). `cu_seqlens` are int32 offsets
[B+1] as flash-attn expects; `max_seqlen` is a Python int so no kernel launch needs a host sync.
The index tensors move rows between the input, the encoder stream (CLS + visible tokens per video)
and the decoder stream (CLS + every token per video). They are built with vectorised index ops only,
so the same code runs on CPU (DataLoader workers) and on CUDA (after a GPU masking kernel).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch


def keep_counts(lengths: Sequence[int], mask_ratio: float) -> list[int]:
    """Visible tokens per video: max(1, int(L * (1 - ratio))) — at least one token always enters the encoder.
    An empty video (L = 0) keeps 0: it has no token to keep (check_lengths rejects it before packing)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    # In Python floats (double), as the kernels count it: a float32 0.3 gave 10 x 0.7f = 7.0, not 6.
    ratio = float(mask_ratio)
    return [max(1, int(n * (1.0 - ratio))) if n > 0 else 0 for n in lengths]


def check_lengths(lengths: Sequence[int], total: int | None = None) -> list[int]:
    """Host ints -> list[int]; ValueError for an empty batch, a zero-length (or negative) sequence, or
    lengths that do not add up to `total` rows. Free: lengths are Python ints, no device read."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("empty batch: expected at least one sequence (lengths is empty)")
    for i, n in enumerate(lengths):
        if n <= 0:
            what = "zero-length sequence (L=0)" if n == 0 else f"negative length L={n}"
            raise ValueError(f"sequence {i}: {what}; drop empty videos before packing")
    if total is not None and sum(lengths) != total:
        raise ValueError(f"lengths add up to {sum(lengths)} rows but x has {total}")
    return lengths


def cu_seqlens_from_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return cu.to(device) if device is not None else cu


# How to accept longer sequences (positions are derived, not stored: any checkpoint loads with any max_len).
MAX_LEN_HINT = ("; raise the model's max_len: LVMAEConfig(max_len=N), LVMAE.from_pretrained(DIR, max_len=N), "
                "or `--set model.max_len=N` in lvmae pretrain")


def validate_sequences(seqs, in_dim: int | None = None, max_len: int | None = None) -> None:
    """Raise ValueError naming the problem for anything the packed model would get silently wrong."""
    if isinstance(seqs, torch.Tensor):
        raise ValueError(f"expected a list of [L_i, d] tensors, got one tensor of shape {tuple(seqs.shape)} "
                         "(pass list(x) for a [B, L, d] batch of equal lengths)")
    if not isinstance(seqs, (list, tuple)):
        raise ValueError(f"expected a list of [L_i, d] tensors, got a {type(seqs).__name__} (pass list(...))")
    if len(seqs) == 0:
        raise ValueError("empty batch: expected a non-empty list of [L_i, d] tensors")
    for i, s in enumerate(seqs):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"sequence {i}: expected a torch.Tensor, got {type(s).__name__}")
        if s.dim() != 2:
            raise ValueError(f"sequence {i}: expected shape [L, d], got {tuple(s.shape)}")
        if s.shape[0] == 0:
            raise ValueError(f"sequence {i}: zero-length sequence (L=0); drop empty videos before packing")
        if in_dim is not None and s.shape[1] != in_dim:
            raise ValueError(f"sequence {i}: embedding dim {s.shape[1]} does not match the model's input dim {in_dim}")
        if max_len is not None and s.shape[0] > max_len:
            raise ValueError(f"sequence {i}: length {s.shape[0]} exceeds the configured maximum max_len={max_len}"
                             f"{MAX_LEN_HINT}")
        if not torch.is_floating_point(s):
            raise ValueError(f"sequence {i}: expected a floating-point tensor, got {s.dtype}")
        if s.is_meta:
            raise ValueError(f"sequence {i}: a meta tensor holds no data to embed")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"sequence {i}: contains NaN or Inf values")


def pack_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Concatenate [L_i, d] tensors into x_Td with int32 cu_seqlens; returns (x_Td, cu_seqlens, lengths)."""
    lengths = [int(s.shape[0]) for s in seqs]
    x_Td = torch.cat(list(seqs), dim=0)
    return x_Td, cu_seqlens_from_lengths(lengths, x_Td.device), lengths


def video_of_rows(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [T]: which video each packed row belongs to (output_size given, so no host sync on CUDA)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


@dataclass
class PackedBatch:
    """Rows of B ragged videos plus everything the encoder/decoder/loss need to move them around.

    x: [T, d] input embeddings (already L2-normalised by the sampler; they are also the targets).
    masked: bool [T], True = hidden from the encoder and reconstructed by the decoder.
    positions: int64 [T], position of each row inside its video (0-based; pos-table row = position + 1).
    visible_rows / masked_rows: int64 [Tv] / [Tm] row ids, ascending.
    enc_token_slots: int64 [Tv], where each visible row sits in the encoder stream; enc_cls_slots [B].
    dec_token_slots: int64 [T], where each row sits in the decoder stream; dec_cls_slots [B].
    Gather indices (built here, in the DataLoader worker, so the model step is pure gathers):
    enc_src [Te]: row of cat([cls, visible tokens]) that fills each encoder slot (0 = CLS);
    enc_pos / dec_pos [Te] / [Td]: positional-table row of each slot (0 = CLS row);
    dec_src [Td]: row of cat([encoder stream, mask token]) that fills each decoder slot (Te = mask token);
    dec_masked_slots [Tm]: decoder slots of the masked rows (the only rows the loss decodes).
    Shape-bucketed batches (buckets.pad_to_bucket) end with `padding_videos` dummy videos and carry
    row_weights [Tm]: the loss is sum(w * per-row loss) instead of the plain mean (None = plain mean).
    """

    x: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: list[int]
    masked: torch.Tensor
    positions: torch.Tensor
    visible_rows: torch.Tensor
    masked_rows: torch.Tensor
    enc_cu_seqlens: torch.Tensor
    enc_max_seqlen: int
    enc_token_slots: torch.Tensor
    enc_cls_slots: torch.Tensor
    dec_cu_seqlens: torch.Tensor
    dec_max_seqlen: int
    dec_token_slots: torch.Tensor
    dec_cls_slots: torch.Tensor
    enc_src: torch.Tensor
    enc_pos: torch.Tensor
    dec_src: torch.Tensor
    dec_pos: torch.Tensor
    dec_masked_slots: torch.Tensor
    row_weights: torch.Tensor | None = None
    padding_videos: int = 0

    @property
    def num_videos(self) -> int:
        """Real videos (dummy padding videos excluded)."""
        return len(self.lengths) - self.padding_videos

    @property
    def num_tokens(self) -> int:
        """Real token rows (dummy padding rows excluded)."""
        if self.padding_videos:
            return sum(self.lengths[: self.num_videos])
        return int(self.x.shape[0])

    @classmethod
    def from_mask(cls, x_Td: torch.Tensor, cu_seqlens: torch.Tensor, lengths: Sequence[int],
                  masked_T: torch.Tensor, keep: Sequence[int] | None = None) -> "PackedBatch":
        """Build every index tensor from a row mask. `keep` (visible count per video, host ints) lets
        CUDA callers skip the one host sync needed to size the visible/masked index tensors.

        Validation costs no host sync: `lengths` and `keep` are host ints, checked always (empty batch,
        zero-length sequence, sum(lengths) == T, 1 <= keep_i <= L_i); cu_seqlens and the per-video
        visible counts of the mask are compared with them only when those tensors are on the CPU (a
        DataLoader worker builds every training batch on CPU, where the read is free)."""
        T = int(x_Td.shape[0])
        lengths = check_lengths(lengths, T)
        device = x_Td.device
        B = len(lengths)
        if masked_T.shape != (T,) or masked_T.dtype != torch.bool:
            raise ValueError(f"masked must be a bool tensor of shape ({T},), got {masked_T.dtype} {tuple(masked_T.shape)}")
        if cu_seqlens.shape != (B + 1,):
            raise ValueError(f"cu_seqlens must hold B+1={B + 1} offsets for {B} lengths, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device.type == "cpu" and not torch.equal(cu_seqlens.long(), cu_seqlens_from_lengths(lengths).long()):
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} do not match lengths {lengths}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        video_T = video_of_rows(cu, T)
        positions_T = torch.arange(T, device=device) - cu.long()[video_T]
        counted = None  # visible rows per video as the mask has them (one host read: free on CPU only)
        if keep is None or (device.type == "cpu" and masked_T.device.type == "cpu"):
            counted = torch.bincount(video_T[~masked_T], minlength=B).tolist()
        if keep is None:
            keep = counted
        keep = [int(k) for k in keep]
        if len(keep) != B:
            raise ValueError(f"keep has {len(keep)} entries for {B} sequences")
        for i, (k, n) in enumerate(zip(keep, lengths)):
            if k < 1:
                raise ValueError(f"sequence {i}: every video needs at least one visible token; a mask hid a whole video")
            if k > n:
                raise ValueError(f"sequence {i}: keep={k} visible tokens but the sequence has only L={n}")
        if counted is not None and counted != keep:
            i = next(i for i, (a, b) in enumerate(zip(counted, keep)) if a != b)
            raise ValueError(f"sequence {i}: keep={keep[i]} disagrees with the mask, which leaves {counted[i]} "
                             f"visible token(s) (keep must be the mask's visible count per sequence)")
        num_visible = sum(keep)
        # Stable argsort of the mask puts visible rows first, then masked rows, each in ascending order.
        order = torch.argsort(masked_T.to(torch.int8), stable=True)
        visible_rows, masked_rows = order[:num_visible], order[num_visible:]
        enc_lengths = [k + 1 for k in keep]
        dec_lengths = [n + 1 for n in lengths]
        enc_cu = cu_seqlens_from_lengths(enc_lengths, device)
        dec_cu = cu_seqlens_from_lengths(dec_lengths, device)
        vis_video = video_T[visible_rows]
        # k-th visible row of video b sits after b CLS tokens and k earlier visible rows, plus its own CLS.
        enc_token_slots = torch.arange(num_visible, device=device) + vis_video + 1
        dec_token_slots = torch.arange(T, device=device) + video_T + 1
        enc_cls_slots, dec_cls_slots = enc_cu[:-1].long(), dec_cu[:-1].long()
        Te, Td = num_visible + B, T + B
        enc_src = torch.zeros(Te, dtype=torch.long, device=device)
        enc_src[enc_token_slots] = torch.arange(1, num_visible + 1, device=device)
        enc_pos = torch.zeros(Te, dtype=torch.long, device=device)
        enc_pos[enc_token_slots] = positions_T[visible_rows] + 1
        dec_src = torch.full((Td,), Te, dtype=torch.long, device=device)
        dec_src[dec_cls_slots] = enc_cls_slots
        dec_src[dec_token_slots[visible_rows]] = enc_token_slots
        dec_pos = torch.zeros(Td, dtype=torch.long, device=device)
        dec_pos[dec_token_slots] = positions_T + 1
        return cls(
            x=x_Td, cu_seqlens=cu, max_seqlen=max(lengths), lengths=lengths, masked=masked_T,
            positions=positions_T, visible_rows=visible_rows, masked_rows=masked_rows,
            enc_cu_seqlens=enc_cu, enc_max_seqlen=max(enc_lengths), enc_token_slots=enc_token_slots,
            enc_cls_slots=enc_cls_slots, dec_cu_seqlens=dec_cu, dec_max_seqlen=max(dec_lengths),
            dec_token_slots=dec_token_slots, dec_cls_slots=dec_cls_slots, enc_src=enc_src, enc_pos=enc_pos,
            dec_src=dec_src, dec_pos=dec_pos, dec_masked_slots=dec_token_slots[masked_rows],
        )

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """name -> tensor for every tensor field (row_weights only when set), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device, non_blocking: bool = False, copy: bool = False) -> "PackedBatch":
        """copy=True: fresh buffers even when already on `device` (as Tensor.to)."""
        return self._map_storages(lambda base: base.to(device, non_blocking=non_blocking, copy=copy))

    def pin_memory(self) -> "PackedBatch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return self._map_storages(lambda base: base.pin_memory())

    def _map_storages(self, move) -> "PackedBatch":
        """Apply `move` once per underlying buffer, not once per field. The sampler packs the ~20 index
        tensors into one buffer per dtype (views); pinning and host-to-device copies then cost one call
        per buffer, which matters because a small-batch step is bound by per-call host overhead."""
        tensors = self.tensor_fields()
        groups: dict[tuple, list[str]] = {}
        for name, t in tensors.items():
            groups.setdefault((t.untyped_storage().data_ptr(), t.dtype, t.device), []).append(name)
        moved = {}
        for names in groups.values():
            first = tensors[names[0]]
            storage = first.untyped_storage()
            numel = storage.nbytes() // first.element_size()
            used = sum(tensors[n].numel() for n in names)
            if len(names) == 1 or numel > 2 * used:  # a lone tensor, or a view into a much larger buffer
                for n in names:
                    moved[n] = move(tensors[n])
                continue
            base = move(first.new_empty(0).set_(storage, 0, (numel,)))
            for n in names:
                t = tensors[n]
                moved[n] = base.as_strided(t.shape, t.stride(), t.storage_offset())
        return replace(self, **moved)
