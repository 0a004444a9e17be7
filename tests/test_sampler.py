"""Long-video sampler: the crop recipe, batch contents vs a numpy reference, determinism, ranks, budgets."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from lvmae_fast.packing import keep_counts
from lvmae_fast.sampler import (VAL_EPOCH, LongVideoSampler, SamplerConfig, plan_crops, plan_epoch,
                                split_videos)
from lvmae_fast.store import Store, StoreWriter

LENGTHS = [1, 3, 4, 5, 40, 120, 300, 2, 77, 9, 16, 250]


class FakeStore:
    """What LongVideoSampler reads of a store before any batch is built: ids "0".. with these lengths."""

    def __init__(self, lengths, segment_seconds=5.0):
        self.lengths, self.segment_seconds = [int(n) for n in lengths], segment_seconds
        self.video_ids = [str(i) for i in range(len(self.lengths))]

    def num_segments(self, video_id):
        return self.lengths[int(video_id)]

    def meta(self, video_id):
        return {"segment_seconds": self.segment_seconds}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    rng = np.random.default_rng(0)
    with StoreWriter(path, 12, shard_rows=200) as w:
        for i, n in enumerate(LENGTHS):
            w.add(f"v{i:02d}", rng.standard_normal((n, 12)).astype(np.float32) * (i + 1))
    return Store(path)


def test_crop_rules_hold_for_every_crop():
    n = np.array(LENGTHS)
    cfg = SamplerConfig(duration_min=10, duration_max=1280, max_len=256)
    for epoch in range(50):
        crops = plan_crops(n, np.full(len(n), 5.0), cfg, epoch)
        assert sorted(c.video for c in crops) == list(range(len(n)))  # each video exactly once
        for c in crops:
            size = n[c.video]
            # duration >= 10 s -> at least 2 segments (when the video has them); <= 1280 s -> at most 256
            assert min(2, size) <= c.length <= min(size, 256)
            assert 0 <= c.start <= size - c.length
            assert c.repeats == (8 if size < 2 else 3 if size < 5 else 1)  # reference short-video tiling
            assert c.out_len == min(c.length * c.repeats, 256)


def test_duration_and_start_distribution():
    # One 10000-segment video: L = floor(d / 5) with d ~ U[10, 1280], so E[L] = 645/5 - 1/2 = 128.5 (sd of the
    # mean over 4000 draws ~1.2); the start is uniform on [0, n - L].
    cfg = SamplerConfig(duration_min=10, duration_max=1280, max_len=100000)
    crops = [plan_crops(np.array([10000]), np.array([5.0]), cfg, e)[0] for e in range(4000)]
    lengths = np.array([c.length for c in crops])
    assert lengths.min() >= 2 and lengths.max() <= 256
    assert abs(lengths.mean() - 128.5) < 3.5
    rel_start = np.array([c.start / (10000 - c.length) for c in crops])
    assert abs(rel_start.mean() - 0.5) < 0.02 and rel_start.min() < 0.01 and rel_start.max() > 0.99
    # segment_seconds scales L: 10 s segments give E[L] = 64.5 - 1/2 = 64 (sd of the mean ~0.6)
    crops10 = [plan_crops(np.array([10000]), np.array([10.0]), cfg, e)[0] for e in range(4000)]
    assert abs(np.mean([c.length for c in crops10]) - 64.0) < 1.8


def test_batch_rows_match_numpy_reference(store):
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=5, mask_ratio=0.5,
                        short_video_policy="repeat")  # tiles the 1-segment video too (x8)
    sampler = LongVideoSampler(store, store.video_ids, cfg)
    plan, dataset = sampler.batches(3), sampler.dataset(3)
    assert len(dataset) == 3  # ceil(12 / 5)
    for i, crops in enumerate(plan):
        batch = dataset[i]
        rows = []
        for c in crops:
            emb = store.get(store.video_ids[c.video]).astype(np.float32)[c.start: c.start + c.length]
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            rows.append(np.concatenate([emb] * c.repeats)[: c.out_len])
        np.testing.assert_allclose(batch.x.numpy(), np.concatenate(rows), rtol=1e-6, atol=1e-7)
        assert batch.lengths == [len(r) for r in rows]
        assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == np.cumsum([0] + batch.lengths).tolist()
        per_video = [int(m.sum()) for m in batch.masked.split(batch.lengths)]
        assert per_video == [L - k for L, k in zip(batch.lengths, keep_counts(batch.lengths, 0.5))]
    one_segment = [c for crops in plan for c in crops if LENGTHS[c.video] == 1][0]
    assert one_segment.out_len == 8


def test_bucketed_batches_share_the_attention_lengths_of_the_crop_cap(store):
    """pad_to_buckets: every batch's encoder stream is sized for the cap's visible rows + CLS and the
    decoder's for the cap + CLS (not one floor for both: the encoder's grid would be half again too wide)."""
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=5, mask_ratio=0.75,
                        pad_to_buckets=True)
    dataset = LongVideoSampler(store, store.video_ids, cfg).dataset(0)
    for i in range(len(dataset)):
        batch = dataset[i]
        assert (batch.enc_max_seqlen, batch.dec_max_seqlen) == (keep_counts([64], 0.75)[0] + 1, 65) == (17, 65)
        enc_lengths = (batch.enc_cu_seqlens[1:] - batch.enc_cu_seqlens[:-1]).tolist()
        assert max(enc_lengths) <= 17 and max(batch.lengths) + 1 <= 65


def test_deterministic_and_worker_independent(store):
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=4, masking="random", seed=7)
    a = LongVideoSampler(store, store.video_ids, cfg)
    b = LongVideoSampler(store, store.video_ids, cfg)
    serial = list(a.loader(2, num_workers=0))
    parallel = list(b.loader(2, num_workers=2))
    tail = list(a.loader(2, start_batch=1, num_workers=0))
    assert len(serial) == len(parallel) == 3 and len(tail) == 2
    for x, y in zip(serial, parallel):
        assert torch.equal(x.x, y.x) and torch.equal(x.masked, y.masked) and x.lengths == y.lengths
    for x, y in zip(serial[1:], tail):
        assert torch.equal(x.x, y.x) and torch.equal(x.masked, y.masked)
    other_epoch = list(a.loader(3, num_workers=0))
    assert [b.lengths for b in other_epoch] != [b.lengths for b in serial]  # a new epoch draws new crops
    reseeded = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=4, masking="random", seed=8)
    assert [c.__dict__ for c in plan_epoch(np.array(LENGTHS), np.full(12, 5.0), reseeded, 2)[0]] != \
        [c.__dict__ for c in a.batches(2)[0]]


def test_starting_a_loader_leaves_the_global_rng_alone(store):
    """iter(DataLoader) drew the workers' base seed from the global torch RNG: a resumed run (RNG restored,
    then a new loader) saved other RNG states in its checkpoints than the uninterrupted run."""
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=4, masking="random", seed=7)
    sampler = LongVideoSampler(store, store.video_ids, cfg)
    before = torch.get_rng_state()
    for loader in (sampler.loader(0, num_workers=0), sampler.stream(0, 0, 1, num_workers=2)):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("max_tokens", [0, 150])
def test_stream_is_the_epoch_loaders_back_to_back(store, max_tokens):
    """One loader across epochs (workers persist) serves exactly what per-epoch loaders serve, in order,
    from a mid-epoch resume point on; fixed-count and token-budget batching alike."""
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=4, max_tokens=max_tokens,
                        masking="random", seed=3)
    ref = LongVideoSampler(store, store.video_ids, cfg)
    expected = [(e, i, b) for e in (2, 3, 4) for i, b in enumerate(ref.loader(e, num_workers=0)) if (e, i) >= (2, 1)]
    stream = LongVideoSampler(store, store.video_ids, cfg).stream(2, 1, 5, num_workers=2)
    got = list(stream)
    assert len(stream.sampler) == len(expected) > 4
    assert [(e, i) for e, i, _ in got] == [(e, i) for e, i, _ in expected]
    for (_, _, x), (_, _, y) in zip(got, expected):
        assert torch.equal(x.x, y.x) and torch.equal(x.masked, y.masked) and x.lengths == y.lengths
    assert list(LongVideoSampler(store, store.video_ids, cfg).stream(5, 0, 5, num_workers=0)) == []


def naive_greedy_count(out_len, budget):
    count, tokens = 0, None
    for n in out_len:
        if tokens is None or tokens + n > budget:
            count, tokens = count + 1, 0
        tokens += n
    return count


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_token_budget_batch_counts_match_the_plans_without_planning(monkeypatch, world):
    """The trainer asks for every epoch's batch count at start-up (its step total): counted without
    planning, they must be the plans' counts on every rank, for ragged lengths, short-video tiling and
    fewer crops than ranks."""
    import lvmae_fast.sampler as sampler_mod

    rng = np.random.default_rng(world)
    lengths = np.concatenate([rng.integers(1, 400, size=60), [1, 2, 3, 4]])
    real_plan, calls = sampler_mod.plan_epoch, []
    monkeypatch.setattr(sampler_mod, "plan_epoch", lambda *a, **k: calls.append(a[3]) or real_plan(*a, **k))
    for ids, budget, policy in [(64, 150, "repeat"), (64, 64, "keep"), (2, 64, "keep"), (64, 1000, "reference")]:
        store = FakeStore(lengths[:ids])
        cfg = SamplerConfig(duration_min=10, duration_max=900, max_len=64, max_tokens=budget, seed=world,
                            short_video_policy=policy)
        samplers = [LongVideoSampler(store, store.video_ids, cfg, rank=r, world=world) for r in range(world)]
        counts = [[s.num_batches(e) for e in range(4)] for s in samplers]
        assert calls == []
        for s, rank_counts in zip(samplers, counts):
            assert rank_counts == [len(real_plan(s.num_segments, s.segment_seconds, s.cfg, e, s.rank, world))
                                   for e in range(4)]


def test_greedy_batch_count_matches_a_crop_by_crop_fill():
    from lvmae_fast.sampler import count_token_batches

    rng = np.random.default_rng(0)
    for budget in (64, 100, 1000):
        for _ in range(50):
            out_len = rng.integers(1, 65, size=int(rng.integers(1, 80)))
            assert count_token_batches(out_len, budget) == naive_greedy_count(out_len.tolist(), budget)
    assert count_token_batches(np.array([64, 64, 1, 63, 1]), 64) == 4  # exact fits close a batch


def test_ranks_partition_the_epoch():
    n, seg = np.array(LENGTHS), np.full(len(LENGTHS), 5.0)
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=2)
    per_rank = [[c.video for b in plan_epoch(n, seg, cfg, 5, rank=r, world=3) for c in b] for r in range(3)]
    assert sorted(sum(per_rank, [])) == list(range(len(n)))  # 12 videos / 3 ranks: disjoint and complete
    uneven = [[c.video for b in plan_epoch(n[:11], seg[:11], cfg, 5, rank=r, world=3) for c in b] for r in range(3)]
    assert [len(v) for v in uneven] == [4, 4, 4] and set(sum(uneven, [])) == set(range(11))  # padded by wrapping
    tokens = SamplerConfig(duration_min=10, duration_max=600, max_len=64, max_tokens=70)
    counts = {len(plan_epoch(n, seg, tokens, 5, rank=r, world=2)) for r in range(2)}
    assert len(counts) == 1  # every rank steps the same number of times
    with pytest.raises(ValueError):
        plan_epoch(n, seg, cfg, 0, rank=3, world=3)


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_token_budget_ranks_see_every_video_once(world):
    """Token-budget batches over ranks: each video exactly once per epoch (no drop, no repeat), every
    rank the same number of steps, every batch within the budget, and world=1's plan unchanged."""
    rng = np.random.default_rng(world)
    n = rng.integers(1, 200, size=97)
    seg = np.full(len(n), 5.0)
    cfg = SamplerConfig(duration_min=10, duration_max=900, max_len=64, max_tokens=150, seed=world)
    for epoch in range(3):
        plans = [plan_epoch(n, seg, cfg, epoch, rank=r, world=world) for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        seen = sorted(c.video for p in plans for b in p for c in b)
        assert seen == list(range(len(n)))
        assert all(0 < sum(c.out_len for c in b) <= 150 for p in plans for b in p)
        single = plan_epoch(n, seg, cfg, epoch)  # the global packing the ranks' batches came from
        assert sorted(c.video for b in single for c in b) == seen


def test_token_budget_with_fewer_crops_than_ranks_repeats_whole_batches():
    n, seg = np.array([40, 50]), np.full(2, 5.0)
    cfg = SamplerConfig(duration_min=10, duration_max=900, max_len=64, max_tokens=64)
    plans = [plan_epoch(n, seg, cfg, 0, rank=r, world=3) for r in range(3)]
    assert [len(p) for p in plans] == [1, 1, 1]
    videos = [c.video for p in plans for b in p for c in b]
    assert sorted(set(videos)) == [0, 1] and len(videos) == 3  # one batch repeated so all 3 ranks step


def test_token_budget_batches_are_full_and_bounded():
    n, seg = np.array(LENGTHS * 4), np.full(len(LENGTHS) * 4, 5.0)
    cfg = SamplerConfig(duration_min=10, duration_max=1280, max_len=64, max_tokens=100)
    for epoch in range(5):
        plan = plan_epoch(n, seg, cfg, epoch)
        assert sorted(c.video for b in plan for c in b) == list(range(len(n)))
        for b, nxt in zip(plan, plan[1:]):
            assert sum(c.out_len for c in b) <= 100
            assert sum(c.out_len for c in b) + nxt[0].out_len > 100  # greedy: the next crop did not fit
        assert sum(c.out_len for c in plan[-1]) <= 100


@pytest.mark.parametrize("ratio, left_out", [(0.5, [1]), (0.7, [1, 3, 2]), (0.0, [])])
def test_the_reference_policy_trains_on_what_the_reference_trains_on(store, ratio, left_out):
    """The reference replaces a video with n * (1 - ratio) < 1 by another before cropping (1-segment
    videos at 0.5; 2-3-segment ones too at 0.7) and tiles the crops of the rest under 5 segments x3."""
    sampler = LongVideoSampler(store, store.video_ids, SamplerConfig(mask_ratio=ratio, max_len=64))
    assert SamplerConfig().short_video_policy == "reference"
    assert sorted(store.video_ids[i] for i, n in enumerate(LENGTHS) if n in left_out) == sorted(
        set(store.video_ids) - set(sampler.video_ids))
    for c in (c for b in sampler.batches(0) for c in b):
        n = sampler.num_segments[c.video]
        assert c.repeats == (8 if n < 2 else 3 if n < 5 else 1) and n * (1 - ratio) >= 1


def test_short_video_policies_and_bad_configs(store):
    keep = LongVideoSampler(store, store.video_ids, SamplerConfig(short_video_policy="keep", max_len=64))
    assert all(c.repeats == 1 for b in keep.batches(0) for c in b)
    assert [c.out_len for b in keep.batches(0) for c in b if LENGTHS[c.video] == 1] == [1]
    drop = LongVideoSampler(store, store.video_ids, SamplerConfig(short_video_policy="drop", max_len=64))
    assert "v00" not in drop.video_ids and len(drop.video_ids) == len(LENGTHS) - 1
    with pytest.raises(ValueError, match="duration_min"):
        SamplerConfig(duration_min=100, duration_max=50)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplerConfig(max_len=64, max_tokens=32)
    with pytest.raises(ValueError):
        SamplerConfig(short_video_policy="pad")
    with pytest.raises(ValueError, match="no videos"):
        LongVideoSampler(store, ["v00"], SamplerConfig(short_video_policy="drop"))


def test_validation_split_and_fixed_crops(store):
    train, val = split_videos(store.video_ids, 3, seed=1)
    assert len(val) == 3 and len(train) == 9 and not set(train) & set(val) and set(train) | set(val) == set(store.video_ids)
    assert split_videos(store.video_ids, 3, seed=1) == (train, val)
    with pytest.raises(ValueError):
        split_videos(store.video_ids, 12, seed=1)
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, batch_videos=2)
    first = list(LongVideoSampler(store, val, cfg).loader(VAL_EPOCH, num_workers=0))
    again = list(LongVideoSampler(store, val, cfg).loader(VAL_EPOCH, num_workers=0))
    assert [b.lengths for b in first] == [b.lengths for b in again]
    assert all(torch.equal(a.x, b.x) and torch.equal(a.masked, b.masked) for a, b in zip(first, again))


