"""transformers-based encoders (`clip-mean`, `xclip`): weights only from a local directory.

The directory is what `save_pretrained` writes (config.json + model.safetensors / pytorch_model.bin),
plus tokenizer files for the text tower and optionally the image processor's settings (mean/std/size):
preprocessor_config.json, or the "image_processor" entry of processor_config.json (transformers 5).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ...checkpoint import read_json
from .base import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VideoEncoder, captions, channel_stats,
                   pooled)


def offline_transformers():
    """Import transformers with the hub switched off: weights never download at run time."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:
        raise ValueError("this encoder needs transformers: pip install 'lvmae_fast[encoders]'") from err
    return transformers


def require_dir(weights, name: str) -> Path:
    if not weights:
        raise ValueError(f"encoder {name!r} needs --weights DIR (a local checkpoint directory; "
                         "nothing is downloaded)")
    path = Path(weights)
    if path.is_file():
        raise ValueError(f"encoder {name!r}: --weights {path} is a file; --weights must be the checkpoint "
                         "directory (the one holding config.json and the weight files)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder {name!r}: {path}/config.json not found (expected a "
                                "save_pretrained directory)")
    return path


def require_model_type(path: Path, name: str, expected: str, what: str) -> dict:
    """config.json, refused unless its model_type is `expected`; returns it."""
    cfg = read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ValueError(f"encoder {name!r}: {path}/config.json has no model_type (expected {expected!r}, "
                         f"{what})")
    if model_type != expected:
        raise ValueError(f"encoder {name!r}: {path} holds a {model_type!r} checkpoint, not {expected!r} ({what})")
    return cfg


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# transformers' preprocessor_config.json names the resize filter by its PIL code.
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
# Steps of the processor that frames_to_input always takes, and what it does instead of skipping them.
ALWAYS_DONE = {"do_resize": "resized, then centre cropped to {size}x{size}",
               "do_center_crop": "resized, then centre cropped to {size}x{size}",
               "do_rescale": "scaled to [0, 1], then normalised by the mean/std",
               "do_normalize": "scaled to [0, 1], then normalised by the mean/std"}


def processor_settings(path: Path) -> tuple[str, dict] | None:
    """The checkpoint's image processor settings and where they came from, as transformers 5 reads them:
    the "image_processor" entry of processor_config.json (what CLIPProcessor / AutoProcessor.save_pretrained
    write, with no preprocessor_config.json) first, else preprocessor_config.json (what transformers 4 and
    an image processor's own save_pretrained write); None when neither holds them."""
    nested = path / "processor_config.json"
    if nested.is_file():
        settings = read_json(nested).get("image_processor")
        if isinstance(settings, dict):
            return f"{nested} (image_processor)", settings
    flat = path / "preprocessor_config.json"
    if flat.is_file():
        return str(flat), read_json(flat)
    return None


def normalisation(path: Path, default_size: int, mean=CLIP_MEAN, std=CLIP_STD,
                  resample: str = "bilinear") -> tuple[tuple, tuple, int, str, int | tuple[int, int] | None]:
    """mean, std, crop size, resize filter and resize size (the shorter side, an exact (height, width),
    or None: the crop size) from the checkpoint's image processor settings when present (processor_settings),
    the model's own defaults otherwise."""
    found = processor_settings(path)
    if found is None:
        return mean, std, default_size, resample, None
    cfg_file, cfg = found
    size = _crop_size(cfg.get("crop_size", default_size), cfg_file)
    code = cfg.get("resample")
    if code is not None and code not in PIL_RESAMPLE:
        raise ValueError(f"{cfg_file}: resample={code!r} is not supported (2 = bilinear, 3 = bicubic)")
    for step, done in ALWAYS_DONE.items():
        if cfg.get(step) is False:
            raise ValueError(f"{cfg_file}: {step}=false is not supported (frames are always "
                             f"{done.format(size=size)}, as the encoder's input)")
    resize = _resize_size(cfg.get("size"), cfg_file)
    if resize is not None and (min(resize) if isinstance(resize, tuple) else resize) < size:
        raise ValueError(f"{cfg_file}: size={cfg['size']!r} is smaller than crop_size {size}")
    mean = channel_stats(cfg["image_mean"], "image_mean", cfg_file) if "image_mean" in cfg else mean
    std = channel_stats(cfg["image_std"], "image_std", cfg_file) if "image_std" in cfg else std
    scale = rescale_to_unit(cfg.get("rescale_factor", 1 / 255), cfg_file)
    if scale != 1.0:  # (x * f - mean) / std == (x / 255 - mean / s) / (std / s), s = 255 f: one normalisation
        mean, std = tuple(m / scale for m in mean), tuple(d / scale for d in std)
    return mean, std, size, PIL_RESAMPLE.get(code, resample), resize


