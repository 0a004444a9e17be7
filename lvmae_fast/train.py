"""`lvmae pretrain`: LV-MAE pretraining on an embedding store, with exact resume.

Resume is exact: the sampler is a pure function of (seed, epoch, batch index), the lr of (epoch, batch
index), and model/optimizer/RNG state is restored bit for bit, so an interrupted and resumed run logs the
same losses as an uninterrupted one. The run directory (its layout, checkpoint writes, rewinds, lock):
run_dir.py; metrics.jsonl, val.json and the loss plot: run_metrics.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from . import train_config as tc
from .atomic import WriteError, atomic_write_text, remove_stale_temps
from .checkpoint import WEIGHTS_NAME, read_safetensors
from .devices import resolve_device
from .graphs import GraphedTrainStep, fused_step, grad_norm_, nonfinite
from .model import LVMAE, LVMAEConfig
from .run_dir import (RUN_ENTRIES, STATE_NAME, RunDirLock, check_run_dir, checkpoint_by_name, complete_checkpoints,
                      damaged_checkpoint, latest_checkpoint, load_train_state, needs_rewind, rewind_to, save_checkpoint,
                      set_rng_state)
from .run_metrics import Throughput, drop_later_val, log_metrics, plot_loss, read_metrics, truncate_metrics, write_val
from .sampler import VAL_EPOCH, LongVideoSampler, kept_by_policy, max_crop_segments, split_videos
from .store import Store, scan_nonfinite
from .tb_log import TensorBoardLog

log = logging.getLogger(__name__)
EXIT_NONFINITE, EXIT_SIGNAL = 3, {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---- learning rate ------------------------------------------------------------------------------
def lr_at(epoch_progress: float, base_lr: float, cfg: tc.PretrainConfig) -> float:
    """MAE schedule, per iteration: linear warmup, then half-cycle cosine to min_lr (epoch_progress in epochs)."""
    if epoch_progress < cfg.warmup_epochs:
        return base_lr * epoch_progress / cfg.warmup_epochs
    span = cfg.epochs - cfg.warmup_epochs
    t = (epoch_progress - cfg.warmup_epochs) / span if span > 0 else 0.0
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---- step scalars ----------------------------------------------------------------------------------
class HostScalars:
    """Device scalars on their way to the host: the copy is queued now (into pinned memory, behind an
    event), so reading them later waits only for the work queued before it. (A plain .item() would
    wait for everything queued on the stream since, e.g. the next step's forward/backward.)"""

    def __init__(self, *scalars: torch.Tensor):
        stacked = torch.stack([s.detach().float().reshape(()) for s in scalars])
        self.event = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


# ---- signals ------------------------------------------------------------------------------------
class StopFlag:
    """First SIGINT/SIGTERM asks for a checkpoint and a clean exit; a second one interrupts at once."""

    def __init__(self):
        self.signum = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after the current step", signal.Signals(signum).name)

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# ---- the run ------------------------------------------------------------------------------------
def build_model_config(cfg: tc.PretrainConfig, in_dim: int) -> LVMAEConfig:
    allowed = {f.name for f in fields(LVMAEConfig)} - {"in_dim"}
    unknown = sorted(set(cfg.model) - allowed)
    if unknown:
        raise ValueError(f"model: unknown keys {unknown} (allowed: {sorted(allowed)})")
    return LVMAEConfig.from_preset(cfg.preset, in_dim=in_dim, **cfg.model)


def training_videos(store: Store, cfg: tc.PretrainConfig) -> list[str]:
    """Store ids minus videos with NaN/Inf rows (bad_videos=skip); bad_videos=error refuses to train."""
    bad = scan_nonfinite(store)
    if not bad:
        return list(store.video_ids)
    names = ", ".join(sorted(bad)[:20]) + (" ..." if len(bad) > 20 else "")
    if cfg.bad_videos == "error":
        raise ValueError(f"{len(bad)} videos in {store.path} hold NaN/Inf rows ({names}); see `lvmae store verify`, "
                         f"or pass --set bad_videos=skip to train without them")
    log.warning("skipping %d videos with NaN/Inf rows: %s", len(bad), names)
    return [v for v in store.video_ids if v not in bad]


def check_something_to_mask(store: Store, train_ids: list[str], cfg: tc.PretrainConfig, mask_ratio: float) -> None:
    """short_video_policy=keep leaves 1-segment videos as 1-token crops: keep = max(1, ...) = 1, nothing
    is masked, so they add no loss. Refuse a run made only of them; warn about some."""
    if cfg.short_video_policy != "keep" or mask_ratio <= 0:
        return
    single = sum(store.num_segments(v) == 1 for v in train_ids)
    if single and single == len(train_ids):
        raise ValueError(f"all {single} training videos have 1 segment: with short_video_policy=keep nothing is "
                         "masked and the loss is 0 at every step; use short_video_policy=repeat")
    if single:
        log.warning("%d of %d training videos have 1 segment: with short_video_policy=keep they add no loss",
                    single, len(train_ids))


def check_crop_durations(store: Store, cfg: tc.PretrainConfig) -> None:
    """A crop spans floor(duration / segment seconds) segments; when no drawn duration reaches 2 of the
    store's segments every crop is 1 segment, keep = max(1, ...) leaves it whole and the loss is 0.
    short_video_policy=repeat does tile crops of videos under 5 segments (x3, x8), which would give masked
    tokens, but they are copies of the one visible segment (and longer videos still mask nothing):
    nothing to learn either, so such durations are refused under every policy."""
    seconds = store.segment_seconds
    if max_crop_segments(cfg.duration_min, cfg.duration_max, seconds) >= 2:
        return
    raise ValueError(
        f"duration_min={cfg.duration_min:g} s / duration_max={cfg.duration_max:g} s: crops last at least duration_min "
        f"and less than duration_max seconds, which with this store's {seconds:g}-second segments ({store.path}) is "
        f"never 2 segments, so every crop is 1 segment and nothing is masked (the loss would be 0; "
        f"short_video_policy=repeat would only tile videos under 5 segments into copies of one segment). "
        f"Raise duration_max above {2 * seconds:g} s (2 segments; the {cfg.preset} preset's is "
        f"{tc.PRESETS[cfg.preset]['duration_max']:g} s)")


def check_model_backends(model_cfg: LVMAEConfig, device: torch.device, dtype: torch.dtype) -> None:
    """model.attn_impl / model.kernels that cannot run on this device, dtype and install (flash without
    flash-attn, torch_varlen or triton on the CPU...) are refused before RUN is written: the first
    forward would raise them after config.yaml, and the rerun would then be refused as an existing run."""
    from . import kernels
    from .attention import resolve_impl

    try:
        for head_dim in model_cfg.head_dims:   # encoder's, decoder's
            resolve_impl(model_cfg.attn_impl, device, dtype, head_dim)
        kernels.use_triton(model_cfg.kernels, torch.empty(0, device=device))
    except RuntimeError as err:
        raise ValueError(f"model config on {device} ({str(dtype).replace('torch.', '')}): {err}") from None


def evaluate(model, sampler: LongVideoSampler, device, autocast, num_workers: int) -> float | None:
    """Mean masked loss over the held-out videos (fixed crops and masks), weighted by masked tokens."""
    model.eval()
    total, weight = 0.0, 0
    with torch.no_grad():
        for batch in sampler.loader(VAL_EPOCH, num_workers=num_workers):
            with autocast():
                loss = model(batch.to(device))
            n = int(batch.masked[: batch.num_tokens].sum())  # real masked rows (padding excluded)
            total, weight = total + float(loss) * n, weight + n
    model.train()
    return total / weight if weight else None  # nothing masked: no loss was measured




# Model settings that only pick an implementation of the same math (as compile, cuda_graphs and device do
# for the run): a run started on flash/torch_varlen must resume on a machine without them.
BACKEND_MODEL_KEYS = ("attn_impl", "kernels")


def check_model_config_resumes(out, saved: dict, now: dict) -> None:
    """Refuse a resume whose model differs from the checkpoint's, naming the keys; backends may change."""
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in BACKEND_MODEL_KEYS)
    if changed:
        raise ValueError(f"cannot resume {out}: the model differs from the checkpoint's: " + ", ".join(
            f"model.{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}" for k in changed))
    backends = [k for k in BACKEND_MODEL_KEYS if saved.get(k) != now.get(k)]
    if backends:
        log.info("resuming with changed backends: %s", ", ".join(f"model.{k}={now.get(k)}" for k in backends))