def test_token_budget_videos_per_batch_agree_across_ranks():
    """The trainer scales its lr by mean_videos_per_batch: every rank must get the same value (the whole
    epoch's batches, all ranks together), else data-parallel replicas would step with different lrs."""
    n, seg = np.array(LENGTHS), np.full(len(LENGTHS), 5.0)
    cfg = SamplerConfig(duration_min=10, duration_max=600, max_len=64, max_tokens=64, seed=0,
                        short_video_policy="repeat")  # every video planned, as plan_epoch below
    fake = FakeStore(n)
    ids = fake.video_ids
    for world in (2, 3):
        means = {LongVideoSampler(fake, ids, cfg, rank=r, world=world).mean_videos_per_batch() for r in range(world)}
        plans = [plan_epoch(n, seg, cfg, 0, rank=r, world=world) for r in range(world)]
        everyone = [b for p in plans for b in p]
        assert means == {sum(len(b) for b in everyone) / len(everyone)}
    single = LongVideoSampler(fake, ids, cfg)
    assert single.mean_videos_per_batch() == np.mean([len(b) for b in plan_epoch(n, seg, cfg, 0)])


@pytest.mark.parametrize("bad", [dict(mask_ratio=1.0), dict(mask_ratio=-0.1), dict(mask_ratio=float("nan")),
                                 dict(duration_max=float("inf")), dict(duration_min=float("inf"))])
