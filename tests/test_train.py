"""Pretraining loop: lr schedule, config layering, run dir, exact resume after SIGTERM/SIGKILL, refusals."""
import hashlib
import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lvmae_fast import train_config as tc
from lvmae_fast.cli import build_parser
from lvmae_fast.model import LVMAE
from lvmae_fast.run_dir import load_train_state
from lvmae_fast.run_metrics import read_metrics
from lvmae_fast.store import StoreWriter
from lvmae_fast.synthetic import synthetic_corpus
from lvmae_fast.train import config_from_args, lr_at, pretrain

REPO = Path(__file__).resolve().parents[1]
STEPS = 300
# 40 videos / 8 per batch = 5 steps per epoch; 100 epochs give a 500-step schedule, of which we run 300.
COMMON = ["--preset", "tiny", "--epochs", "100", "--no-progress", "--set", "ckpt_every=10", "--set", "tensorboard=false"]


def lvmae_cmd(*args):
    return [sys.executable, "-m", "lvmae_fast", *map(str, args)]


def lvmae(*args, timeout=180):
    return subprocess.run(lvmae_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def make_store(path, videos=40, dim=32, seed=0, nan_ids=()):
    with StoreWriter(path, dim, encoder="synthetic") as w:
        for vid, emb in synthetic_corpus(videos, dim, seed=seed, max_segments=200).items():
            w.add(vid, emb)
    for vid in nan_ids:  # corrupt behind the writer's back, as a bad disk or a buggy tool would
        index = json.loads((path / "index.json").read_text())
        v = next(v for v in index["videos"] if v["id"] == vid)
        emb = np.load(path / index["shards"][v["shard"]]["emb"], mmap_mode="r+")
        emb[v["offset"], 0] = np.nan
        emb.flush()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train") / "store")


@pytest.fixture(scope="module")
def reference_run(store):
    """An uninterrupted run: the curve every interrupted/resumed run must reproduce exactly."""
    out = store.parent / "reference"
    r = lvmae("pretrain", *COMMON, "--store", store, "--out", out, "--max-steps", STEPS)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def curve(run):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.jsonl")]


def test_lr_schedule_matches_hand_values():
    cfg = tc.PretrainConfig(epochs=10, warmup_epochs=2, min_lr=1e-5)
    assert lr_at(0.0, 1e-3, cfg) == 0.0
    assert lr_at(1.0, 1e-3, cfg) == pytest.approx(5e-4)           # halfway through linear warmup
    assert lr_at(2.0, 1e-3, cfg) == pytest.approx(1e-3)           # peak
    assert lr_at(6.0, 1e-3, cfg) == pytest.approx(5.05e-4)        # cosine midpoint: (base + min) / 2
    assert lr_at(10.0, 1e-3, cfg) == pytest.approx(1e-5)          # end: min_lr
    assert lr_at(4.0, 1e-3, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_config_layers_and_unknown_keys(tmp_path):
    parse = build_parser().parse_args
    (tmp_path / "c.yaml").write_text("preset: paper\nepochs: 70\nblr: 1.0e-3\nmodel: {mask_ratio: 0.4}\n")
    cfg = config_from_args(parse(["pretrain", "--config", str(tmp_path / "c.yaml"), "--set", "epochs=90",
                                  "--set", "model.masking=random", "--set", "compile=true", "--seed", "3"]))
    assert (cfg.preset, cfg.epochs, cfg.blr, cfg.seed, cfg.compile) == ("paper", 90, 1e-3, 3, True)
    assert cfg.model == {"mask_ratio": 0.4, "masking": "random"}
    assert (cfg.warmup_epochs, cfg.batch_videos, cfg.max_len) == (40, 16, 256)  # paper Table 5 via the preset
    assert cfg.weight_decay == 0.05 and (cfg.beta1, cfg.beta2) == (0.9, 0.95)
    assert tc.resolve([("dump", __import__("yaml").safe_load(tc.dump_yaml(cfg)))]) == cfg  # config.yaml round-trips
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        config_from_args(parse(["pretrain", "--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(ValueError, match="nope"):
        config_from_args(parse(["pretrain", "--set", "nope=1"]))
    with pytest.raises(ValueError, match="epochs"):
        config_from_args(parse(["pretrain", "--set", "epochs=lots"]))


def test_run_dir_contents(store, reference_run):
    run = reference_run
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "tokens_per_s", "samples_per_s"} <= set(r) for r in records)
    assert np.mean([r["loss"] for r in records[-20:]]) < 0.5 * np.mean([r["loss"] for r in records[:5]])  # it learns
    saved = tc.resolve([("config.yaml", tc.load_yaml(run / "config.yaml"))])
    assert saved.max_steps == STEPS and saved.epochs == 100 and saved.store == str(store)
    assert (run / "loss.png").stat().st_size > 0
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{STEPS:08d}"
    model = LVMAE.from_pretrained(run)
    assert model.config.in_dim == 32
    for name, tensor in load_file(str(latest / "model.safetensors")).items():
        assert torch.equal(model.state_dict()[name], tensor)


def _run_until(args, min_step, sig, metrics):
    """Start a run, wait until it has logged `min_step`, send `sig`; returns the exit code."""
    proc = subprocess.Popen(lvmae_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        records = read_metrics(metrics)
        if records and records[-1]["step"] >= min_step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_interrupted_and_resumed_run_matches_uninterrupted(store, reference_run):
    run = store.parent / "interrupted"
    args = ["pretrain", *COMMON, "--store", store, "--out", run, "--max-steps", STEPS]
    # SIGTERM: graceful, a checkpoint at the step it stopped at (workers on, to cover that path too).
    code, err = _run_until([*args, "--num-workers", "1"], 20, signal.SIGTERM, run / "metrics.jsonl")
    assert code == 143, err
    stopped_at = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    # SIGKILL: no chance to save; resume falls back to the last periodic checkpoint and drops later records.
    code, _ = _run_until([*args, "--resume"], stopped_at + 25, signal.SIGKILL, run / "metrics.jsonl")
    assert code == -signal.SIGKILL
    r = lvmae(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert curve(run) == curve(reference_run)
    final, ref = load_file(str(run / "model.safetensors")), load_file(str(reference_run / "model.safetensors"))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def _snapshot(run):
    """The run's files and contents; the lock file (RUN/.lock: the pid of the last pretrain that took it) aside."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run) != Path(".lock")}


def test_resume_extends_max_steps_and_refuses_other_configs(store, reference_run):
    run = store.parent / "extended"
    base = ["pretrain", *COMMON, "--store", store, "--out", run]
    assert lvmae(*base, "--max-steps", 20).returncode == 0
    r = lvmae(*base, "--max-steps", 40, "--resume")
    assert r.returncode == 0, r.stderr
    assert curve(run) == curve(reference_run)[:40]   # --max-steps counts from the start of the run

    before = _snapshot(run)
    for extra, expect in ((["--resume", "--seed", "9"], "seed"),
                          (["--resume", "--set", "model.mask_ratio=0.3"], "the model differs from the checkpoint's: "
                           "model.mask_ratio: checkpoint has 0.5, now 0.3"),  # (was two 15-key dicts)
                          (["--resume", "--preset", "base"], "preset"),
                          ([], "already holds a run")):
        r = lvmae(*base, "--max-steps", 60, *extra)
        assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(run) == before  # refusals write nothing
    # Backends only pick an implementation of the same math: a run started on flash must resume without it.
    r = lvmae(*base, "--max-steps", 50, "--resume", "--set", "model.attn_impl=sdpa", "--set", "model.kernels=torch")
    assert r.returncode == 0 and "resuming with changed backends: model.attn_impl=sdpa, model.kernels=torch" in r.stderr, r.stderr
    assert curve(run) == curve(reference_run)[:50]


def test_a_tensorboard_write_that_fails_turns_it_off_and_the_run_goes_on(store, tmp_path, monkeypatch, caplog,
                                                                        restore_threads):
    """A full disk under RUN/tb stopped the run with "[Errno 28] No space left on device", naming no file
    (and a traceback from tensorboard's thread); metrics.jsonl holds the same values."""
    import errno

    from torch.utils.tensorboard import SummaryWriter

    from lvmae_fast.cli import main

    calls = []

    def full(self, *args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--preset", "tiny", "--store", str(store), "--out", str(out), "--no-progress",
                     "--max-steps", "4", "--set", "log_every=1"]) == 0
    assert len(calls) == 1  # off after the first failure
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    told = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(told) == 1 and f"not written to {out / 'tb'}" in told[0] and "No space left on device" in told[0]


def test_a_failed_tensorboard_file_write_prints_no_thread_traceback(tmp_path, monkeypatch, caplog, capfd):
    """The real failure path: the event file's write fails in TensorBoard's writer thread, which printed
    "Exception in thread ... Traceback ... OSError" before the one warning; and a run folder whose name
    is not UTF-8 stopped the run (TensorBoard raised UnicodeEncodeError, not an OSError)."""
    import errno
    import os
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    from lvmae_fast.tb_log import TensorBoardLog

    def full(self, data):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(RecordWriter, "write", full)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # prints, as outside pytest
    with caplog.at_level(logging.WARNING):
        tb = TensorBoardLog(tmp_path / "tb")
        for step in range(1, 4):
            tb.add_scalar("loss", 1.0, step)
            time.sleep(0.2)  # the writer thread fails meanwhile; the next call meets its error
        tb.close()
    assert tb.writer is None
    told = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(told) == 1 and "File too large" in told[0], told
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        odd = TensorBoardLog(os.fsdecode(bytes(tmp_path / "run") + b"\xff") + "/tb")
    assert odd.writer is None and any("TensorBoard events are not written" in r.getMessage() for r in caplog.records)


def test_a_kill_while_pruning_after_the_last_checkpoint_is_cleaned_up_by_a_resume(store, tmp_path, restore_threads):
    """Killed after the last checkpoint's `latest` but before pruning (or halfway through deleting one): the
    run's end was never reached again, since a resume with nothing left to do found that checkpoint already
    the latest and returned early, so the old checkpoint (GBs at paper size) stayed for good."""
    import shutil

    from lvmae_fast.cli import main

    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--max-steps", "8",
            "--set", "ckpt_every=2", "--set", "keep_checkpoints=2", "--set", "tensorboard=false"]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 0
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    shutil.copytree(root / "step-00000006", root / "step-00000004")       # not pruned: killed before
    shutil.copytree(root / "step-00000006", root / ".step-00000002.tmp")  # killed while deleting it
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]


def test_a_killed_runs_temp_files_are_removed_on_resume(store, tmp_path, restore_threads):
    """A run killed inside an atomic write of config.yaml, loss.png or its model files left the temp file
    (as large as the model, for model.safetensors) for good."""
    from lvmae_fast.cli import main

    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "tensorboard=false"]
    assert main([*args, "--max-steps", "2"]) == 0
    stale = [tmp_path / "run" / f".{name}.k1ll.tmp" for name in ("config.yaml", "loss.png", "model.safetensors")]
    for p in stale:
        p.write_bytes(b"half")
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert not any(p.exists() for p in stale)


def test_pretrain_with_norm_targets(store, tmp_path, restore_threads):
    """model.norm_targets=true (the reference's --norm_pix_loss) was refused for every store: the config
    check built the model with a stand-in in_dim of 1, which norm_targets refuses."""
    from lvmae_fast.cli import main

    out = tmp_path / "nt"
    assert main(["pretrain", "--preset", "tiny", "--store", str(store), "--out", str(out), "--no-progress",
                 "--max-steps", "3", "--set", "model.norm_targets=true", "--set", "tensorboard=false"]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert LVMAE.from_pretrained(out).config.norm_targets


def test_a_latest_pointer_to_an_incomplete_checkpoint_names_what_to_resume(tmp_path):
    """latest naming a checkpoint that lost a file always blamed a killed rewind ("run the same --resume-from
    again") and named no checkpoint to resume; an empty pointer named the checkpoints folder itself."""
    from lvmae_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from lvmae_fast.run_dir import STATE_NAME, latest_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (7, 14, 20):
        (root / f"step-{step:08d}").mkdir(parents=True)
        for name in (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME):
            (root / f"step-{step:08d}" / name).write_bytes(b"x")
    (root / "latest").write_text("step-00000020\n")
    assert latest_checkpoint(tmp_path / "run") == root / "step-00000020"
    (root / "step-00000020" / STATE_NAME).unlink()
    with pytest.raises(ValueError, match=rf"names step-00000020, which lacks {STATE_NAME}; resume a complete one "
                                         r"with --resume-from \(step-00000007, step-00000014\)$"):
        latest_checkpoint(tmp_path / "run")
    (root / "latest").write_text("")
    with pytest.raises(ValueError, match=r"latest is empty; resume a complete one with --resume-from"):
        latest_checkpoint(tmp_path / "run")
    (root / "rewound").mkdir()
    (root / "step-00000020").rename(root / "rewound" / "step-00000020")  # a rewind to step 14, killed midway
    (root / "latest").write_text("step-00000020\n")
    with pytest.raises(ValueError, match=r"which a rewind killed midway moved to rewound/: run the same --resume-from"):
        latest_checkpoint(tmp_path / "run")


def test_resume_from_another_working_directory(store, reference_run, tmp_path):
    """A run started with relative paths resumes from anywhere with just --out and --resume
    (config.yaml holds absolute paths)."""
    def run(cwd, *args):
        return subprocess.run(lvmae_cmd("pretrain", *args), capture_output=True, text=True, timeout=180, cwd=cwd)

    r = run(store.parent, *COMMON, "--store", store.name, "--out", "relative_run", "--max-steps", 10)
    assert r.returncode == 0, r.stderr
    out = store.parent / "relative_run"
    assert tc.load_yaml(out / "config.yaml")["store"] == str(store.resolve())
    r = run(tmp_path, "--out", out, "--resume", "--max-steps", 20, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert curve(out) == curve(reference_run)[:20]


SIGNAL_IN_FINAL_EVAL = """
import os, signal, sys
import lvmae_fast.train as T
from lvmae_fast import train_config as tc
real = T.evaluate
def evaluate_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
T.evaluate = evaluate_then_signal
cfg = {"preset": "tiny", "store": sys.argv[1], "out": sys.argv[2], "max_steps": 3, "val_videos": 4,
       "progress": False, "tensorboard": False}
sys.exit(T.pretrain(tc.resolve([("t", cfg)])))
"""


def test_a_signal_during_the_final_evaluation_ends_cleanly(store, tmp_path):
    """The last step is done and checkpointed; a SIGTERM while the final validation runs must not
    kill the process mid-write: val.json and loss.png are still written, and the exit code says so."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", SIGNAL_IN_FINAL_EVAL, str(store), str(out)], capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    assert r.returncode == 143, r.stderr[-2000:]
    assert json.loads((out / "val.json").read_text())["step"] == 3
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"


def test_a_run_resumes_on_its_store_after_compaction(tmp_path, restore_threads):
    """`lvmae store compact` rewrites shards, not content: the run's fingerprint check must pass."""
    path = tmp_path / "many_shards"
    with StoreWriter(path, 32, encoder="synthetic", shard_rows=64) as w:
        for vid, emb in synthetic_corpus(24, 32, seed=0, max_segments=40).items():
            w.add(vid, emb)
            w.commit()  # one small shard per video, as an extraction job leaves them
    cfg = {"preset": "tiny", "store": str(path), "out": str(tmp_path / "run"), "progress": False,
           "tensorboard": False}
    assert pretrain(tc.resolve([("t", {**cfg, "max_steps": 2})])) == 0
    with StoreWriter(path, 32, encoder="synthetic", shard_rows=64) as w:
        assert w.compact() > 1
    assert pretrain(tc.resolve([("t", {**cfg, "max_steps": 4})]), resume=True) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_bad_stores_are_refused_or_skipped(tmp_path, restore_threads):
    empty = tmp_path / "empty"
    StoreWriter(empty, 32).close()
    cfg = dict(preset="tiny", max_steps=3, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="no videos"):
        pretrain(tc.resolve([("t", {**cfg, "store": str(empty), "out": str(tmp_path / "r0")})]))
    bad = make_store(tmp_path / "bad", videos=12, nan_ids=("video00003", "video00007"))
    with pytest.raises(ValueError, match="video00003, video00007"):
        pretrain(tc.resolve([("t", {**cfg, "store": str(bad), "out": str(tmp_path / "r1")})]))
    assert not (tmp_path / "r1").exists()
    assert pretrain(tc.resolve([("t", {**cfg, "store": str(bad), "out": str(tmp_path / "r2"), "bad_videos": "skip"})])) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "r2" / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ValueError, match="duration_min"):
        pretrain(tc.resolve([("t", {**cfg, "store": str(bad), "out": str(tmp_path / "r4"), "duration_min": 100,
                                    "duration_max": 50})]))
    assert not (tmp_path / "r4").exists()
    with pytest.raises(FileNotFoundError):
        pretrain(tc.resolve([("t", {**cfg, "store": str(tmp_path / "missing"), "out": str(tmp_path / "r3")})]))


class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


WHOLE_STEP = {"cuda_graphs": True, "cuda_graphs_optimizer": True}  # on CPU: the graphs' step, run eagerly


@pytest.mark.parametrize("mode", ["eager", "whole_step", "overlap"])
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_nonfinite_step_stops_with_the_state_before_it(store, tmp_path, monkeypatch, capsys, restore_threads, poison,
                                                       mode):
    """The 3rd step goes non-finite. Its loss is read back only after the 4th step's forward/backward
    is queued (whole-step mode: the 4th step's update too) and its optimizer update was gated on the
    device (and, whole-step, every later one), so the saved state must still be exactly the state
    after step 2: same weights and optimizer moments as a clean 2-step run. With overlap_update, a NaN
    gradient of the loss itself reaches the first chunk queued, so no chunk is updated either."""
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 10, "progress": False, "tensorboard": False,
           # gradients are checked with or without clipping (overlap_update cannot clip)
           "grad_clip": 1.0 if poison == "loss" and mode != "overlap" else 0.0,
           **(WHOLE_STEP if mode != "eager" else {}), **({"overlap_update": True} if mode == "overlap" else {})}
    clean = tmp_path / "clean"
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(clean), "max_steps": 2})])) == 0

    real_forward, calls = LVMAE.forward, []

    def forward(self, batch):
        calls.append(1)
        loss = real_forward(self, batch)
        if len(calls) != 3:
            return loss
        return loss * float("nan") if poison == "loss" else _NanGrad.apply(loss)

    monkeypatch.setattr(LVMAE, "forward", forward)
    out = tmp_path / "nan"
    code = pretrain(tc.resolve([("t", {**cfg, "out": str(out)})]))
    assert code == 3
    assert f"non-finite {'loss' if poison == 'loss' else 'gradient norm'}" in capsys.readouterr().err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    saved, ref = out / "checkpoints" / "step-00000002", clean / "checkpoints" / "step-00000002"
    weights, ref_weights = load_file(str(saved / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    opt, ref_opt = load_train_state(saved)["optimizer"]["state"], load_train_state(ref)["optimizer"]["state"]
    assert all(torch.equal(opt[i][k], ref_opt[i][k]) for i in ref_opt for k in ref_opt[i])
    assert LVMAE.from_pretrained(out).config.in_dim == 32


def test_training_reads_one_loader_across_epochs(store, tmp_path, monkeypatch, restore_threads):
    """3 epochs through one DataLoader (its workers are not restarted at each epoch's end), in
    (epoch, batch) order. That the stream serves exactly the per-epoch loaders' batches is
    test_sampler's; that resuming mid-run reproduces the curve is the resume tests'."""
    import lvmae_fast.sampler as sampler_mod

    made, real_loader = [], sampler_mod.DataLoader

    def counting_loader(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(sampler_mod, "DataLoader", counting_loader)
    out = tmp_path / "run"
    cfg = {"preset": "tiny", "store": str(store), "out": str(out), "epochs": 3, "num_workers": 2,
           "progress": False, "tensorboard": False, "log_every": 1}
    assert pretrain(tc.resolve([("t", cfg)])) == 0
    assert made == [2]
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [(s, (s - 1) // 5) for s in range(1, 16)]


def test_demo_on_a_small_embedding_corpus(tmp_path, restore_threads):
    from lvmae_fast.cli import main

    # --videos below the default 32 held-out videos used to leave nothing to train on.
    assert main(["demo", "--source", "embeddings", "--videos", "12", "--epochs", "2", "--no-progress",
                 "--out", str(tmp_path / "demo")]) == 0
    assert read_metrics(tmp_path / "demo" / "run" / "metrics.jsonl")[-1]["step"] == 2  # 10 videos, batches of 16
    assert json.loads((tmp_path / "demo" / "run" / "val.json").read_text())["val_loss"] > 0


def test_demo_overwrite_refuses_while_the_demo_in_that_folder_runs(tmp_path, capsys, restore_threads):
    """--overwrite deleted a running demo's store/ and run/ (its run/.lock went with the folder), and both
    demos then trained into one run dir. A second demo on the same --out is refused while one runs, and
    runs once it has finished."""
    import subprocess

    from lvmae_fast.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--source", "embeddings", "--videos", "12", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".lvmae-demo.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"   # as a demo running there holds it
        before = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
        capsys.readouterr()
        assert main([*args, "--overwrite"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a demo that is still running" in err[0], err
        assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == before  # nothing deleted
    finally:
        holder.kill()
        holder.wait()
    assert main([*args, "--overwrite"]) == 0


def test_demo_overwrite_deletes_only_a_demos_folders(tmp_path, capsys):
    """--overwrite removes videos/, embeddings/, store/ and run/: only in a folder the demo wrote (its
    marker, or nothing but those folders holding what the demo writes: a demo from before the marker),
    never in a project folder passed as --out by mistake."""
    from lvmae_fast.cli import main
    from lvmae_fast.demo import DEMO_MARKER

    project = tmp_path / "project"
    (project / "videos").mkdir(parents=True)
    (project / "videos" / "mine.mp4").write_bytes(b"precious")
    (project / "notes.txt").write_text("the user's own files")
    args = ["demo", "--source", "embeddings", "--videos", "12", "--epochs", "1", "--no-progress", "--overwrite"]
    assert main([*args, "--out", str(project)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "but not as `lvmae demo` wrote them" in err[0], err
    assert (project / "videos" / "mine.mp4").read_bytes() == b"precious" and not (project / "store").exists()

    # Only a demo's stage folders, no marker: still not a demo when they hold what the demo never writes (the
    # user's clips; a store folder of other files). Without --overwrite the message says so too.
    for name, inside in (("videos", "holiday.mp4"), ("store", "precious.txt")):
        mine = tmp_path / f"mine_{name}"
        (mine / name).mkdir(parents=True)
        (mine / name / inside).write_bytes(b"precious")
        for flags in (args, [a for a in args if a != "--overwrite"]):
            assert main([*flags, "--out", str(mine)]) == 1
            assert "but not as `lvmae demo` wrote them" in capsys.readouterr().err
        assert (mine / name / inside).read_bytes() == b"precious" and not (mine / DEMO_MARKER).exists()

    own_store = tmp_path / "own_store"   # a store of the user's own (another encoder): not a demo's either
    (own_store / "store").mkdir(parents=True)
    (own_store / "store" / "index.json").write_text(json.dumps({"encoder": "xclip"}))
    assert main([*args, "--out", str(own_store)]) == 1 and (own_store / "store" / "index.json").exists()
    capsys.readouterr()

    killed = tmp_path / "killed"   # an older demo killed in extraction before the store's first commit
    (killed / "store" / "shards").mkdir(parents=True)
    (killed / "store" / ".lock").write_text("pid 1")
    (killed / "store" / ".index.json.a8x2.tmp").write_text("{")   # killed inside that commit
    (killed / "store" / "failures.jsonl").write_text("")
    assert main([*args, "--out", str(killed)]) == 0 and (killed / ".lvmae-demo").is_file()

    legacy = tmp_path / "legacy"  # an older demo: stage folders only, no marker, holding what the demo writes
    (legacy / "store").mkdir(parents=True)
    (legacy / "store" / "index.json").write_text(json.dumps({"encoder": "tiny"}))
    (legacy / "store" / "stale").write_text("x")
    (legacy / "videos").mkdir()
    (legacy / "videos" / "video007.mp4").write_bytes(b"old demo clip")
    assert main([*args, "--out", str(legacy)]) == 0
    assert not (legacy / "store" / "stale").exists() and (legacy / ".lvmae-demo").is_file()
    assert not (legacy / "videos").exists()   # --source embeddings writes none
    (legacy / "notes.txt").write_text("added later")  # the marker still says it is a demo
    assert main([*args, "--out", str(legacy)]) == 0     # (and run/ is the demo's: tiny, on legacy/store)

    # The marker alone made any videos/, store/ or run/ the demo's: a user who had removed the demo's
    # folders and made their own lost their clips, and a real run (any run has a config.yaml) was deleted.
    shutil.rmtree(legacy / "run")
    (legacy / "videos").mkdir()
    (legacy / "videos" / "my_holiday.mp4").write_bytes(b"precious")
    assert main([*args, "--out", str(legacy)]) == 1
    assert "but not as `lvmae demo` wrote them" in capsys.readouterr().err
    assert (legacy / "videos" / "my_holiday.mp4").read_bytes() == b"precious"
    shutil.rmtree(legacy / "videos")
    (legacy / "run").mkdir()
    (legacy / "run" / "config.yaml").write_text(f"preset: base\nstore: {tmp_path / 'their_store'}\n")
    (legacy / "run" / "NOTES.txt").write_text("precious")
    assert main([*args, "--out", str(legacy)]) == 1 and (legacy / "run" / "NOTES.txt").exists()
    capsys.readouterr()
    shutil.rmtree(legacy / "run")
    (legacy / "run").mkdir()
    (legacy / "run" / ".lock").write_text("pid 1")  # a demo killed before its run wrote config.yaml,
    (legacy / "run" / ".config.yaml.k1f2.tmp").write_text("preset: ti")  # while writing it (refused forever)
    assert main([*args, "--out", str(legacy)]) == 0


def test_half_written_checkpoints_of_killed_runs_are_removed(store, reference_run):
    run = store.parent / "stale_tmp"
    base = ["pretrain", *COMMON, "--store", store, "--out", run]
    assert lvmae(*base, "--max-steps", 10).returncode == 0
    stale = run / "checkpoints" / ".step-00000007.tmp"  # what a run killed mid-checkpoint leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    pointer_tmp = run / "checkpoints" / ".latest.eb3ba3f_.tmp"  # a kill while `latest` was rewritten
    pointer_tmp.write_text("step-0000000")
    r = lvmae(*base, "--max-steps", 20, "--resume")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and not pointer_tmp.exists()
    assert curve(run) == curve(reference_run)[:20]


def test_cuda_graphs_flag_on_cpu_runs_bucketed_batches_and_tracks_the_reference(store, reference_run):
    """--cuda-graphs pads every batch to a bucketed shape (on CPU the step runs eagerly, with a warning):
    padding must not change the training: the loss curve follows the unpadded reference run up to
    float rounding (padded matmuls sum in another order)."""
    run = store.parent / "graphs"
    steps = 30
    r = lvmae("pretrain", *COMMON, "--store", store, "--out", run, "--max-steps", steps, "--cuda-graphs")
    assert r.returncode == 0, r.stderr
    assert "running the same shape-bucketed step eagerly" in r.stderr
    got, ref = curve(run), curve(reference_run)[:steps]
    assert [s for s, _, _ in got] == [s for s, _, _ in ref]
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in ref], rtol=1e-4)
    assert tc.resolve([("config.yaml", tc.load_yaml(run / "config.yaml"))]).cuda_graphs is True


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_blocks_inside_the_whole_step_path_track_the_reference(store, reference_run):
    """--compile with whole-step graphs (the bench's fastest batch-16 step; on CPU the same path runs
    uncaptured): the compiled blocks train like the plain eager run, up to compiled-kernel rounding."""
    run = store.parent / "compiled"
    steps = 8
    r = lvmae("pretrain", *COMMON, "--store", store, "--out", run, "--max-steps", steps, "--compile",
              "--cuda-graphs", "--cuda-graphs-optimizer")
    assert r.returncode == 0, r.stderr
    got, ref = curve(run), curve(reference_run)[:steps]
    assert [s for s, _, _ in got] == [s for s, _, _ in ref]
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in ref], rtol=1e-3)
    cfg = tc.resolve([("config.yaml", tc.load_yaml(run / "config.yaml"))])
    assert cfg.compile is True and cfg.cuda_graphs is True and cfg.cuda_graphs_optimizer is True


def test_whole_step_run_checkpoints_and_resumes_like_the_graphed_run(store, tmp_path, restore_threads):
    """Whole-step graphs queue step k+1's update before step k is read back; a step whose bookkeeping
    reads the model (checkpoint, evaluation, the last step) must be settled first. Against the
    forward/backward-graph run (same padded batches, eager update): the same curve and bit-identical
    checkpoints at every 3rd step; a checkpoint resumes in the other mode and ends where both end."""
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 10, "progress": False, "tensorboard": False,
           "ckpt_every": 3, "keep_checkpoints": 10, "eval_every": 4, "val_videos": 8, "cuda_graphs": True}
    graphs, whole = tmp_path / "graphs", tmp_path / "whole"
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(graphs)})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, **WHOLE_STEP, "out": str(whole)})])) == 0
    records = read_metrics(whole / "metrics.jsonl")
    assert records == [{**r, **{k: records[i][k] for k in ("tokens_per_s", "samples_per_s", "time_s")}}
                       for i, r in enumerate(read_metrics(graphs / "metrics.jsonl"))]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 10]  # and the last step
    for step in (3, 6, 9, 10):
        name = f"step-{step:08d}"
        a, b = (load_file(str(run / "checkpoints" / name / "model.safetensors")) for run in (graphs, whole))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        opt = load_train_state(whole / "checkpoints" / name)["optimizer"]
        assert all(type(g["lr"]) is float and g["capturable"] is False for g in opt["param_groups"])
    # Resume the whole-step run's step-6 checkpoint with eager updates: it ends on the same weights.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(whole / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006")
    (resumed / "checkpoints" / "latest").write_text("step-00000006")
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(resumed)})]), resume=True) == 0
    a, b = (load_file(str(run / "model.safetensors")) for run in (graphs, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="needs cuda_graphs=true"):
        tc.PretrainConfig(cuda_graphs=False, cuda_graphs_optimizer=True)


@pytest.mark.parametrize("settings, device, expected", [
    ({}, "cuda", (True, True)),                                    # the paper's batch 16: whole-step graphs
    ({}, "cpu", (False, False)),                                   # no graphs off CUDA: the plain step
    ({"batch_videos": 64}, "cuda", (True, True)),
    ({"batch_videos": 65}, "cuda", (False, False)),                # compute-bound: padding would cost
    ({"compile": True}, "cuda", (True, True)),                     # compiled blocks inside whole-step graphs
    ({"max_tokens": 4096}, "cuda", (False, False)),                # batch size not known ahead: left eager
    ({"cuda_graphs": False}, "cuda", (False, False)),
    ({"cuda_graphs": True}, "cpu", (True, False)),                 # as before: the bucketed step, eager update
    ({"cuda_graphs": True, "batch_videos": 256}, "cuda", (True, True)),
    ({"cuda_graphs": True, "cuda_graphs_optimizer": False}, "cuda", (True, False)),
    ({"cuda_graphs_optimizer": True}, "cpu", (True, True)),        # asking for the update captured asks for graphs
])
def test_cuda_graphs_auto_turns_graphs_on_for_small_cuda_batches_only(settings, device, expected):
    assert tc.resolve([("t", {"preset": "paper", **settings})]).graphs_for(device) == expected


def test_cuda_graphs_flags_and_config_values(tmp_path):
    """`auto` is the default and survives a YAML round trip; --no-cuda-graphs / --cuda-graphs set the key;
    anything but true, false or auto is refused naming the key."""
    cfg = tc.resolve([("t", {"preset": "paper"})])
    assert (cfg.cuda_graphs, cfg.cuda_graphs_optimizer) == ("auto", "auto")
    (tmp_path / "c.yaml").write_text(tc.dump_yaml(cfg))
    assert tc.resolve([("f", tc.load_yaml(tmp_path / "c.yaml"))]) == cfg
    for flag, value in (("--no-cuda-graphs", "false"), ("--cuda-graphs", "true"), ("--no-cuda-graphs-optimizer", "false")):
        r = lvmae("pretrain", "--preset", "paper", flag, "--print-config")
        assert r.returncode == 0, r.stderr
        key = "cuda_graphs_optimizer" if "optimizer" in flag else "cuda_graphs"
        assert f"\n{key}: {value}\n" in r.stdout
    r = lvmae("pretrain", "--preset", "paper", "--overlap-update", "--print-config")
    assert r.returncode == 0 and "\noverlap_update: true\n" in r.stdout, r.stderr
    with pytest.raises(ValueError, match="cuda_graphs: expected true, false or auto"):
        tc.resolve([("--set", tc.parse_set(["cuda_graphs=sometimes"]))])
    with pytest.raises(ValueError, match="must be true, false or auto"):
        tc.PretrainConfig(cuda_graphs_optimizer="yes")


@pytest.mark.gpu
def test_gpu_host_scalars_and_graphed_pretraining_track_eager(store, tmp_path):
    """On CUDA: the pinned, event-ordered readback returns the values; a --cuda-graphs run (captured
    graphs, bf16) follows the eager run's loss curve."""
    from lvmae_fast.train import HostScalars

    values = HostScalars(torch.tensor(1.5, device="cuda"), torch.tensor(float("nan"), device="cuda")).values()
    assert values[0] == 1.5 and math.isnan(values[1])
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 20, "progress": False, "tensorboard": False,
           "device": "cuda", "num_workers": 1}
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "eager"), "cuda_graphs": False})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "graphs"), "cuda_graphs": True,
                                       "cuda_graphs_optimizer": False})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, **WHOLE_STEP, "out": str(tmp_path / "whole")})])) == 0
    eager, graphs, whole = (curve(tmp_path / run) for run in ("eager", "graphs", "whole"))
    assert [s for s, _, _ in graphs] == [s for s, _, _ in whole] == [s for s, _, _ in eager] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v, _ in graphs], [v for _, v, _ in eager], rtol=3e-2)
    np.testing.assert_allclose([v for _, v, _ in whole], [v for _, v, _ in eager], rtol=3e-2)