def pretrain(cfg: tc.PretrainConfig, resume: bool = False, resume_from: str | None = None) -> int:
    """Train per cfg; returns an exit code (0 done, 3 non-finite loss, 130/143 interrupted).
    resume_from: a checkpoint of the run ('step-N' or N) to continue from instead of the latest (a
    rewind, e.g. past a non-finite step with a lower lr); implies resume."""
    lock = RunDirLock()
    try:
        return _pretrain(cfg, resume, resume_from, lock)
    finally:
        lock.release()


def _pretrain(cfg: tc.PretrainConfig, resume: bool, resume_from: str | None, lock: RunDirLock) -> int:
    if not cfg.store or not cfg.out:
        raise ValueError("pretrain needs --store STORE and --out RUN")
    resume = resume or resume_from is not None
    # Absolute paths in the run's config.yaml: --resume may be run from another working directory.
    cfg = dataclasses.replace(cfg, store=os.path.realpath(cfg.store), out=os.path.realpath(cfg.out))
    out = Path(cfg.out)
    check_run_dir(out, Path(cfg.store), resume)
    if out.is_dir():
        lock.take(out)
    store = Store(cfg.store)
    if len(store) == 0:
        raise ValueError(f"store {cfg.store} holds no videos")
    check_crop_durations(store, cfg)  # needs the store's segment length

    # Everything that can refuse the run is checked before anything is written to RUN.
    if resume_from is not None:  # not latest_checkpoint(): a killed rewind may have moved what it names
        ckpt = checkpoint_by_name(out, str(resume_from))
        rewind = needs_rewind(out, ckpt)
    else:
        ckpt, rewind = (latest_checkpoint(out) if out.exists() else None), False
    state = None
    if resume and ckpt is not None:
        state = load_train_state(ckpt)
        conflicts = tc.resume_conflicts(state["config"], cfg)
        if conflicts:
            raise ValueError(f"cannot resume {out}: its checkpoint was trained with another config: " + "; ".join(conflicts))
        if state["store_fingerprint"] not in (store.fingerprint, store.layout_fingerprint):
            raise ValueError(f"cannot resume {out}: store {cfg.store} is not the store it was trained on "
                             f"(index fingerprint differs)")
        changed = [k for k in tc.RESUME_MUTABLE if k not in ("store", "out") and state["config"].get(k) != getattr(cfg, k)]
        if changed:
            log.info("resuming with changed settings: %s", ", ".join(sorted(changed)))
    model_cfg = build_model_config(cfg, store.dim)
    if state is not None:
        check_model_config_resumes(out, state["model_config"], model_cfg.to_dict())
    device = resolve_device(cfg.device)
    use_graphs, use_whole_step = cfg.graphs_for(device.type)
    if device.type == "cuda" and "auto" in (cfg.cuda_graphs, cfg.cuda_graphs_optimizer):
        log.info("cuda_graphs=%s, cuda_graphs_optimizer=%s (auto on %s, %d videos per batch%s)",
                 use_graphs, use_whole_step, device.type, cfg.batch_videos,
                 ", max_tokens set" if cfg.max_tokens else "")
    scfg = cfg.sampler_config(model_cfg, pad_to_buckets=use_graphs)
    train_ids, val_ids = split_videos(training_videos(store, cfg), cfg.val_videos, cfg.seed)
    check_something_to_mask(store, train_ids, cfg, model_cfg.mask_ratio)
    sampler = LongVideoSampler(store, train_ids, scfg)
    val_lengths = np.array([store.num_segments(v) for v in val_ids])
    held_out = len(val_ids)  # neither trained nor, where short_video_policy leaves them out, validated on
    if val_ids and not (kept_by_policy(val_lengths, cfg.short_video_policy, model_cfg.mask_ratio)
                        & ((val_lengths >= 2) | (cfg.short_video_policy == "repeat"))).any():
        # drop: the sampler would drop every one of them and refuse to start; keep: their 1-token crops mask
        # nothing, and a loss of 0 would be reported. Train without validation instead.
        why = {"keep": "keeps 1-segment videos whole (nothing to mask), and all of them have 1 segment",
               "drop": "leaves out 1-segment videos, and all of them have 1 segment"}.get(
            cfg.short_video_policy, f"leaves out videos of n segments with n x (1 - mask_ratio) < 1 (mask_ratio "
                                    f"{model_cfg.mask_ratio:g}), and all of them are")
        log.warning("validation off: none of the %d held-out videos can be validated: short_video_policy=%s %s",
                    len(val_ids), cfg.short_video_policy, why)
        val_ids = []
    val_sampler = LongVideoSampler(store, val_ids, scfg) if val_ids else None
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    check_model_backends(model_cfg, device, torch.bfloat16 if use_bf16 else torch.float32)

    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    model = LVMAE(model_cfg)
    if state is not None:
        try:
            model.load_state_dict(read_safetensors(ckpt / WEIGHTS_NAME))
        except Exception as err:  # noqa: BLE001 - a cut or damaged file (safetensors' own error types)
            raise damaged_checkpoint(ckpt, WEIGHTS_NAME, err) from None
    model.to(device).train()
    effective_batch = sampler.mean_videos_per_batch()
    base_lr = cfg.lr or cfg.blr * effective_batch / 256
    if cfg.min_lr > base_lr:  # the half-cycle "decay" would climb from the peak to min_lr
        raise ValueError(f"min_lr={cfg.min_lr:g} exceeds the peak learning rate {base_lr:g} ("
                         + ("lr" if cfg.lr else f"blr x {effective_batch:g} videos per batch / 256")
                         + "): the schedule decays from the peak to min_lr; lower min_lr")
    # Fused on every device: its found_inf input lets a non-finite step be skipped without a host sync.
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=base_lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    progress = {"step": 0, "epoch": 0, "batch": 0}
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:  # parameter groups of another shape: saved by an older lvmae_fast
            raise damaged_checkpoint(ckpt, f"{STATE_NAME} (optimizer state)", ValueError(
                f"{err}: it was saved with other AdamW parameter groups (before 2026-11-27 the cls/mask tokens "
                "had no weight decay; now they decay, as in the reference)")) from None
        set_rng_state(state["rng"])
        progress = dict(state["progress"])
    if cfg.compile:
        model.compile_blocks()  # per-block, in place: state-dict names and checkpoints are unchanged
    graphed_step = None
    overlapped = cfg.overlap_update and use_graphs and use_whole_step  # it overlaps the whole-step graphs' update
    if cfg.overlap_update and not overlapped:
        log.warning("overlap_update: off on %s, where whole-step graphs are off (it overlaps their update)", device)
    if use_graphs:
        if device.type != "cuda":
            log.warning("cuda_graphs: %s has no CUDA graphs; running the same shape-bucketed step eagerly", device)
        graphed_step = GraphedTrainStep(model, autocast_dtype=torch.bfloat16 if use_bf16 else None,
                                        capture=device.type == "cuda",
                                        optimizer=optimizer if use_whole_step else None,
                                        grad_clip=cfg.grad_clip, overlap_update=overlapped)
    whole_step = graphed_step is not None and graphed_step.optimizer is not None

    out.mkdir(parents=True, exist_ok=True)
    if not lock.held:  # a new run dir: another run may have made it since the check above
        lock.take(out)
        check_run_dir(out, Path(cfg.store), resume)
        if latest_checkpoint(out) is not None:   # (with --resume an empty dir passes: not one a run has used)
            raise ValueError(f"{out} was started by another run meanwhile; pass --resume to continue it")
    remove_stale_temps(out, RUN_ENTRIES)  # a killed run's half-written config.yaml, loss.png, ... (lock held)
    if rewind:
        rewind_to(out, ckpt)
    atomic_write_text(out / "config.yaml", tc.dump_yaml(cfg))
    metrics_path = out / "metrics.jsonl"
    if resume:  # drop records logged after the checkpoint (all of them when there is none yet)
        truncate_metrics(metrics_path, progress["step"])
        drop_later_val(out, progress["step"])
    tb = TensorBoardLog(out / "tb", purge_step=progress["step"] + 1 if resume else None) if cfg.tensorboard else None

    full = sum(sampler.num_batches(e) for e in range(cfg.epochs))  # where the lr schedule ends
    total_steps = min(full, cfg.max_steps) if cfg.max_steps else full
    if progress["step"] >= total_steps:
        hint = (f"raise --max-steps (up to {full}, where its {cfg.epochs}-epoch schedule ends) to train further"
                if progress["step"] < full else
                f"its {cfg.epochs}-epoch lr schedule is complete (the epoch count is fixed for a run)")
        print(f"lvmae pretrain: nothing to do: {out} is already at step {progress['step']} of {total_steps}; {hint}",
              file=sys.stderr)
    left_out = len(train_ids) - len(sampler.video_ids)  # by short_video_policy
    validated = len(val_sampler.video_ids) if val_sampler is not None else 0
    log.info("pretraining %s (%.2fM params, in_dim %d) on %d videos (%d held out%s%s) from %s; %d steps, lr %.3g, "
             "device %s%s", cfg.preset, model.num_params() / 1e6, store.dim, len(sampler.video_ids), held_out,
             f", {validated} of them validated" if validated != held_out else "",
             f", {left_out} too short for short_video_policy={cfg.short_video_policy}" if left_out else "",
             store.path, total_steps, base_lr, device, f", resuming at step {progress['step']}" if state is not None else "")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    pin = device.type == "cuda"

    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal (CI logs, `2>log`); the log lines say the same.
    bar = tqdm(total=total_steps, initial=progress["step"], unit="step", dynamic_ncols=True,
               disable=None if cfg.progress else True, file=sys.stderr)
    stop, exit_code = StopFlag(), 0
    earlier = read_metrics(metrics_path) if resume else []
    meter = Throughput(earlier[-1].get("time_s", 0.0) if earlier else 0.0)

    def checkpoint():
        return save_checkpoint(out, model, optimizer, progress, cfg, store.fingerprint)

    # The host never waits for the step it just queued: step k's loss is read back while step k+1's
    # forward/backward runs, and before step k+1's optimizer update is queued. A non-finite step is
    # caught without a sync too: its optimizer update is skipped on the device (fused AdamW's found_inf,
    # the GradScaler mechanism), so when the host sees it the parameters are still those before it.
    # With whole-step graphs the update of step k+1 is queued with its forward/backward, so a pending
    # step k is settled first whenever its bookkeeping reads the model (checkpoint, evaluation, the
    # last step); a non-finite step k is covered by the graphs' sticky skip (graphs.py).
    pending: dict | None = None

    def eval_due(step: int) -> bool:
        # The last step is always evaluated, in its own metrics record (and val.json), not only after the loop.
        return val_sampler is not None and (step == total_steps or cfg.eval_every > 0 and step % cfg.eval_every == 0)

    def reads_model(step: int) -> bool:
        return step % cfg.ckpt_every == 0 or step == total_steps or eval_due(step)

    def rewind_advice(earlier: list[str]) -> str:
        """How to recover from a non-finite step: the command resuming the latest of `earlier` with a
        lower lr, and the checkpoints to choose from."""
        lr_flag = "--lr" if cfg.lr else "--blr"
        lr_now = cfg.lr or cfg.blr
        clip = "--grad-clip 1.0 --set overlap_update=false" if overlapped else "--grad-clip 1.0"
        return (f"Rewind to an earlier checkpoint with a lower lr: `lvmae pretrain --out {out} --resume-from "
                f"{earlier[-1] if earlier else 'step-N'} {lr_flag} {lr_now / 10:.3g}` (now {lr_flag} {lr_now:.3g}; "
                f"add {clip} to bound later steps). Checkpoints before it: "
                f"{', '.join(earlier) or 'none (lower the lr and start again with another --out)'}. "
                f"Check the data with `lvmae store verify {cfg.store}`.")

    def settle(metrics) -> bool:
        """Read back the pending step, count it, log / evaluate / checkpoint when due. False (after
        saving the state before it, which overlap_update may not have kept) when its loss or gradient
        norm was non-finite."""
        nonlocal pending, exit_code
        done, pending = pending, None
        loss_value, grad_norm = done["scalars"].values()
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            # The skipped update left the parameters as they were before this step. Earlier checkpoints
            # are kept (no pruning): this state fails again, so recovery starts from one of them.
            what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})"
            where = f"non-finite {what} at step {progress['step'] + 1} (epoch {done['epoch']}, batch {done['batch']})"
            if overlapped and float(graphed_step.partial_update):  # a host read: on this error path only
                # overlap_update applied the update chunks queued before the non-finite gradient (graphs.py):
                # these weights are no step's state, so none is saved.
                msg = (f"{where} with overlap_update: the update chunks queued before the non-finite gradient were "
                       f"applied, so the weights are neither those before this step nor after it; nothing was saved. "
                       + rewind_advice(complete_checkpoints(out / "checkpoints")))
            else:
                try:
                    path = save_checkpoint(out, model, optimizer, progress, cfg, store.fingerprint, prune=False)
                except WriteError as err:
                    raise err.within(f"non-finite {what} at step {progress['step'] + 1}") from err
                earlier = [n for n in complete_checkpoints(path.parent) if n < path.name]
                msg = (f"{where}. Saved the state before this step to {path}; resuming from it runs the same step on "
                       f"the same weights and fails again, whatever the lr. " + rewind_advice(earlier))
            print(f"lvmae pretrain: error: {msg}", file=sys.stderr)  # once (a log.error too printed it twice)
            exit_code = EXIT_NONFINITE
            return False
        progress.update(step=progress["step"] + 1, epoch=done["epoch"], batch=done["batch"] + 1)
        step = progress["step"]
        meter.add(done["tokens"], done["videos"])
        bar.update(1)
        val_loss = None
        if eval_due(step):
            val_loss = evaluate(model, val_sampler, device, autocast, cfg.num_workers)
            write_val(out, step, val_loss)
        if step % cfg.log_every == 0 or val_loss is not None or step == total_steps:
            record = {"step": step, "epoch": done["epoch"], "loss": loss_value, "lr": done["lr"],
                      **meter.rates(done["finished_at"])}
            record["grad_norm"] = grad_norm
            if val_loss is not None:
                record["val_loss"] = val_loss
            log_metrics(record, metrics, tb)
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % cfg.ckpt_every == 0:
            checkpoint()
        return True

    with stop.installed(), open(metrics_path, "ab", buffering=0) as metrics:
        # One loader for the whole run (workers live across epochs; see sampler.EpochStream).
        stream = sampler.stream(progress["epoch"], progress["batch"], cfg.epochs, num_workers=cfg.num_workers,
                                pin_memory=pin, prefetch_factor=cfg.prefetch_factor)
        items = iter(stream)
        while stop.signum is None and progress["step"] + (pending is not None) < total_steps:
            try:
                epoch, i, batch = next(items)
            except StopIteration:
                break
            except RuntimeError:
                if stop.signum is not None:  # a terminal's Ctrl-C also reached the loader's workers
                    break
                raise
            lr = lr_at(epoch + i / sampler.num_batches(epoch), base_lr, cfg)
            if whole_step:  # forward, backward and update: one graph replay on CUDA
                if pending is not None and reads_model(progress["step"] + 1) and not settle(metrics):
                    break
                graphed_step.set_lr(lr)
                loss = graphed_step(batch)
                scalars = HostScalars(loss, graphed_step.grad_norm)
                if pending is not None and not settle(metrics):
                    break
            else:
                if graphed_step is not None:  # forward + backward (one graph replay on CUDA)
                    loss = graphed_step(batch)
                else:
                    batch = batch.to(device, non_blocking=pin)
                    with autocast():
                        loss = model(batch)
                    loss.backward()
                if pending is not None and not settle(metrics):
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss.detach()
                grad_norm = grad_norm_(list(model.parameters()), cfg.grad_clip)
                scalars = HostScalars(loss, grad_norm)  # queued before the update: no wait on it later
                fused_step(optimizer, nonfinite(loss, grad_norm))
                optimizer.zero_grad(set_to_none=True)
            # On the CPU the step is done once queued (its end is timed here); on CUDA it is done when
            # settle has read its scalars back (timed then).
            finished_at = time.perf_counter() if device.type != "cuda" else None
            pending = {"scalars": scalars, "lr": lr, "epoch": epoch, "batch": i, "finished_at": finished_at,
                       "tokens": batch.num_tokens, "videos": batch.num_videos}
        del items, stream
        if exit_code == 0 and pending is not None:
            settle(metrics)
    bar.close()

    # Still under the handlers: a signal during the final checkpoint, evaluation or plot is noted
    # (a second one interrupts at once) instead of killing the process mid-write.
    with stop.installed():
        signalled = stop.signum is not None
        if exit_code == 0:
            try:
                path = checkpoint()
            except WriteError as err:
                if signalled:
                    raise err.within(f"interrupted by {signal.Signals(stop.signum).name} at step {progress['step']}") from err
                raise
            if signalled:
                exit_code = EXIT_SIGNAL[stop.signum]
                print(f"interrupted at step {progress['step']}; checkpoint {path}; continue with --resume",
                      file=sys.stderr)
            elif val_sampler is not None and not eval_due(progress["step"]):  # else just evaluated
                val_loss = evaluate(model, val_sampler, device, autocast, cfg.num_workers)
                if val_loss is not None:
                    log.info("final val loss %.5g", val_loss)
                    if tb is not None:
                        tb.add_scalar("val/loss", val_loss, progress["step"])
                write_val(out, progress["step"], val_loss)
        if tb is not None:
            tb.close()
        plot = plot_loss(out)
        if not signalled and stop.signum is not None and exit_code == 0:
            exit_code = EXIT_SIGNAL[stop.signum]  # arrived after the last step: everything is saved
    print(f"run dir: {out}\n  metrics: {metrics_path}\n  loss curve: {plot}\n"
          f"  model (LVMAE.from_pretrained): {out}\n  checkpoint: {latest_checkpoint(out)}")
    return exit_code