def test_config_refuses_ratios_and_durations_that_fail_later(bad):
    """Refused when the config is made, not in a DataLoader worker at the first batch (ratio) or at
    planning time with a numpy OverflowError (infinite duration)."""
    with pytest.raises(ValueError, match="mask_ratio|duration"):
        SamplerConfig(**bad)


def test_every_bit_of_the_seed_keys_the_plans():
    """Only seed mod 2^32 reached the sampler: seeds 1 and 1 + 2^32, or -1 and 2^32 - 1, gave the same batch
    order, crops, masks and validation split. Seeds in [0, 2^32) key what they keyed before (runs resume)."""
    from lvmae_fast.sampler import _rng, mask_seed

    n, seconds, ids = np.arange(2, 42), np.full(40, 5.0), [f"v{i}" for i in range(40)]
    for a, b in ((1, 1 + 2**32), (-1, 2**32 - 1), (7, 7 - 2**64)):
        same = (plan_epoch(n, seconds, SamplerConfig(seed=a, duration_max=200), 0)
                == plan_epoch(n, seconds, SamplerConfig(seed=b, duration_max=200), 0),
                split_videos(ids, 5, a) == split_videos(ids, 5, b), mask_seed(a, 0, 0, 0) == mask_seed(b, 0, 0, 0))
        assert same == ((True,) * 3 if b == 7 - 2**64 else (False,) * 3), (a, b)  # 7 - 2^64 is 7 mod 2^64
    for seed in (0, 12345, 2**32 - 1):
        assert np.array_equal(_rng(seed, 3, 0xC0).integers(0, 1 << 30, 8),
                              np.random.default_rng(np.random.SeedSequence([seed, 3, 0xC0])).integers(0, 1 << 30, 8))
        assert mask_seed(seed, 2, 1, 9) == int(np.random.SeedSequence([seed, 2, 1, 9, 0x3A5]).generate_state(1)[0])