@pytest.mark.gpu
def test_gpu_compiled_whole_step_pretraining_tracks_eager(store, tmp_path):
    """On CUDA: --compile with whole-step graphs (compiled blocks captured inside the graphs, the
    combination the trainer refused before 2026-11-27) follows the eager run's loss curve."""
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 20, "progress": False, "tensorboard": False,
           "device": "cuda", "num_workers": 1}
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "eager"), "cuda_graphs": False})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "compiled"), "compile": True})])) == 0
    eager, compiled = curve(tmp_path / "eager"), curve(tmp_path / "compiled")
    assert [s for s, _, _ in compiled] == [s for s, _, _ in eager] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v, _ in compiled], [v for _, v, _ in eager], rtol=3e-2)
    assert tc.resolve([("c", tc.load_yaml(tmp_path / "compiled" / "config.yaml"))]).graphs_for("cuda") == (True, True)


@pytest.mark.gpu
def test_gpu_overlapped_update_pretraining_tracks_whole_step_graphs(store, tmp_path):
    """On CUDA: overlap_update (the update on a second stream inside the captured graphs) follows the
    whole-step run's loss curve (bf16: equal up to the captures' rounding)."""
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 20, "progress": False, "tensorboard": False,
           "device": "cuda", "num_workers": 1, **WHOLE_STEP}
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "whole")})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(tmp_path / "overlap"), "overlap_update": True})])) == 0
    whole, overlap = curve(tmp_path / "whole"), curve(tmp_path / "overlap")
    assert [s for s, _, _ in overlap] == [s for s, _, _ in whole] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v, _ in overlap], [v for _, v, _ in whole], rtol=3e-2)


