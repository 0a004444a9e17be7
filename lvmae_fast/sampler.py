"""Long-video sampler: random-duration crops from the store, packed and masked into PackedBatch.

Recipe (paper + amazon-science/lv-mae data/CombinedData.py): for every video, every epoch, draw a
duration ~ U[duration_min, duration_max] seconds (continuous here; the reference draws whole seconds),
take L = duration // segment_seconds segments (at least 1, at most the video and max_len) from a
random start, L2-normalise each embedding. Short videos, `short_video_policy`:
- "reference" (the default; what the reference trains on): videos with n_segments * (1 - mask_ratio) < 1
  are left out (the reference replaces them by another video before cropping: 1-segment videos at any
  ratio, 2-3-segment ones at 0.7), and a crop of a video with < 5 segments is tiled x3 (< 2 segments:
  x8, reachable only at mask_ratio 0), then cut to max_len;
- "repeat": that tiling for every video, 1-segment ones included (x8: copies of one vector);
- "keep": every video as it is (a 1-segment crop masks nothing);
- "drop": videos with < 2 segments left out, no tiling.

Determinism: everything is a pure function of (seed, epoch, rank, batch index), never of worker
count or timing. The plan for an epoch (order, crops, batch boundaries) is a pure function of
(seed, epoch, rank), computed where it is needed (the main process for `loader`, each worker for
`stream`); each batch is then built (read, normalise, pack, mask) in a DataLoader worker with a mask
generator seeded from (seed, epoch, rank, batch index). Training iterates `stream`: one DataLoader
for the whole run, so epoch boundaries neither restart workers nor drain the prefetch queue. Resuming at batch i of epoch
e therefore reproduces exactly the batches an uninterrupted run would have seen.
Ranks: with a fixed video count the epoch's video order is split round-robin (padded by wrapping,
like DistributedSampler). With a token budget all crops are packed first and the batches dealt
round-robin, split until their count divides by the world size: every video is seen once per epoch
(fewer than `world` batches repeat only when no batch can be split) and every rank steps the same number of times.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .buckets import pad_to_bucket, seqlen_floors
from .masking import MASKING_STRATEGIES, build_masked_batch
from .packing import PackedBatch, cu_seqlens_from_lengths

SHORT_VIDEO_POLICIES = ("reference", "repeat", "keep", "drop")
VAL_EPOCH = -1  # the validation plan is "epoch -1": fixed crops, fixed masks, every evaluation alike


@dataclass
class SamplerConfig:
    duration_min: float = 10.0        # seconds
    duration_max: float = 1280.0      # seconds (reference default; 1280 s / 5 s = 256 segments)
    max_len: int = 256                # segments per crop (paper: 256 tokens)
    short_video_policy: str = "reference"
    batch_videos: int = 16            # videos per batch when max_tokens is 0
    max_tokens: int = 0               # >0: fill each batch up to this many segments instead
    mask_ratio: float = 0.5
    masking: str = "semantic"
    seed: int = 0
    pad_to_buckets: bool = False      # pad each batch to a bucketed shape (buckets.py; for CUDA graphs)
    # The longest crop (rows) this store's videos can give, the buckets' attention-length floor; 0: max_len.
    # LongVideoSampler sets it: with durations capping crops far below max_len (max_len raised for long
    # videos), a floor of max_len made every bucketed batch attend over max_len rows (sdpa's padded block
    # on CUDA: 2000x the work at max_len 16000 for crops of 251).
    crop_cap: int = 0

    def __post_init__(self):
        if not 0 < self.duration_min <= self.duration_max < math.inf:
            raise ValueError(f"need 0 < duration_min <= duration_max < inf, got duration_min={self.duration_min} "
                             f"duration_max={self.duration_max}")
        if not 0.0 <= self.mask_ratio < 1.0:  # else it fails only when a worker builds the first batch
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.short_video_policy not in SHORT_VIDEO_POLICIES:
            raise ValueError(f"short_video_policy={self.short_video_policy!r} is not one of {SHORT_VIDEO_POLICIES}")
        if self.masking not in MASKING_STRATEGIES:
            raise ValueError(f"masking={self.masking!r} is not one of {MASKING_STRATEGIES}")
        if self.max_len < 1 or self.batch_videos < 1 or self.max_tokens < 0:
            raise ValueError("max_len and batch_videos must be >= 1 and max_tokens >= 0")
        if self.max_tokens and self.max_tokens < self.max_len:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= max_len={self.max_len} so every crop fits a batch")


def repeats_for(num_segments: np.ndarray, policy: str) -> np.ndarray:
    """Reference tiling of short videos: x8 below 2 segments, x3 below 5, else x1 (policies 'reference'
    and 'repeat')."""
    if policy not in ("reference", "repeat"):
        return np.ones_like(num_segments)
    return np.where(num_segments < 2, 8, np.where(num_segments < 5, 3, 1))


def kept_by_policy(num_segments: np.ndarray, policy: str, mask_ratio: float) -> np.ndarray:
    """bool per video: whether the short-video policy samples it ("reference": n * (1 - mask_ratio) >= 1,
    as the reference's loader; "drop": at least 2 segments)."""
    n = np.asarray(num_segments)
    if policy == "reference":
        return n * (1.0 - mask_ratio) >= 1.0
    return n >= 2 if policy == "drop" else np.ones(len(n), dtype=bool)


def max_crop_segments(duration_min: float, duration_max: float, segment_seconds: float) -> int:
    """The most segments a crop can span before the video's length and max_len cap it: plan_crops
    takes floor(d / segment_seconds) (at least 1) of a duration d drawn from [duration_min,
    duration_max) (d = duration_min when the two are equal)."""
    if duration_min >= duration_max:
        return max(1, math.floor(duration_min / segment_seconds))
    # The largest k with k * segment_seconds < duration_max (d never reaches duration_max itself).
    return max(1, math.ceil(duration_max / segment_seconds) - 1, math.floor(duration_min / segment_seconds))


@dataclass
class Crop:
    """Rows [start, start + length) of one video, tiled `repeats` times and cut to `out_len` rows."""
    video: int
    start: int
    length: int
    repeats: int
    out_len: int


def _seed_words(seed: int) -> list[int]:
    """The run's seed as SeedSequence words: all 64 bits (torch's range), the high word only where it is
    set, so seeds in [0, 2^32) key the same plans as when only the low word was used (runs resume)."""
    seed %= 1 << 64
    return [seed & 0xFFFFFFFF] + ([seed >> 32] if seed >> 32 else [])


def _rng(seed: int, *key: int) -> np.random.Generator:
    low, *high = _seed_words(seed)
    return np.random.default_rng(np.random.SeedSequence([low, *(k % (1 << 32) for k in key), *high]))


def _crop_columns(num_segments: np.ndarray, segment_seconds: np.ndarray, cfg: SamplerConfig,
                  epoch: int) -> tuple[np.ndarray, ...]:
    """(video, start, length, repeats, out_len) of every crop of the epoch, in its shuffled order."""
    rng = _rng(cfg.seed, epoch, 0xC0)
    n = np.asarray(num_segments, dtype=np.int64)
    order = np.arange(len(n)) if epoch == VAL_EPOCH else rng.permutation(len(n))
    duration = rng.uniform(cfg.duration_min, cfg.duration_max, size=len(n))
    u = rng.random(len(n))
    length = np.clip(np.floor(duration / np.asarray(segment_seconds, dtype=np.float64)).astype(np.int64), 1, None)
    length = np.minimum(np.minimum(length, n), cfg.max_len)
    start = np.minimum(np.floor(u * (n - length + 1)).astype(np.int64), n - length)
    repeats = repeats_for(n, cfg.short_video_policy)
    out_len = np.minimum(length * repeats, cfg.max_len)
    return order, start[order], length[order], repeats[order], out_len[order]


def plan_crops(num_segments: np.ndarray, segment_seconds: np.ndarray, cfg: SamplerConfig, epoch: int) -> list[Crop]:
    """One crop per video, in this epoch's shuffled order (the validation epoch keeps store order)."""
    # Gathered in order as numpy, then plain ints: indexing numpy arrays one element at a time was 85% of
    # planning an epoch (1 s at 200k videos).
    columns = [a.tolist() for a in _crop_columns(num_segments, segment_seconds, cfg, epoch)]
    return [Crop(*fields) for fields in zip(*columns)]


def count_token_batches(out_len: np.ndarray, max_tokens: int) -> int:
    """How many batches split_batches' greedy fill makes of crops of these lengths (in order), one
    binary search per batch instead of a Python step per crop."""
    ends = np.cumsum(np.asarray(out_len, dtype=np.int64))
    count, used = 0, 0
    while used < len(ends):
        base = ends[used - 1] if used else 0
        # The batch takes every crop whose running total stays within the budget, and always one.
        used = max(used + 1, int(np.searchsorted(ends, base + max_tokens, side="right")))
        count += 1
    return count


def split_batches(crops: list[Crop], cfg: SamplerConfig) -> list[list[Crop]]:
    if not cfg.max_tokens:
        return [crops[i: i + cfg.batch_videos] for i in range(0, len(crops), cfg.batch_videos)]
    batches, current, tokens = [], [], 0
    for c in crops:  # greedy in order: the next crop starts a new batch when it would overflow the budget
        if current and tokens + c.out_len > cfg.max_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(c)
        tokens += c.out_len
    if current:
        batches.append(current)
    return batches


def plan_epoch(num_segments, segment_seconds, cfg: SamplerConfig, epoch: int, rank: int = 0,
               world: int = 1) -> list[list[Crop]]:
    """This rank's batches for one epoch (pure function of its arguments)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    crops = plan_crops(num_segments, segment_seconds, cfg, epoch)
    if not crops:
        return []
    if cfg.max_tokens:
        return _deal_token_batches(split_batches(crops, cfg), world)[rank::world]
    # fixed video count: DistributedSampler's convention, wrap around so every rank gets the same count
    per_rank = math.ceil(len(crops) / world)
    padded = (crops * math.ceil(per_rank * world / len(crops)))[: per_rank * world]
    return split_batches(padded[rank::world], cfg)


def _deal_token_batches(batches: list[list[Crop]], world: int) -> list[list[Crop]]:
    """Make the number of token-budget batches a multiple of `world` so batch k*world + r goes to rank r.

    Packing all crops first and then dealing batches keeps every video exactly once per epoch: the
    batches are split in two (the fullest with >= 2 crops first) until the count divides. Only when no
    batch has two crops left to split (fewer crops than ranks, or every crop filling a batch alone) are
    whole batches repeated from the start, fewer than `world` per epoch."""
    batches = [list(b) for b in batches]
    while len(batches) % world:
        splittable = [i for i, b in enumerate(batches) if len(b) >= 2]
        if not splittable:
            need = world - len(batches) % world
            return batches + [batches[i % len(batches)] for i in range(need)]
        i = max(splittable, key=lambda j: (sum(c.out_len for c in batches[j]), -j))
        half, tokens, total = 0, 0, sum(c.out_len for c in batches[i])
        while half < len(batches[i]) - 1 and 2 * (tokens + batches[i][half].out_len) <= total:
            tokens += batches[i][half].out_len
            half += 1
        half = max(half, 1)
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def mask_seed(seed: int, epoch: int, rank: int, batch_index: int) -> int:
    low, *high = _seed_words(seed)
    return int(np.random.SeedSequence([low, epoch % (1 << 32), rank, batch_index, 0x3A5, *high]).generate_state(1)[0])


class CropBatches(Dataset):
    """Map-style dataset whose item i is the finished PackedBatch i of one epoch's plan."""

    def __init__(self, store, video_ids: list[str], batches: list[list[Crop]], cfg: SamplerConfig, epoch: int, rank: int):
        self.store, self.video_ids, self.batches = store, video_ids, batches
        self.cfg, self.epoch, self.rank = cfg, epoch, rank

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return build_batch(self.store, self.video_ids, self.batches[i], self.cfg, self.epoch, self.rank, i)


def crop_rows(store, video_id: str, crop: Crop) -> np.ndarray:
    rows = np.asarray(store.get(video_id)[crop.start: crop.start + crop.length], dtype=np.float32)
    return np.tile(rows, (crop.repeats, 1))[: crop.out_len] if crop.repeats > 1 else rows


def build_batch(store, video_ids: list[str], crops: list[Crop], cfg: SamplerConfig, epoch: int, rank: int,
                index: int) -> PackedBatch:
    """Batch `index` of an epoch's plan: read, L2-normalise, pack, mask (and pad to a shape bucket)."""
    x_Td = torch.from_numpy(np.concatenate([crop_rows(store, video_ids[c.video], c) for c in crops]))
    x_Td = F.normalize(x_Td, p=2.0, dim=-1)  # targets are the L2-normalised embeddings
    lengths = [c.out_len for c in crops]
    generator = torch.Generator().manual_seed(mask_seed(cfg.seed, epoch, rank, index))
    batch = build_masked_batch(x_Td, cu_seqlens_from_lengths(lengths), lengths, cfg.masking,
                               cfg.mask_ratio, generator=generator, kernels="torch")
    if cfg.pad_to_buckets:
        batch = pad_to_bucket(batch, **seqlen_floors(cfg.crop_cap or cfg.max_len, cfg.mask_ratio))
    return share_storages(batch)


class EpochStream(Dataset):
    """Map-style dataset keyed by (epoch, batch index), item (epoch, index, PackedBatch), over any
    number of epochs. One DataLoader over it serves a whole run: its workers (which plan each epoch
    themselves, deterministically) live across epoch boundaries, so an epoch's end neither restarts
    them nor drains the prefetch queue while the GPU waits."""

    def __init__(self, sampler: "LongVideoSampler"):
        self.sampler = sampler

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        s = self.sampler
        return epoch, i, build_batch(s.store, s.video_ids, s.batches(epoch)[i], s.cfg, epoch, s.rank, i)


class StreamKeys(Sampler):
    """(epoch, batch index) from (start_epoch, start_batch) up to, not including, end_epoch."""

    def __init__(self, sampler: "LongVideoSampler", start_epoch: int, start_batch: int, end_epoch: int):
        self.sampler, self.start_epoch, self.start_batch, self.end_epoch = sampler, start_epoch, start_batch, end_epoch

    def __iter__(self):
        for epoch in range(self.start_epoch, self.end_epoch):
            first = self.start_batch if epoch == self.start_epoch else 0
            for i in range(first, self.sampler.num_batches(epoch)):
                yield epoch, i

    def __len__(self) -> int:
        total = sum(self.sampler.num_batches(e) for e in range(self.start_epoch, self.end_epoch))
        return max(0, total - (self.start_batch if self.start_epoch < self.end_epoch else 0))


def share_storages(batch: PackedBatch) -> PackedBatch:
    """The same batch with its tensors as views into one buffer per dtype.

    A worker hands tensors to the main process one shared-memory segment per storage; a PackedBatch
    has ~20 small tensors, and that per-tensor cost, not the work, dominated small batches."""
    tensors = batch.tensor_fields()
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    views = {}
    for names in by_dtype.values():
        if len(names) == 1:
            continue
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        offset = 0
        for n in names:
            views[n] = flat[offset: offset + tensors[n].numel()].view(tensors[n].shape)
            offset += tensors[n].numel()
    return replace(batch, **views)


def _worker_init(_):
    # Workers only gather, normalise and mask: one thread each, leave the cores to the model.
    torch.set_num_threads(1)
    # A terminal's Ctrl-C (or a SIGTERM to the process group) is the main process's to handle: it
    # checkpoints and shuts the loader down. Workers would otherwise run an inherited handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _batch_loader(dataset: Dataset, keys, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    """Items are whole batches (built by the dataset), fetched in `keys` order by worker processes."""
    extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init} if num_workers > 0 else {}
    # Its own generator: iter() draws the workers' base seed from it, not from the global torch RNG, which
    # a resumed run restores bit for bit and an uninterrupted one never draws from there.
    return DataLoader(dataset, batch_size=None, sampler=keys, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), **extra)