# ---- CLI ----------------------------------------------------------------------------------------
# Explicit flags: (flag, config key, type, help). Anything else goes through --set key=value.
FLAGS = [
    ("--preset", "preset", str, "model + recipe preset; the defaults of every other option"),
    ("--store", "store", str, "embedding store to train on (lvmae store import / lvmae extract)"),
    ("--out", "out", str, "run directory (config.yaml, metrics.jsonl, TensorBoard, loss.png, checkpoints)"),
    ("--epochs", "epochs", int, "epochs over the training videos"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps in total, counted from the run's start "
                                      "(0 = run all epochs)"),
    ("--seed", "seed", int, "seed for init, crops, masks and batch order"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--batch-videos", "batch_videos", int, "videos per batch"),
    ("--max-tokens", "max_tokens", int, "token budget per packed batch instead of a fixed video count (0 = off)"),
    ("--num-workers", "num_workers", int, "DataLoader workers building packed batches"),
    ("--blr", "blr", float, "base lr; lr = blr * effective batch / 256"),
    ("--lr", "lr", float, "absolute lr (overrides --blr when > 0)"),
    ("--grad-clip", "grad_clip", float, "max gradient norm (0 = off)"),
    ("--precision", "precision", str, "auto: bf16 autocast on CUDA, fp32 on CPU"),
    ("--bad-videos", "bad_videos", str, "videos with NaN/Inf rows: error (refuse to train) or skip them"),
    ("--val-videos", "val_videos", int, "held-out videos for a fixed-crop, fixed-mask validation loss"),
    ("--ckpt-every", "ckpt_every", int, "optimizer steps between checkpoints"),
]


# Flags whose config key takes one of a fixed set of values (a config file is checked by PretrainConfig).
FLAG_CHOICES = {"preset": tuple(tc.PRESETS), "precision": tc.PRECISIONS, "bad_videos": tc.BAD_VIDEOS}


def _flag_default(key: str) -> str:
    """How --help states a flag's default: every unset option comes from the preset (tiny unless
    --preset or a config file names another), so the default preset's value is the one shown."""
    if key == "preset":
        return f"default: {tc.DEFAULT_PRESET}"
    if key in ("store", "out"):
        return "no default"
    defaults = {f.name: f.default for f in fields(tc.PretrainConfig)}
    return f"default from the preset; {tc.DEFAULT_PRESET}: {tc.PRESETS[tc.DEFAULT_PRESET].get(key, defaults[key])}"


def config_from_args(args) -> tc.PretrainConfig:
    layers = []
    for path in args.config or []:  # stacked in order, as --set: a later file overrides an earlier one's keys
        layers.append((path, tc.load_yaml(path)))
    layers.append(("--set", tc.parse_set(args.set)))
    flags = {key: getattr(args, key) for _, key, _, _ in FLAGS if getattr(args, key) is not None}
    if args.compile:
        flags["compile"] = True
    if args.cuda_graphs is not None:
        flags["cuda_graphs"] = args.cuda_graphs
    if args.cuda_graphs_optimizer is not None:
        flags["cuda_graphs_optimizer"] = args.cuda_graphs_optimizer
    if args.overlap_update:
        flags["overlap_update"] = True
    if args.no_progress:
        flags["progress"] = False
    layers.append(("flags", flags))
    if args.resume or args.resume_from:
        # The run's config.yaml goes under every other layer; the run dir may come from any of them (--out,
        # --set out=RUN, a --config file's out:), and `~` in it is the home directory.
        out = next((str(values["out"]) for _, values in reversed(layers) if values.get("out")), "")
        saved = Path(tc.expand_home(out)) / "config.yaml" if out else None
        if saved is not None and saved.is_file():
            layers.insert(0, (str(saved), tc.load_yaml(saved)))
    return tc.resolve(layers)


def _run(args) -> int:
    cfg = config_from_args(args)
    if args.print_config:  # a starting point for --config files
        print(tc.dump_yaml(cfg), end="")
        return 0
    return pretrain(cfg, resume=args.resume, resume_from=args.resume_from)


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain LV-MAE on an embedding store",
                       description="Pretrain LV-MAE. Config precedence: preset < --config < --set < flags "
                                   "(with --resume: preset < the run's config.yaml < --config < --set < flags). "
                                   "Every option left unset takes its value from the preset: "
                                   f"{tc.DEFAULT_PRESET}, unless --preset (or a config file) names another of "
                                   f"{', '.join(tc.PRESETS)}. The defaults shown below are the {tc.DEFAULT_PRESET} "
                                   "preset's; `--preset NAME --print-config` prints every value of a preset. "
                                   "Run dir: config.yaml, metrics.jsonl, tb/, loss.png, val.json (with validation videos), model files, "
                                   "checkpoints/.")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file of config keys, or a preset name (write one to edit with "
                        "--preset paper --print-config > my.yaml); repeatable: later files override earlier ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); model.KEY sets a model config field")
    for flag, key, kind, help_text in FLAGS:
        p.add_argument(flag, dest=key, type=kind, default=None, choices=FLAG_CHOICES.get(key),
                       help=f"{help_text} (config key {key}; {_flag_default(key)})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (with CUDA graphs on, the compiled blocks run inside them)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="pad batches to a few shapes and replay forward+backward as CUDA graphs (config key "
                        "cuda_graphs; default auto: on CUDA for batches of <= 64 videos, without "
                        "--max-tokens; --no-cuda-graphs turns it off)")
    p.add_argument("--cuda-graphs-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with CUDA graphs: capture the optimizer update too, one replay per step (config key "
                        "cuda_graphs_optimizer; default auto: whenever graphs are on on CUDA)")
    p.add_argument("--overlap-update", action="store_true",
                   help="with whole-step graphs: run the AdamW update chunk by chunk on a second stream during "
                        "backward (config key overlap_update; no --grad-clip; 2.4%% faster at batch 16 on an H200, opt-in)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (none either when stderr is not a terminal: logs get plain lines)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (starts fresh if it has none)")
    p.add_argument("--resume-from", metavar="STEP",
                   help="continue the run in --out from an earlier checkpoint (step-N or N), e.g. past a non-finite "
                        "step with a lower --lr; later checkpoints, metrics and validation move aside "
                        "(checkpoints/rewound/, metrics.rewound.jsonl, val.rewound.jsonl)")
    p.set_defaults(func=_run)