def _cfg(store, out, **kw):
    return tc.resolve([("t", {"preset": "tiny", "store": str(store), "out": str(out), "progress": False,
                              "tensorboard": False, **kw})])


def test_resume_from_an_earlier_checkpoint_replays_the_run_and_keeps_the_abandoned_branch(store, tmp_path,
                                                                                           restore_threads):
    import shutil

    first = tmp_path / "first"
    assert pretrain(_cfg(store, first, max_steps=12, ckpt_every=4, keep_checkpoints=5)) == 0
    again = tmp_path / "again"
    shutil.copytree(first, again)
    original = read_metrics(again / "metrics.jsonl")
    assert pretrain(_cfg(store, again, max_steps=12, ckpt_every=4, keep_checkpoints=5), resume_from="4") == 0
    assert curve(again) == curve(first)  # rewinding to step 4 with the same settings redoes steps 5..12 exactly
    assert read_metrics(again / "metrics.rewound.jsonl") == [r for r in original if r["step"] > 4]
    assert sorted(p.name for p in (again / "checkpoints" / "rewound").iterdir()) == ["step-00000008", "step-00000012"]
    final, ref = load_file(str(again / "model.safetensors")), load_file(str(first / "model.safetensors"))
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match=r"no such complete checkpoint .* \(have: step-00000004, step-00000008, step-00000012\)"):
        pretrain(_cfg(store, again, max_steps=12), resume_from="step-00000099")