class LongVideoSampler:
    """Plans epochs over a subset of a store's videos and serves them as PackedBatch DataLoaders."""

    def __init__(self, store, video_ids: list[str], cfg: SamplerConfig, rank: int = 0, world: int = 1):
        self.store, self.cfg, self.rank, self.world = store, cfg, rank, world
        n = np.array([store.num_segments(v) for v in video_ids], dtype=np.int64)
        keep = kept_by_policy(n, cfg.short_video_policy, cfg.mask_ratio)
        self.video_ids = [v for v, k in zip(video_ids, keep) if k]
        self.num_segments = n[keep]
        self.segment_seconds = np.array([store.meta(v)["segment_seconds"] for v in self.video_ids], dtype=np.float64)
        if not self.video_ids:
            raise ValueError("no videos to sample from (empty store or split, or every video dropped as too short)")
        if not cfg.crop_cap:  # plan_crops' longest out_len: the video's length, the durations' cap, tiling, max_len
            longest = {sec: max_crop_segments(cfg.duration_min, cfg.duration_max, sec)
                       for sec in np.unique(self.segment_seconds).tolist()}
            caps = np.minimum(self.num_segments, [longest[sec] for sec in self.segment_seconds.tolist()])
            caps = caps * repeats_for(self.num_segments, cfg.short_video_policy)
            self.cfg = replace(cfg, crop_cap=int(min(cfg.max_len, caps.max())))
        self._plans: dict[int, list[list[Crop]]] = {}
        self._counts: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[Crop]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.num_segments, self.segment_seconds, self.cfg, epoch, self.rank, self.world)}
        return self._plans[epoch]

    def num_batches(self, epoch: int) -> int:
        if not self.cfg.max_tokens:  # fixed-size batches: no need to plan
            return math.ceil(math.ceil(len(self.video_ids) / self.world) / self.cfg.batch_videos)
        # Counts are kept per epoch: the stream's key iterator runs ahead into the next epoch while
        # the loop still asks about the current one, and only one plan is cached. Counted without
        # planning: the trainer's start-up asks for every epoch's (planning all of them took 146 s at
        # 200k videos and 150 epochs). _deal_token_batches always ends at a multiple of the world size.
        if epoch not in self._counts:
            out_len = _crop_columns(self.num_segments, self.segment_seconds, self.cfg, epoch)[-1]
            self._counts[epoch] = math.ceil(count_token_batches(out_len, self.cfg.max_tokens) / self.world)
        return self._counts[epoch]

    def dataset(self, epoch: int) -> CropBatches:
        return CropBatches(self.store, self.video_ids, self.batches(epoch), self.cfg, epoch, self.rank)

    def loader(self, epoch: int, start_batch: int = 0, num_workers: int = 2, pin_memory: bool = False,
               prefetch_factor: int = 4) -> DataLoader:
        """Batches start_batch.. of an epoch, built in worker processes and prefetched."""
        dataset = self.dataset(epoch)
        return _batch_loader(dataset, range(start_batch, len(dataset)), num_workers, pin_memory, prefetch_factor)

    def stream(self, start_epoch: int, start_batch: int, end_epoch: int, num_workers: int = 2,
               pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
        """(epoch, index, batch) for every batch from (start_epoch, start_batch) to the end of
        end_epoch - 1, through one DataLoader (see EpochStream): what the training loop iterates."""
        keys = StreamKeys(self, start_epoch, start_batch, end_epoch)
        return _batch_loader(EpochStream(self), keys, num_workers, pin_memory, prefetch_factor)

    def mean_videos_per_batch(self) -> float:
        """Videos per batch in epoch 0, over every rank's batches: the same value on each rank (the
        trainer scales its lr by it; ranks with different lrs would drift apart)."""
        if not self.cfg.max_tokens:
            return float(self.cfg.batch_videos)
        crops = plan_crops(self.num_segments, self.segment_seconds, self.cfg, 0)
        plan = _deal_token_batches(split_batches(crops, self.cfg), self.world)
        return sum(len(b) for b in plan) / max(1, len(plan))


def split_videos(video_ids: list[str], val_videos: int, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, held-out val ids): a fixed, seed-determined choice of val_videos videos."""
    if val_videos < 0 or val_videos >= len(video_ids) > 0:
        raise ValueError(f"val_videos={val_videos} must be >= 0 and leave training videos ({len(video_ids)} usable "
                         "videos: the store's, less any that bad_videos=skip left out)")
    order = _rng(seed, 0x7A1).permutation(len(video_ids))
    held = set(order[:val_videos].tolist())
    return ([v for i, v in enumerate(video_ids) if i not in held], [v for i, v in enumerate(video_ids) if i in held])
