"""transformers-based encoders (`clip-mean`, `xclip`): weights only from a local directory.

The directory is what `save_pretrained` writes (config.json + model.safetensors / pytorch_model.bin),
plus tokenizer files for the text tower and optionally preprocessor_config.json (mean/std/size).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


from .base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VideoEncoder, pooled


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
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"encoder {name!r}: {path}/config.json not found (expected a "
                                "save_pretrained directory)")
    return path


# transformers' preprocessor_config.json names the resize filter by its PIL code.
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def normalisation(path: Path, default_size: int, mean=CLIP_MEAN, std=CLIP_STD,
                  resample: str = "bilinear") -> tuple[tuple, tuple, int, str, int | tuple[int, int] | None]:
    """mean, std, crop size, resize filter and resize size (the shorter side, an exact (height, width),
    or None: the crop size) from preprocessor_config.json when present, the model's own defaults
    otherwise."""
    cfg_file = path / "preprocessor_config.json"
    if not cfg_file.is_file():
        return mean, std, default_size, resample, None
    cfg = json.loads(cfg_file.read_text())
    crop = cfg.get("crop_size", default_size)
    size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
    code = cfg.get("resample")
    if code is not None and code not in PIL_RESAMPLE:
        raise ValueError(f"{cfg_file}: resample={code!r} is not supported (2 = bilinear, 3 = bicubic)")
    for step in ("do_resize", "do_center_crop"):
        if cfg.get(step) is False:
            raise ValueError(f"{cfg_file}: {step}=false is not supported (frames are resized, then centre "
                             f"cropped to {size}x{size}, as the encoder's input)")
    resize = _resize_size(cfg.get("size"), cfg_file)
    if resize is not None and (min(resize) if isinstance(resize, tuple) else resize) < size:
        raise ValueError(f"{cfg_file}: size={cfg['size']!r} is smaller than crop_size {size}")
    return (tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std)), size,
            PIL_RESAMPLE.get(code, resample), resize)


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

    def tokenize(self, texts, device, max_length: int):
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
        batch = self._tok(list(texts), padding=True, truncation=True, max_length=max_length,
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
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != model_cls.config_class.model_type:
            raise ValueError(f"encoder {self.name!r}: {path} holds a {model_type!r} checkpoint, not "
                             f"{model_cls.config_class.model_type!r} ({model_class})")
        self.model, info = model_cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"encoder {self.name!r}: {path} lacks {len(missing)} tensors of the {model_class} "
                             f"(e.g. {', '.join(missing[:3])}); they would be random")
        self.model.eval()
        return path

    def attach_text_tower(self, path: Path, tokenizer_class: str | None = None) -> None:
        self.text = HFTextTower(path, self.name, tokenizer_class)
        self.max_text = self.model.config.text_config.max_position_embeddings

    def encode_text(self, texts):
        batch = self.text.tokenize(texts, self.model.device, self.max_text)
        return pooled(self.model.get_text_features(**batch))


class CLIPMeanEncoder(TextTowerEncoder):
    """CLIP image features of each of the T frames, averaged: a strong frame-level baseline."""
    name = "clip-mean"
    resample = "bicubic"  # CLIPImageProcessor's, unless the checkpoint's preprocessor_config.json says otherwise

    def __init__(self, weights):
        super().__init__()
        path = self.load_pretrained("CLIPModel", weights)
        cfg = self.model.config
        self.dim = cfg.projection_dim
        self.mean, self.std, self.image_size, self.resample, self.resize = normalisation(
            path, cfg.vision_config.image_size, resample=type(self).resample)
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
        self.mean, self.std, self.image_size, self.resample, self.resize = normalisation(
            path, cfg.vision_config.image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.attach_text_tower(path)

    def encode_video(self, pixels_NTCHW):
        return pooled(self.model.get_video_features(pixel_values=pixels_NTCHW))


def build_clip_mean(weights=None, **_):
    return CLIPMeanEncoder(weights)


def build_xclip(weights=None, **_):
    return XCLIPEncoder(weights)
