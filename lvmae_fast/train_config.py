"""Pretraining config: one flat dataclass, presets, YAML files, `--set key=value` overrides.

Precedence (later wins): preset defaults < `--config FILE` < `--set key=value` < explicit CLI flags.
Unknown keys are an error everywhere. `model` is a mapping of LVMAEConfig overrides (mask_ratio,
masking, loss, ...); widths/depths come from the preset and the input dim from the store.
The resolved config is written to RUN/config.yaml; `--resume` starts from that file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

# Training recipe per preset. paper = Table 5 (AdamW .9/.95, wd .05, blr 1.5e-4, batch 16, 150 epochs,
# 40 warmup, 256 tokens, 5 s segments); tiny = a CPU-sized model and a recipe that learns in minutes.
PRESETS: dict[str, dict] = {
    "paper": dict(epochs=150, warmup_epochs=40, batch_videos=16, blr=1.5e-4, duration_min=10.0, duration_max=1280.0,
                  max_len=256),
    "base": dict(epochs=150, warmup_epochs=40, batch_videos=16, blr=1.5e-4, duration_min=10.0, duration_max=1280.0,
                 max_len=256),
    "tiny": dict(epochs=20, warmup_epochs=2, batch_videos=8, blr=3.2e-2, duration_min=10.0, duration_max=320.0,
                 max_len=64, num_workers=0, ckpt_every=50, eval_every=50, cpu_threads=1),
}

# Keys a resumed run may change: bookkeeping that does not change what is computed, plus the knobs one
# turns after a divergence (lr, clipping) and the device. Any other difference is refused on --resume.
RESUME_MUTABLE = frozenset({"store", "out", "max_steps", "num_workers", "prefetch_factor", "log_every", "ckpt_every",
                            "keep_checkpoints", "tensorboard", "progress", "compile", "cuda_graphs",
                            "cuda_graphs_optimizer", "eval_every", "device",
                            "blr", "lr", "min_lr", "grad_clip"})


@dataclass
class PretrainConfig:
    preset: str = "tiny"
    store: str = ""
    out: str = ""
    model: dict = field(default_factory=dict)   # LVMAEConfig overrides, e.g. {mask_ratio: 0.4, masking: random}
    # data (sampler.SamplerConfig)
    duration_min: float = 10.0
    duration_max: float = 1280.0
    max_len: int = 256
    short_video_policy: str = "repeat"          # repeat (reference) | keep | drop
    batch_videos: int = 16
    max_tokens: int = 0                         # >0: token-budget batches instead of batch_videos
    val_videos: int = 0                         # held-out videos for a fixed-crop validation loss
    bad_videos: str = "error"                   # videos with NaN/Inf rows: error (refuse to train) | skip
    # optimisation (paper Table 5)
    epochs: int = 150
    warmup_epochs: float = 40.0
    blr: float = 1.5e-4                         # lr = blr * effective batch / 256 unless lr is set
    lr: float = 0.0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0                      # max grad norm; 0 = off
    # runtime
    seed: int = 0
    max_steps: int = 0                          # stop after this many optimizer steps in total; 0 = all epochs
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    precision: str = "auto"                     # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    cuda_graphs: bool = False                   # bucketed batch shapes + one CUDA graph per shape (graphs.py):
                                                # removes the launch overhead that bounds small-batch steps
    cuda_graphs_optimizer: bool = False         # with cuda_graphs: capture the update too (whole-step graphs:
                                                # gradients live only inside the step; see graphs.py)
    cpu_threads: int = 0                        # torch intra-op threads; 0 = torch's default. Tiny ops run
                                                # fastest on one thread (no sync), and it keeps CPU results exact
    num_workers: int = 2
    prefetch_factor: int = 4
    log_every: int = 1
    ckpt_every: int = 500
    eval_every: int = 0                         # steps between validation passes (0: only at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.bad_videos not in ("error", "skip"):
            raise ValueError(f"bad_videos={self.bad_videos!r} must be 'error' or 'skip'")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r} must be auto, bf16 or fp32")
        if self.epochs < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"need epochs >= 1 and 0 <= warmup_epochs <= epochs (got {self.epochs}, {self.warmup_epochs})")
        if min(self.log_every, self.ckpt_every, self.keep_checkpoints) < 1 or min(self.max_steps, self.eval_every) < 0:
            raise ValueError("log_every, ckpt_every and keep_checkpoints must be >= 1; max_steps, eval_every >= 0")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile and cuda_graphs are alternatives (both cut launch overhead); choose one")
        if self.cuda_graphs_optimizer and not self.cuda_graphs:
            raise ValueError("cuda_graphs_optimizer captures the update into the CUDA graphs: it needs cuda_graphs=true")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of model config overrides, got {self.model!r}")

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_TYPES = {f.name: f.type for f in fields(PretrainConfig)}


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}")


def _coerce(key: str, value):
    """YAML/--set values to the field's type (so `--set epochs=3` is an int, `--set compile=true` a bool)."""
    kind = FIELD_TYPES[key]
    if isinstance(value, str) and kind != "str":
        value = yaml.safe_load(value)
    try:
        if kind == "int" and not isinstance(value, bool) and float(value) == int(value):
            return int(value)
        if kind == "float" and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        pass
    if kind == "bool" and isinstance(value, bool) or kind == "dict" and isinstance(value, dict):
        return value
    if kind == "str":
        return str(value)
    raise ValueError(f"config key {key}: expected {kind}, got {value!r}")


def parse_set(items: list[str]) -> dict:
    """['a=1', 'model.mask_ratio=0.4'] -> {'a': '1', 'model': {'mask_ratio': 0.4}}."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key = key.strip()
        if key.startswith("model."):
            out.setdefault("model", {})[key[len("model."):]] = yaml.safe_load(value)
        else:
            out[key] = value
    return out


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return values


def resolve(layers: list[tuple[str, dict]]) -> PretrainConfig:
    """Merge (source name, values) layers over the chosen preset's defaults; unknown keys raise."""
    merged: dict = {"model": {}}
    for where, values in layers:
        _check_keys(values, where)
        for key, value in values.items():
            value = _coerce(key, value)
            merged[key] = {**merged.get("model", {}), **value} if key == "model" else value
    preset = merged.get("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    # Preset defaults sit under every layer that did not set the key explicitly.
    return PretrainConfig(**{**PRESETS[preset], **merged})


def dump_yaml(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def resume_conflicts(saved: dict, current: PretrainConfig) -> list[str]:
    """Keys whose change would make a resumed run compute something else than the saved one."""
    now = current.to_dict()
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {now[k]!r}"
            for k in now if k not in RESUME_MUTABLE and saved.get(k) != now[k]]