def test_overlapped_update_trains_exactly_like_whole_step_graphs(store, tmp_path, restore_threads):
    """overlap_update changes when the update runs, not what it computes: the same losses and final
    weights, bit for bit (the same fused AdamW per parameter); the logged gradient norm is summed per
    chunk, so it may differ in the last bits."""
    cfg = {"preset": "tiny", "store": str(store), "max_steps": 6, "progress": False, "tensorboard": False,
           **WHOLE_STEP}
    plain, overlapped = tmp_path / "plain", tmp_path / "overlapped"
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(plain)})])) == 0
    assert pretrain(tc.resolve([("t", {**cfg, "out": str(overlapped), "overlap_update": True})])) == 0
    a, b = (read_metrics(run / "metrics.jsonl") for run in (plain, overlapped))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-5)
    wa, wb = (load_file(str(run / "model.safetensors")) for run in (plain, overlapped))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="overlap_update cannot clip gradients"):
        tc.PretrainConfig(overlap_update=True, grad_clip=1.0)
    with pytest.raises(ValueError, match="it needs cuda_graphs_optimizer"):
        tc.PretrainConfig(overlap_update=True, cuda_graphs_optimizer=False)


def test_overlapped_update_met_by_a_nonfinite_gradient_saves_nothing_and_names_the_rewind(store, tmp_path, monkeypatch,
                                                                                         capsys, restore_threads):
    """overlap_update, a NaN gradient in the encoder's first block only (reached late in backward) at step
    3: the decoder's chunks were updated before it, so the weights are no step's state. The run stops
    (exit 3) without saving them, names the step-2 checkpoint to rewind to, and resuming from it with a
    lower lr finishes the run."""
    real_forward, calls = LVMAE.forward, []

    def forward(self, batch):
        calls.append(1)
        if len(calls) == 3:
            weight = self.blocks[0].attn.qkv.weight
            handle = weight.register_hook(lambda g: (handle.remove(), torch.full_like(g, float("nan")))[1])
        return real_forward(self, batch)

    monkeypatch.setattr(LVMAE, "forward", forward)
    out = tmp_path / "run"
    settings = dict(max_steps=6, ckpt_every=2, keep_checkpoints=5, **WHOLE_STEP, overlap_update=True)
    assert pretrain(_cfg(store, out, **settings)) == 3
    err = capsys.readouterr().err
    assert "non-finite gradient norm (nan) at step 3" in err and "neither those before this step nor after it" in err
    assert f"--out {out} --resume-from step-00000002 --blr" in err and "--set overlap_update=false" in err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    monkeypatch.setattr(LVMAE, "forward", real_forward)
    assert pretrain(_cfg(store, out, **settings, blr=1e-4), resume_from="step-00000002") == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))