def test_bucket_floors_follow_the_longest_crop_the_durations_allow(store):
    """With max_len raised far above what duration_max lets a crop span, every bucketed batch attended over
    max_len + 1 rows (sdpa's one padded block on CUDA: ~2000x the work at max_len 16000 for crops of 251).
    The floor is the longest crop this sampler's videos can give, never below a real one."""
    cfg = SamplerConfig(duration_min=10, duration_max=60, max_len=4096, batch_videos=4, masking="random", seed=2,
                        pad_to_buckets=True)
    sampler = LongVideoSampler(store, store.video_ids, cfg)
    assert sampler.cfg.crop_cap <= 11 * 3   # 60 s at 5 s: at most 11 segments, tiled x3 at most
    for epoch in range(4):
        crops = [c for batch in sampler.batches(epoch) for c in batch]
        assert max(c.out_len for c in crops) <= sampler.cfg.crop_cap
        for batch in sampler.loader(epoch, num_workers=0):   # (dummies holding the padding may set it)
            assert max(batch.lengths) < batch.dec_max_seqlen <= 128
    as_before = LongVideoSampler(store, store.video_ids, replace(cfg, crop_cap=cfg.max_len))
    assert {b.dec_max_seqlen for b in as_before.loader(0, num_workers=0)} == {4097}
    # durations that allow max_len: the floor is max_len, as before
    assert LongVideoSampler(store, store.video_ids, SamplerConfig(max_len=16)).cfg.crop_cap == 16