def rescale_to_unit(factor, cfg_file) -> float:
    """A processor's rescale_factor relative to frames_to_input's 1/255 (1.0 for 1/255 as JSON writes it)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"{cfg_file}: rescale_factor={factor!r} must be a positive number")
    scale = 255.0 * factor
    return 1.0 if math.isclose(scale, 1.0, rel_tol=1e-9) else scale


def _crop_size(crop, cfg_file) -> int:
    """A processor's crop_size (an int or {"height": S, "width": S}) as the square input side."""
    if isinstance(crop, dict) and set(crop) <= {"height", "width"} and len(set(crop.values())) == 1:
        crop = next(iter(crop.values()))
    if not isinstance(crop, int) or isinstance(crop, bool) or crop < 1:
        raise ValueError(f"{cfg_file}: crop_size={crop!r} is not supported (an int or a square "
                         "{\"height\": S, \"width\": S}, the encoder's input side)")
    return crop


def _resize_size(size, cfg_file: Path) -> int | tuple[int, int] | None:
    """A processor's `size` as frames_to_input's `resize`: an int or {"shortest_edge": S} resize the
    shorter side to S; {"height": H, "width": W} resizes to exactly H x W."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"])
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"{cfg_file}: size={size!r} is not supported (an int, {{\"shortest_edge\": S}} or "
                     "{\"height\": H, \"width\": W})")


# Vocabulary files of the tokenizers these checkpoints ship (fast, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


class HFTextTower:
    """Lazy tokenizer: only needed for retrieval, so a video-only checkpoint dir still extracts."""

    def __init__(self, path: Path, name: str, tokenizer_class: str | None = None):
        # tokenizer_class: a transformers class to load the files with; None = AutoTokenizer, which picks
        # it from tokenizer_config.json / config.json (and fails on a model type it does not know).
        self.path, self.name, self.tokenizer_class, self._tok = path, name, tokenizer_class, None

    def tokenize(self, texts, device, max_length: int, padding: bool | str = True):
        if self._tok is None:
            # transformers 5 builds an *empty* tokenizer from config.json alone (every word becomes
            # the end-of-text token, no error): require a vocabulary file first.
            if not any((Path(self.path) / f).is_file() for f in TOKENIZER_FILES):
                raise ValueError(f"encoder {self.name!r}: no tokenizer in {self.path} (none of "
                                 f"{', '.join(TOKENIZER_FILES)}); copy the checkpoint's tokenizer files there")
            transformers = offline_transformers()
            try:
                loader = getattr(transformers, self.tokenizer_class or "AutoTokenizer")
                self._tok = loader.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(f"encoder {self.name!r}: no tokenizer in {self.path} ({err})") from None
        batch = self._tok(captions(texts), padding=padding, truncation=True, max_length=max_length,
                          return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


class TextTowerEncoder(VideoEncoder):
    """A video encoder whose text tower is a transformers `get_text_features` (CLIP-style)."""

    def load_pretrained(self, model_class: str, weights) -> Path:
        """self.model from a local save_pretrained directory (never the hub); returns the directory."""
        path = require_dir(weights, self.name)
        model_cls = getattr(offline_transformers(), model_class)
        # transformers loads another architecture's checkpoint, or one without the vision tower, with a
        # warning and random weights where tensors are missing: refuse both.
        require_model_type(path, self.name, model_cls.config_class.model_type, model_class)
        try:
            self.model, info = model_cls.from_pretrained(str(path), local_files_only=True,
                                                         output_loading_info=True)
        except OSError as err:  # no weight file ("Error no file named model.safetensors..."): say whose
            raise ValueError(f"encoder {self.name!r}: cannot load the checkpoint at {path}: "
                             f"{first_line(err)}") from None
        missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"encoder {self.name!r}: {path} lacks {len(missing)} tensors of the {model_class} "
                             f"(e.g. {', '.join(missing[:3])}); they would be random")
        # Tensors the model has no place for: a config.json with fewer layers (or a smaller tower) than the
        # weights loads a cut-down network, with a warning only. (Keys transformers knows to be harmless,
        # such as old checkpoints' position_ids buffers, are not reported here.)
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith("position_ids"))
        if unexpected:
            raise ValueError(f"encoder {self.name!r}: {path} holds {len(unexpected)} tensors the {model_class} "
                             f"of its config.json has no place for (e.g. {', '.join(unexpected[:3])}); does "
                             "config.json belong to these weights?")
        self.model.eval()
        return path

    def take_preprocessing(self, path: Path, mean, std, resample: str) -> None:
        """The checkpoint's image processor settings (normalisation), defaults for what it leaves out. Its
        crop must be the vision model's input side: transformers refused another size only at the first
        batch ("Input image size (24*24) doesn't match model (32*32)"), after the store was made."""
        side = self.model.config.vision_config.image_size
        self.mean, self.std, self.image_size, self.resample, self.resize = normalisation(
            path, side, mean, std, resample)
        if self.image_size != side:
            raise ValueError(f"encoder {self.name!r}: {path}: the image processor's crop_size {self.image_size} "
                             f"is not the vision model's image_size {side} (config.json), its input side")

    def attach_text_tower(self, path: Path, tokenizer_class: str | None = None) -> None:
        self.text = HFTextTower(path, self.name, tokenizer_class)
        self.max_text = self.model.config.text_config.max_position_embeddings

    def encode_text(self, texts):
        if not texts:  # the tokenizer and the model take no empty batch
            return torch.empty(0, self.dim, device=self.model.device, dtype=self.model.dtype)
        batch = self.text.tokenize(texts, self.model.device, self.max_text)
        return pooled(self.model.get_text_features(**batch))


class CLIPMeanEncoder(TextTowerEncoder):
    """CLIP image features of each of the T frames, averaged: a strong frame-level baseline."""
    name = "clip-mean"
    resample = "bicubic"  # CLIPImageProcessor's, unless the checkpoint's processor settings say otherwise

    def __init__(self, weights):
        super().__init__()
        path = self.load_pretrained("CLIPModel", weights)
        cfg = self.model.config
        self.dim = cfg.projection_dim
        self.take_preprocessing(path, CLIP_MEAN, CLIP_STD, type(self).resample)
        self.attach_text_tower(path)

    def encode_video(self, pixels_NTCHW):
        N, T = pixels_NTCHW.shape[:2]
        feats = pooled(self.model.get_image_features(pixel_values=pixels_NTCHW.flatten(0, 1)))
        return feats.reshape(N, T, -1).mean(dim=1)


class XCLIPEncoder(TextTowerEncoder):
    """X-CLIP video features (cross-frame attention + multi-frame integration); T fixed by the config.

    Text: X-CLIP's full model conditions text on the video (prompt generator); the retrieval space
    here is the unconditioned text projection, comparable across videos."""
    name = "xclip"

    def __init__(self, weights):
        super().__init__()
        path = self.load_pretrained("XCLIPModel", weights)
        cfg = self.model.config
        self.dim = cfg.projection_dim
        self.num_frames = cfg.vision_config.num_frames
        # microsoft/xclip-* preprocessor_config.json: ImageNet mean/std (not CLIP's).
        # (and VideoMAEImageProcessor's bilinear resize)
        self.take_preprocessing(path, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        self.attach_text_tower(path)

    def encode_video(self, pixels_NTCHW):
        return pooled(self.model.get_video_features(pixel_values=pixels_NTCHW))


def build_clip_mean(weights=None, **_):
    return CLIPMeanEncoder(weights)


def build_xclip(weights=None, **_):
    return XCLIPEncoder(weights)