def test_nonfinite_stop_keeps_earlier_checkpoints_and_names_the_rewind(store, tmp_path, monkeypatch, capsys,
                                                                     restore_threads):
    real_forward, calls = LVMAE.forward, []

    def forward(self, batch):  # step 7 goes non-finite
        calls.append(1)
        loss = real_forward(self, batch)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(LVMAE, "forward", forward)
    out = tmp_path / "run"
    settings = dict(max_steps=10, ckpt_every=4, keep_checkpoints=1)
    assert pretrain(_cfg(store, out, **settings)) == 3
    err = capsys.readouterr().err
    assert "fails again, whatever the lr" in err and f"--out {out} --resume-from step-00000004 --blr" in err
    # keep_checkpoints=1 would have pruned step 4; the non-finite save keeps it to rewind to.
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    monkeypatch.setattr(LVMAE, "forward", real_forward)
    assert pretrain(_cfg(store, out, **settings, blr=1e-3), resume_from="step-00000004") == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    assert [r["step"] for r in read_metrics(out / "metrics.rewound.jsonl")] == [5, 6]
    assert [r["lr"] for r in read_metrics(out / "metrics.jsonl")][4] != read_metrics(out / "metrics.rewound.jsonl")[0]["lr"]
    assert (out / "checkpoints" / "rewound" / "step-00000006").is_dir()


def test_out_must_be_new_empty_or_a_run(store, tmp_path, restore_threads):
    as_file = tmp_path / "file"
    as_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        pretrain(_cfg(store, as_file, max_steps=1))
    model_dir = tmp_path / "model"
    LVMAE(build_tiny_config()).save_pretrained(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for resume in (False, True):
        with pytest.raises(ValueError, match="holds a model .* but no run"):
            pretrain(_cfg(store, model_dir, max_steps=1), resume=resume)
    (model_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a run's \(notes.txt\)"):
        pretrain(_cfg(store, model_dir, max_steps=1), resume=True)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name != "notes.txt"} == before
    with pytest.raises(ValueError, match="inside the store"):
        pretrain(_cfg(store, store / "run", max_steps=1))
    r = lvmae("pretrain", "--preset", "tiny", "--store", store, "--out", as_file, "--max-steps", "1")
    assert r.returncode == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr


def build_tiny_config():
    from lvmae_fast.model import LVMAEConfig

    return LVMAEConfig.from_preset("tiny", in_dim=32)


def test_keep_policy_with_only_one_segment_videos_is_refused(tmp_path, restore_threads):
    path = tmp_path / "ones"
    with StoreWriter(path, 32) as w:
        for i in range(4):
            w.add(f"v{i}", np.random.default_rng(i).standard_normal((1, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="all 4 training videos have 1 segment"):
        pretrain(_cfg(path, tmp_path / "run", max_steps=1, short_video_policy="keep"))
    assert not (tmp_path / "run").exists()


def test_demo_without_pyav_writes_nothing_and_the_embedding_demo_still_runs(tmp_path, monkeypatch, restore_threads):
    from lvmae_fast.cli import main
    from lvmae_fast.demo import _run
    from lvmae_fast.optional import MissingDependency

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError, as without the [video] extra
    out = tmp_path / "demo"
    with pytest.raises(MissingDependency, match="'av' package"):
        _run(build_parser().parse_args(["demo", "--out", str(out), "--no-progress"]))
    assert not (out / "videos").exists()
    assert main(["demo", "--out", str(out), "--source", "embeddings", "--no-progress", "--epochs", "2"]) == 0


def test_demo_with_a_pyav_too_old_for_extract_writes_nothing(tmp_path, monkeypatch):
    """The demo checked only that PyAV imports: with one older than extract needs it wrote every video and
    then failed, and the same command after upgrading was refused (the folder held a demo's videos)."""
    import av

    from lvmae_fast.demo import _run
    from lvmae_fast.optional import MissingDependency

    monkeypatch.setattr(av, "__version__", "16.0.1")
    out = tmp_path / "demo"
    with pytest.raises(MissingDependency, match=r"needs 'av' >= 17, found 16.0.1"):
        _run(build_parser().parse_args(["demo", "--out", str(out), "--no-progress"]))
    assert not out.exists() or not any(out.iterdir())


def test_a_rewind_killed_halfway_is_completed_by_running_it_again(store, tmp_path, restore_threads):
    """A kill after the rewind moved some later checkpoints but before it repointed `latest`: `latest`
    names a moved checkpoint, and --resume-from the same step must still finish the rewind."""
    import os
    import shutil

    first = tmp_path / "first"
    settings = dict(max_steps=12, ckpt_every=4, keep_checkpoints=5)
    assert pretrain(_cfg(store, first, **settings)) == 0
    run = tmp_path / "run"
    shutil.copytree(first, run)
    (run / "checkpoints" / "rewound").mkdir()
    os.replace(run / "checkpoints" / "step-00000012", run / "checkpoints" / "rewound" / "step-00000012")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"  # names a moved checkpoint
    assert pretrain(_cfg(store, run, **settings), resume_from="4") == 0
    assert curve(run) == curve(first)
    assert sorted(p.name for p in (run / "checkpoints" / "rewound").iterdir()) == ["step-00000008", "step-00000012"]


def test_epochs_below_the_presets_warmup_names_the_key_to_change():
    with pytest.raises(ValueError, match=r"got epochs=1, warmup_epochs=2.0; .* --set warmup_epochs=N"):
        tc.resolve([("t", {"preset": "tiny", "epochs": 1})])


def test_config_mistakes_are_refused_before_the_run_dir_is_written(store, tmp_path, capsys, restore_threads):
    from lvmae_fast.cli import main

    # num_workers=-1 used to fail in the DataLoader after RUN/config.yaml was written (a rerun then needed
    # --resume), device=meta mid-run with a traceback, max_len=1 / mask_ratio=0 trained on a loss of 0.
    for item, message in (("num_workers=-1", "num_workers=-1 must be >= 0"), ("device=meta", "device='meta'"),
                          ("max_len=1", "max_len=1: a crop needs >= 2 segments"),
                          ("model.mask_ratio=0", "model.mask_ratio=0.0 must be in (0, 1)")):
        capsys.readouterr()
        assert main(["pretrain", "--preset", "tiny", "--store", str(store), "--out", str(tmp_path / "run"),
                     "--no-progress", "--max-steps", "1", "--set", item]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def test_demo_with_fewer_epochs_than_the_presets_warmup_runs(tmp_path, restore_threads):
    from lvmae_fast.cli import main

    # --epochs 1 used to be refused (warmup_epochs=2 > epochs) after the demo data had been written.
    out = tmp_path / "demo"
    assert main(["demo", "--source", "embeddings", "--videos", "4", "--dim", "8", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    cfg = tc.load_yaml(out / "run" / "config.yaml")
    assert (cfg["epochs"], cfg["warmup_epochs"]) == (1, 1.0)
    assert read_metrics(out / "run" / "metrics.jsonl")[-1]["step"] >= 1


def test_pretrain_help_names_the_default_preset_its_values_and_the_choices(tmp_path, capsys):
    """`pretrain --help` showed no defaults (they come from the preset), did not say --max-steps 0 runs
    every epoch, and --preset/--precision/--bad-videos took any string. Config files keep their checks."""
    from lvmae_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "takes its value from the preset: tiny, unless --preset" in text
    assert "--preset {paper,base,tiny}" in text and "(config key preset; default: tiny)" in text
    assert "--precision {auto,bf16,fp32}" in text and "--bad-videos {error,skip}" in text
    assert "(0 = run all epochs)" in text
    tiny = tc.PRESETS["tiny"]
    for key in ("epochs", "batch_videos", "ckpt_every"):
        assert f"(config key {key}; default from the preset; tiny: {tiny[key]})" in text
    assert "(config key max_steps; default from the preset; tiny: 0)" in text
    for flag, value in (("--preset", "small"), ("--precision", "fp16"), ("--bad-videos", "ignore")):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", flag, value, "--print-config"])
        assert exit_info.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "paper", "--precision", "bf16", "--bad-videos", "skip", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "preset: paper" in printed and "precision: bf16" in printed and "bad_videos: skip" in printed
    (tmp_path / "c.yaml").write_text("precision: bf16\nbad_videos: skip\n")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert "precision: bf16" in capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("precision: fp16\n")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 1
    assert "precision='fp16' must be auto, bf16 or fp32" in capsys.readouterr().err


def test_durations_that_never_span_two_segments_are_refused_before_the_run_dir_is_written(tmp_path, capsys,
                                                                                         restore_threads):
    """duration_min=0.5 / duration_max=2 on a store of 5 s segments made every crop 1 segment: nothing
    masked, a loss of 0.0, exit 0. Refused (also when `repeat` would tile the short videos: their masked
    tokens are copies of the one visible segment), naming both keys and the store's segment length."""
    from lvmae_fast.cli import main

    rng = np.random.default_rng(3)
    path = tmp_path / "store"
    with StoreWriter(path, 32, segment_seconds=5.0) as w:  # 3-segment videos (tiled x3 by `repeat`) and longer ones
        for i, n in enumerate([3, 3, 4, 12, 20, 30]):
            w.add(f"v{i}", rng.standard_normal((n, 32)).astype(np.float32))
    for low, high in (("0.5", "2"), ("5", "10"), ("1", "9.99")):
        capsys.readouterr()
        assert main(["pretrain", "--store", str(path), "--out", str(tmp_path / "run"), "--no-progress",
                     "--max-steps", "1", "--set", f"duration_min={low}", "--set", f"duration_max={high}"]) == 1
        err = capsys.readouterr().err
        assert f"duration_min={low} s / duration_max={high} s" in err and "5-second segments" in err, err
        assert "Raise duration_max above 10 s" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
    from lvmae_fast.sampler import max_crop_segments
    from lvmae_fast.store import Store
    from lvmae_fast.train import check_crop_durations

    store = Store(path)
    for low, high in ((10.0, 10.0), (1.0, 10.5), (10.0, 320.0)):  # some crop can span 2 segments: allowed
        check_crop_durations(store, _cfg(path, tmp_path / "run", duration_min=low, duration_max=high))
    assert [max_crop_segments(lo, hi, 5.0) for lo, hi in ((0.5, 2), (5, 10), (10, 10), (1, 10.5), (12, 12))] == \
        [1, 1, 2, 2, 2]


def test_logged_rates_time_each_step_itself_on_the_cpu(store, tmp_path, monkeypatch, restore_threads):
    """On the CPU a step is settled (logged) only after the next step's forward/backward has run, and the
    rates were timed there: each record measured the next step's compute and the last one almost none
    (a long-crop run logged 7.9M tokens/s for its last step, ~860 for the others). With a clock that
    advances 1 s per forward, every step takes exactly 1 s: samples_per_s is the batch's video count."""
    import types

    import lvmae_fast.run_metrics as metrics_mod
    import lvmae_fast.train as T

    clock = [0.0]
    for module in (T, metrics_mod):  # the loop times each step's end, Throughput its start and rates
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    forward = LVMAE.forward

    def timed_forward(self, *args, **kwargs):
        clock[0] += 1.0
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LVMAE, "forward", timed_forward)
    assert pretrain(_cfg(store, tmp_path / "run", max_steps=4)) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["samples_per_s"] for r in records] == [8.0] * 4  # 40 videos, 8 per batch
    assert [r["time_s"] for r in records] == [1.0, 2.0, 3.0, 4.0]


def test_backends_this_device_cannot_run_are_refused_before_the_run_dir_is_written(store, tmp_path, capsys,
                                                                                  monkeypatch, restore_threads):
    """attn_impl=flash / torch_varlen and kernels=triton on the CPU raised at the first forward, after
    RUN/config.yaml was written (a traceback, and the rerun was refused as an existing run)."""
    from lvmae_fast.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # kernels=triton on CPU needs the interpreter
    for item, message in (("model.attn_impl=flash", "attn_impl='flash'"),
                          ("model.attn_impl=torch_varlen", "attn_impl='torch_varlen' needs a CUDA device"),
                          ("model.kernels=triton", "kernels='triton'")):
        capsys.readouterr()
        assert main(["pretrain", "--preset", "tiny", "--store", str(store), "--out", str(tmp_path / "run"),
                     "--no-progress", "--max-steps", "1", "--device", "cpu", "--set", item]) == 1
        err = capsys.readouterr().err
        assert message in err and "error:" in err and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_held_out_videos_all_dropped_as_too_short_turn_validation_off(tmp_path, capsys, caplog, restore_threads):
    """short_video_policy=drop with only 1-segment held-out videos: the validation sampler refused to start
    ("no videos to sample from"), which stopped the run; it now trains without validation, with a warning."""

    from lvmae_fast.cli import main
    from lvmae_fast.sampler import split_videos

    rng = np.random.default_rng(0)
    npys = tmp_path / "npys"
    npys.mkdir()
    lengths = {"a": 1, "b": 1, "long": 30}
    for vid, n in lengths.items():
        np.save(npys / f"{vid}.npy", rng.standard_normal((n, 8)).astype(np.float32))
    assert main(["store", "import", str(npys), "--out", str(tmp_path / "store")]) == 0
    from lvmae_fast.store import Store

    ids = list(Store(tmp_path / "store").video_ids)  # the order the trainer splits
    seed = next(s for s in range(100) if lengths[split_videos(ids, 1, s)[1][0]] == 1)
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--preset", "tiny", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
                     "--no-progress", "--max-steps", "1", "--val-videos", "1", "--seed", str(seed),
                     "--set", "short_video_policy=drop"]) == 0
    assert "validation off" in caplog.text
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 1


def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_resumes(store, tmp_path, monkeypatch, capsys,
                                                                          restore_threads):
    """torch.save on a full disk raised a raw RuntimeError ('[enforce fail at inline_container.cc:672] ...
    unexpected pos ...') and left checkpoints/.step-N.tmp behind. Now: one line naming the checkpoint, the
    reason and the checkpoints left; no temp dir; `latest` and the earlier checkpoint load; --resume after
    freeing space finishes the run exactly like an undisturbed one. Same for the non-finite-step save."""
    import errno

    from lvmae_fast.cli import main

    real_save = torch.save

    def full_at(step, error):
        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("progress", {}).get("step") == step:
                open(f, "wb").write(b"x" * 1000)  # half a file, then the disk is full
                raise error
            return real_save(obj, f, *a, **k)
        return save

    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--max-steps", "8",
            "--set", "ckpt_every=4", "--set", "tensorboard=false"]
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_at(8, RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 2483714176 vs 2483714068")))
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"lvmae pretrain: error: could not write checkpoint step-00000008 to {out / 'checkpoints'}: RuntimeError: "
        "[enforce fail at inline_container.cc:672]"), err
    assert err[0].endswith("(is the disk full?) (earlier checkpoints are intact: step-00000004)"), err
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004"]
    assert (ckpts / "latest").read_text() == "step-00000004"
    assert load_train_state(ckpts / "step-00000004")["progress"]["step"] == 4
    LVMAE.from_pretrained(out)
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    assert curve(out) == curve(reference)

    # The save of the state before a non-finite step, on a full disk: both facts, one line.
    real_forward, calls = LVMAE.forward, []

    def forward(self, batch):
        calls.append(1)
        loss = real_forward(self, batch)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(LVMAE, "forward", forward)
    monkeypatch.setattr(torch, "save", full_at(5, OSError(errno.ENOSPC, "No space left on device")))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "nonfinite")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lvmae pretrain: error: non-finite loss (nan) at step 6; could not write checkpoint step-00000005 "
                   f"to {tmp_path / 'nonfinite' / 'checkpoints'}: No space left on device (earlier checkpoints are "
                   "intact: step-00000004)"], err
    assert sorted(p.name for p in (tmp_path / "nonfinite" / "checkpoints").iterdir()) == ["latest", "step-00000004"]


@pytest.mark.parametrize("damage", ["state_cut", "state_empty", "state_bits_flipped", "weights_cut", "weights_bit_flipped",
                                    "config_edited", "optimizer_groups"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_others(store, tmp_path, capsys, restore_threads,
                                                                        damage):
    """A cut or emptied train state, cut weights (tracebacks from torch / safetensors before), or an optimizer
    state with other parameter groups (an older version's): one line naming the file and the checkpoints
    to resume instead; resuming one of those works."""
    from lvmae_fast.cli import main

    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--max-steps", "8",
            "--set", "ckpt_every=4", "--set", "tensorboard=false"]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 0
    last = out / "checkpoints" / "step-00000008"
    state_file, weights_file = last / "train_state.pt", last / "model.safetensors"
    if damage == "state_cut":
        state_file.write_bytes(state_file.read_bytes()[:5000])
    elif damage == "state_empty":
        state_file.write_bytes(b"")
    elif damage == "state_bits_flipped":  # torch.load reads it without a word: only the zip's CRCs tell
        data = bytearray(state_file.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        state_file.write_bytes(bytes(data))
    elif damage == "weights_cut":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif damage == "weights_bit_flipped":  # a low mantissa bit of the last weight: safetensors has no checksum
        data = bytearray(weights_file.read_bytes())
        data[-4] ^= 0x01
        weights_file.write_bytes(bytes(data))
    elif damage == "config_edited":
        (last / "config.json").write_text((last / "config.json").read_text() + " ")
    else:  # the first group's last parameter moved into the second group
        state = load_train_state(last)
        groups = state["optimizer"]["param_groups"]
        groups[1]["params"].insert(0, groups[0]["params"].pop())
        torch.save(state, state_file)
    name = {"weights_cut": "model.safetensors", "weights_bit_flipped": "model.safetensors",
            "config_edited": "config.json"}.get(damage, "train_state.pt")
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume", "--max-steps", "12"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {last} cannot be resumed: {name}" in err[0], err
    assert err[0].endswith("Resume an earlier one with --resume-from (step-00000004)"), err
    if damage == "optimizer_groups":
        assert "other AdamW parameter groups" in err[0]
    if damage == "state_bits_flipped":
        assert "damaged data (CRC mismatch in " in err[0]
    if damage in ("weights_bit_flipped", "config_edited"):
        assert "damaged data (its sha256 differs from the one saved with the checkpoint)" in err[0]
    assert main([*args, "--out", str(out), "--resume-from", "4"]) == 0


def test_the_train_state_is_written_atomically_and_fsynced(store, tmp_path, monkeypatch, restore_threads):
    """train_state.pt goes through atomic_write (temp file, fsync, rename) like the weights: `latest` must
    never name a state that a power cut could lose after the earlier checkpoints were pruned."""
    from lvmae_fast import run_dir
    from lvmae_fast.cli import main

    written, real = [], run_dir.atomic_write
    monkeypatch.setattr(run_dir, "atomic_write", lambda path, write: (written.append(Path(path).name), real(path, write)))
    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--max-steps", "4",
            "--set", "ckpt_every=2", "--set", "tensorboard=false", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert written.count("train_state.pt") == 2


def test_a_full_disk_while_logging_metrics_is_one_line_without_a_torn_record(store, tmp_path, monkeypatch, capsys,
                                                                            restore_threads):
    import builtins
    import errno
    import io

    import lvmae_fast.train as train_mod
    from lvmae_fast.cli import main

    class FillsUp(io.FileIO):  # 3 records fit, the 4th is cut short by the full disk
        def write(self, data):
            if self.tell() > 0 and str(self.name).endswith("metrics.jsonl") and len(read_metrics(Path(self.name))) >= 3:
                super().write(bytes(data)[:10])
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def appends_fill_up(path, mode="r", buffering=-1):  # train.py's appends (metrics.jsonl); any reads as usual
        return FillsUp(path, "a") if "a" in mode else builtins.open(path, mode, buffering)

    monkeypatch.setattr(train_mod, "open", appends_fill_up, raising=False)
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--max-steps", "8",
            "--set", "ckpt_every=2", "--set", "tensorboard=false"]
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lvmae pretrain: error: could not write step 4 to {out / 'metrics.jsonl'}: No space left on device "
                   "(the run stops here; --resume continues from the latest checkpoint)"], err
    assert (out / "metrics.jsonl").read_text().count("\n") == 3 and (out / "metrics.jsonl").read_text().endswith("\n")
    monkeypatch.undo()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))


def test_validation_on_videos_with_nothing_to_mask_is_off_not_a_loss_of_0(tmp_path, caplog, restore_threads):
    """short_video_policy=keep with only 1-segment held-out videos: their crops mask nothing, and the run
    reported val_loss 0.0 (val.json, metrics, loss.png) for a model never tested. Now validation is off,
    with a warning, as under drop."""
    from lvmae_fast.cli import main
    from lvmae_fast.sampler import split_videos

    path, rng = tmp_path / "store", np.random.default_rng(0)
    with StoreWriter(path, 8) as w:
        for k in range(6):
            w.add(f"one{k}", rng.standard_normal((1, 8)).astype(np.float32))
            w.add(f"long{k}", rng.standard_normal((60, 8)).astype(np.float32))
    ids = [f"{kind}{k}" for k in range(6) for kind in ("one", "long")]
    seed = next(s for s in range(200) if all(v.startswith("one") for v in split_videos(ids, 2, s)[1]))
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--store", str(path), "--out", str(out), "--no-progress",
                 "--max-steps", "4", "--seed", str(seed), "--val-videos", "2", "--set", "short_video_policy=keep",
                 "--set", "eval_every=2", "--set", "tensorboard=false"]) == 0
    assert ("validation off: none of the 2 held-out videos can be validated: short_video_policy=keep keeps "
            "1-segment videos whole") in caplog.text
    assert not (out / "val.json").exists()
    assert not any("val_loss" in r for r in read_metrics(out / "metrics.jsonl"))


def test_validation_off_says_why_under_the_reference_policy(tmp_path, caplog, restore_threads):
    """At mask_ratio 0.7 the reference policy leaves out 3-segment videos too (3 x 0.3 < 1): the warning
    said the held-out videos "have 1 segment" when one had 3."""
    from lvmae_fast.cli import main
    from lvmae_fast.sampler import split_videos

    path, rng = tmp_path / "store", np.random.default_rng(0)
    with StoreWriter(path, 8) as w:
        for k in range(6):
            for kind, n in (("one", 1), ("three", 3), ("long", 60)):
                w.add(f"{kind}{k}", rng.standard_normal((n, 8)).astype(np.float32))
    ids = [f"{kind}{k}" for k in range(6) for kind in ("one", "three", "long")]
    seed = next(s for s in range(500) if sorted(v.rstrip("012345") for v in split_videos(ids, 2, s)[1]) == ["one", "three"])
    assert main(["pretrain", "--preset", "tiny", "--store", str(path), "--out", str(tmp_path / "run"), "--no-progress",
                 "--max-steps", "1", "--seed", str(seed), "--val-videos", "2", "--set", "model.mask_ratio=0.7",
                 "--set", "tensorboard=false"]) == 0
    assert ("none of the 2 held-out videos can be validated: short_video_policy=reference leaves out videos of n "
            "segments with n x (1 - mask_ratio) < 1 (mask_ratio 0.7)") in caplog.text


def test_the_log_says_how_many_held_out_videos_are_validated(tmp_path, caplog, restore_threads):
    """Held-out videos are picked before the short-video policy: a 1-segment one is then neither trained
    nor validated on, and the log said "2 held out" of a validation over 1 video."""
    from lvmae_fast.cli import main
    from lvmae_fast.sampler import split_videos

    path, rng = tmp_path / "store", np.random.default_rng(0)
    with StoreWriter(path, 8) as w:
        for k in range(6):
            for kind, n in (("one", 1), ("long", 60)):
                w.add(f"{kind}{k}", rng.standard_normal((n, 8)).astype(np.float32))
    ids = [f"{kind}{k}" for k in range(6) for kind in ("one", "long")]
    seed = next(s for s in range(500) if sorted(v.rstrip("012345") for v in split_videos(ids, 2, s)[1]) == ["long", "one"])
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--preset", "tiny", "--store", str(path), "--out", str(tmp_path / "run"),
                     "--no-progress", "--max-steps", "1", "--seed", str(seed), "--val-videos", "2",
                     "--set", "tensorboard=false"]) == 0
    assert "on 5 videos (2 held out, 1 of them validated, 5 too short for short_video_policy=reference)" in caplog.text


def test_val_json_follows_every_evaluation_and_a_rewind(store, tmp_path, monkeypatch, restore_threads):
    """val.json was written only at the end of a completed run (none after an interrupt, however many
    evaluations) and kept an abandoned branch's result after --resume-from. Now it is written at every
    evaluation (the final step is not evaluated twice), and a rewind moves a later one aside."""
    from lvmae_fast import train
    from lvmae_fast.cli import main

    written, real = [], train.write_val
    monkeypatch.setattr(train, "write_val", lambda out, step, loss: (written.append(step), real(out, step, loss)))
    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--val-videos", "3",
            "--set", "eval_every=4", "--set", "ckpt_every=2", "--set", "keep_checkpoints=10", "--set", "tensorboard=false"]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--max-steps", "8"]) == 0
    assert written == [4, 8]
    first = json.loads((out / "val.json").read_text())
    assert first["step"] == 8 and first == next(
        {"step": r["step"], "val_loss": r["val_loss"]} for r in read_metrics(out / "metrics.jsonl") if r["step"] == 8)
    written.clear()
    assert main([*args, "--out", str(out), "--max-steps", "6", "--resume-from", "2", "--blr", "1e-5"]) == 0
    assert written == [4, 6]
    assert [json.loads(line) for line in (out / "val.rewound.jsonl").read_text().splitlines()] == [first]
    # A second rewind keeps the first's abandoned result (it was overwritten) and adds its own; 36, step-36
    # and step-00000036 name one checkpoint (step-36 was refused).
    second = json.loads((out / "val.json").read_text())
    assert main([*args, "--out", str(out), "--max-steps", "6", "--resume-from", "step-4", "--blr", "1e-6"]) == 0
    assert [json.loads(line) for line in (out / "val.rewound.jsonl").read_text().splitlines()] == [first, second]
    final = json.loads((out / "val.json").read_text())
    # 6 is no eval_every step: the last step's evaluation was in val.json only, not in metrics.jsonl.
    assert final["step"] == 6 and final == next(
        {"step": r["step"], "val_loss": r["val_loss"]} for r in read_metrics(out / "metrics.jsonl") if r["step"] == 6)


def test_a_resume_before_the_last_evaluation_gives_val_json_back_its_earlier_result(tmp_path):
    """A run evaluated at 4, 8 and 12, checkpointed at 9 and was killed: resumed there (or rewound), val.json
    (12's) was deleted and nothing rewrote it, so a run stopped before its next evaluation had none; the
    one a run stopped at 9 holds is step 8's (metrics.jsonl, already cut at the checkpoint, keeps it)."""
    from lvmae_fast.run_metrics import drop_later_val, write_val

    out = tmp_path / "run"
    out.mkdir()
    records = [{"step": s, "loss": 1.0 / s, **({"val_loss": 0.1 * s} if s % 4 == 0 else {})} for s in range(1, 10)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_val(out, 12, 1.2)
    drop_later_val(out, 9, keep_dropped=out / "val.rewound.jsonl")
    assert json.loads((out / "val.json").read_text()) == {"step": 8, "val_loss": 0.8}
    assert [json.loads(line) for line in (out / "val.rewound.jsonl").read_text().splitlines()] == [
        {"step": 12, "val_loss": 1.2}]
    drop_later_val(out, 9)  # val.json is not later: kept
    assert json.loads((out / "val.json").read_text()) == {"step": 8, "val_loss": 0.8}
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    drop_later_val(out, 3)  # no evaluation up to the checkpoint: none
    assert not (out / "val.json").exists()


def test_a_checkpoint_without_its_latest_pointer_is_resumed(store, tmp_path, restore_threads, caplog):
    """A kill between a first checkpoint's rename and the write of `latest`: --resume started again from
    step 0 beside the complete step-N (and its metrics). It now resumes the newest complete checkpoint."""
    from lvmae_fast.cli import main

    args = ["pretrain", "--preset", "tiny", "--store", str(store), "--no-progress", "--set", "ckpt_every=2",
            "--set", "tensorboard=false"]
    out, reference = tmp_path / "run", tmp_path / "reference"
    assert main([*args, "--out", str(out), "--max-steps", "4"]) == 0
    (out / "checkpoints" / "latest").unlink()
    caplog.clear()
    caplog.set_level("INFO", logger="lvmae_fast.train")
    assert main([*args, "--out", str(out), "--max-steps", "6", "--resume"]) == 0
    assert "resuming at step 4" in caplog.text  # not a run from step 0 again
    assert main([*args, "--out", str(reference), "--max-steps", "6"]) == 0
    assert curve(out) == curve(reference)
    assert not list(out.glob(".*.link.tmp"))  # relinking the same files left their temp names behind
    times = [r["time_s"] for r in read_metrics(out / "metrics.jsonl")]
    assert times == sorted(times)  # time_s counts on across the resume (it started again near 0)


def test_resume_reads_the_runs_config_wherever_the_run_dir_is_named(tmp_path, monkeypatch):
    """The run's config.yaml was read only through a literal --out: with `--set out=RUN`, a --config file's
    out:, or --out=~/RUN (no shell to expand it) a resume fell back to the preset (a changed lr, or
    'needs --store'). And a config file's empty `store: ''` (the shipped presets') no longer clears it."""
    parse = build_parser().parse_args
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tmp_path / "home" / "runx"
    run.mkdir(parents=True)
    saved = tc.resolve([("t", {"preset": "tiny", "store": "/data/store", "out": str(run), "lr": 0.01, "max_steps": 3})])
    (run / "config.yaml").write_text(tc.dump_yaml(saved))
    (tmp_path / "c.yaml").write_text(f"store: ''\nout: {run}\nmax_steps: 5\n")
    for argv in (["--set", f"out={run}"], ["--out=~/runx"], ["--config", str(tmp_path / "c.yaml")],
                 ["--out", str(run), "--config", str(tmp_path / "c.yaml")]):
        cfg = config_from_args(parse(["pretrain", *argv, "--resume"]))
        assert (cfg.store, cfg.lr, cfg.out) == ("/data/store", 0.01, str(run)), argv
    assert config_from_args(parse(["pretrain", "--config", str(tmp_path / "c.yaml"), "--resume"])).max_steps == 5


def test_resume_from_takes_only_a_checkpoint_name_of_this_run(store, tmp_path, restore_threads):
    # A path was joined to RUN/checkpoints: ../../other/checkpoints/step-N rewound the other run (moved its
    # later checkpoints, rewrote its `latest`), rewound/step-N nested a rewound/ in rewound/.
    import shutil

    settings = dict(max_steps=12, ckpt_every=4, keep_checkpoints=5)
    other = tmp_path / "other"
    assert pretrain(_cfg(store, other, **settings)) == 0
    run = tmp_path / "run"
    shutil.copytree(other, run)
    before = sorted(p.name for p in (other / "checkpoints").iterdir())
    for name in ("../../other/checkpoints/step-00000004", str(other / "checkpoints" / "step-00000004"),
                 "rewound/step-00000008"):
        with pytest.raises(ValueError, match="takes the name of a checkpoint in .*: step-N or N"):
            pretrain(_cfg(store, run, **settings), resume_from=name)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before
    assert (other / "checkpoints" / "latest").read_text().strip() == "step-00000012"


def test_a_checkpoint_missing_a_file_is_not_a_resume_target_and_pruning_never_leaves_one(store, tmp_path,
                                                                                        monkeypatch, restore_threads):
    import shutil

    from lvmae_fast.run_dir import is_complete

    settings = dict(max_steps=12, ckpt_every=4, keep_checkpoints=2)
    run = tmp_path / "run"
    # A kill midway through pruning step-4 (rmtree removed one file, then the process died).
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **k):
        path = Path(path)
        if (path / "config.json").is_file():
            (path / "config.json").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(store, run, **settings))
    monkeypatch.undo()
    # Pruning renames first: no step-N folder lacks a file, whatever moment the kill came at.
    steps = [p for p in (run / "checkpoints").glob("step-*")]
    assert steps and all(is_complete(p) for p in steps), [sorted(f.name for f in p.iterdir()) for p in steps]
    # A step-N missing its config (a run killed by the old pruning) is refused before anything is written.
    last = sorted(steps)[-1]
    (last / "config.json").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="no such complete checkpoint"):
        pretrain(_cfg(store, run, **settings), resume_from=last.name)
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_seed_beyond_float_precision_is_kept_exactly_and_out_of_range_seeds_are_refused():
    for value in (123456789012345678, "9007199254740993", np.int64(2 ** 62 + 1), -1):  # -1: runs made before
        cfg = tc.resolve([("t", {"preset": "tiny", "seed": value})])
        assert cfg.seed == int(value) and type(cfg.seed) is int
    for value in (-2 ** 63 - 1, 2 ** 64):
        with pytest.raises(ValueError, match=r"seed=.* must be in \[-2\^63, 2\^64\)"):
            tc.resolve([("t", {"preset": "tiny", "seed": value})])


def test_min_lr_above_the_peak_lr_is_refused_before_the_run_dir_is_written(store, tmp_path, restore_threads):
    with pytest.raises(ValueError, match=r"min_lr=0.01 exceeds the peak learning rate 0.001 \(lr\)"):
        pretrain(_cfg(store, tmp_path / "run", max_steps=2, lr=1e-3, min_lr=0.01))
    assert not (tmp_path / "run").exists()


def test_a_demo_whose_pretraining_stops_says_how_to_continue_and_not_done(tmp_path, monkeypatch, capsys,
                                                                          restore_threads):
    import lvmae_fast.demo as D
    from lvmae_fast.cli import main

    for code, hint in ((130, f"lvmae pretrain --out {tmp_path / 'demo' / 'run'} --resume"),  # interrupted
                       (3, "pretrain's message above says how to rewind")):  # non-finite: --resume fails again
        monkeypatch.setattr(D, "pretrain", lambda cfg, code=code: code)
        assert main(["demo", "--source", "embeddings", "--videos", "12", "--epochs", "2", "--no-progress",
                     "--out", str(tmp_path / "demo"), "--overwrite"]) == code
        out, err = capsys.readouterr()
        assert "demo done" not in out and hint in err, err


def test_a_run_dir_another_pretrain_is_using_is_refused(store, reference_run, tmp_path):
    """Two `lvmae pretrain` in one run dir deleted each other's half-written checkpoints and interleaved
    their metrics. A second one (resuming, or starting a new run in a folder another has just made) is
    refused in one line, and the run's files are left as they were; once the first has ended, it goes."""
    from lvmae_fast.run_dir import RunDirLock

    run = tmp_path / "busy"
    shutil.copytree(reference_run, run)
    before = (run / "metrics.jsonl").read_bytes()
    holder = RunDirLock()
    holder.take(run)   # as a running pretrain holds it
    try:
        r = lvmae("pretrain", *COMMON, "--store", store, "--out", run, "--max-steps", STEPS + 10, "--resume")
        assert r.returncode == 1 and "is in use by another `lvmae pretrain`" in r.stderr.strip().splitlines()[-1]
        assert (run / "metrics.jsonl").read_bytes() == before
        fresh = tmp_path / "fresh"   # made by the other run a moment ago: only its lock file so far
        holder_fresh = RunDirLock()
        holder_fresh.take(fresh)
        r = lvmae("pretrain", *COMMON, "--store", store, "--out", fresh, "--max-steps", 5)
        assert r.returncode == 1 and "is in use by another `lvmae pretrain`" in r.stderr
        assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
        holder_fresh.release()
    finally:
        holder.release()
    r = lvmae("pretrain", *COMMON, "--store", store, "--out", run, "--max-steps", STEPS + 10, "--resume")
    assert r.returncode == 0, r.stderr
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == STEPS + 10


def test_a_rewind_run_again_after_a_kill_keeps_its_abandoned_records_once(tmp_path):
    """A rewind killed after appending the abandoned records to metrics.rewound.jsonl, but before rewriting
    metrics.jsonl, appended them a second time when run again."""
    from lvmae_fast.run_metrics import truncate_metrics

    metrics, rewound = tmp_path / "metrics.jsonl", tmp_path / "metrics.rewound.jsonl"
    records = [{"step": s, "loss": 1.0 / s, "time_s": 0.1 * s} for s in range(1, 13)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    truncate_metrics(metrics, 8, keep_dropped=rewound)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))  # as if killed before the rewrite
    truncate_metrics(metrics, 8, keep_dropped=rewound)
    assert [r["step"] for r in read_metrics(rewound)] == [9, 10, 11, 12]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 9))
