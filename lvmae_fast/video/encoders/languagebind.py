"""`languagebind`: LanguageBind video tower rebuilt on transformers' CLIP classes (no languagebind package).

Expected --weights DIR (the published LanguageBind_Video / LanguageBind_Video_FT layout):
  config.json     {"model_type": "LanguageBindVideo", "text_config": {...CLIP text...},
                  "vision_config": {...CLIP vision..., "add_time_attn": true, "num_frames": 8},
                  "projection_dim": 768}
  model.safetensors or pytorch_model.bin   keys of a CLIPModel (text_model.*, vision_model.*,
                  visual_projection.weight, text_projection.weight, logit_scale) plus, per vision layer i,
                  vision_model.encoder.layers.{i}.temporal_embedding [1, T, D],
                  ...temporal_layer_norm1.{weight,bias}, ...temporal_attn.{q,k,v,out}_proj.{weight,bias}
  tokenizer files (CLIP BPE) for the text tower.
Architecture per LanguageBind's modeling_video.py: before each spatial CLIP block, add the layer's
temporal embedding to the residual stream and run pre-norm temporal self-attention across the T frames
of each patch position; video embedding = visual_projection(mean over frames of post_layernorm(CLS)).
Checked here against a random-weight checkpoint in that layout, not against released weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import CLIP_MEAN, CLIP_STD
from .hf import TextTowerEncoder, offline_transformers, require_dir, require_model_type

MODEL_TYPE = "LanguageBindVideo"


def load_state_dict(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


class LanguageBindVideoEncoder(TextTowerEncoder):
    name = "languagebind"

    def __init__(self, weights):
        super().__init__()
        path = require_dir(weights, self.name)
        transformers = offline_transformers()
        from transformers.models.clip.modeling_clip import CLIPAttention

        # The published checkpoints' config.json has LanguageBindVideoConfig's model_type: a plain CLIP
        # checkpoint (model_type "clip") has no temporal layers, and would load as another model.
        cfg = require_model_type(path, self.name, MODEL_TYPE, "the LanguageBind video layout")
        if "vision_config" not in cfg or "text_config" not in cfg:
            raise ValueError(f"{path}/config.json lacks text_config/vision_config (LanguageBind layout expected)")
        vision = dict(cfg["vision_config"])
        self.time_attn = bool(vision.get("add_time_attn", False))
        T = int(vision.get("num_frames", 8))
        config = transformers.CLIPConfig(text_config=cfg["text_config"], vision_config=vision,
                                         projection_dim=cfg.get("projection_dim", 512))
        self.model = transformers.CLIPModel(config)
        vcfg = self.model.config.vision_config
        if self.time_attn:
            for layer in self.model.vision_model.encoder.layers:
                layer.temporal_embedding = nn.Parameter(torch.zeros(1, T, vcfg.hidden_size))
                layer.temporal_attn = CLIPAttention(vcfg)
                layer.temporal_layer_norm1 = nn.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps)
        state = {k: v for k, v in load_state_dict(path).items() if not k.endswith("position_ids")}
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path}: checkpoint does not match the LanguageBind video layout "
                             f"(missing {missing[:4]}..., unexpected {list(result.unexpected_keys)[:4]}...)")
        self.model.eval()
        self.num_frames = T if self.time_attn else None
        self.dim = config.projection_dim
        self.image_size = vcfg.image_size
        # LanguageBind's video transform: OpenAI CLIP's mean/std, pytorchvideo's ShortSideScale (bilinear,
        # no antialiasing) and torchvision's CenterCropVideo. (Its random horizontal flip, p=0.5, is left
        # out: embeddings here are deterministic.)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.resample, self.preprocess_style = "bilinear", "pytorchvideo"
        # Its tokenizer is CLIP's BPE, saved under LanguageBind's own class names, which AutoTokenizer
        # does not know (nor the config's LanguageBindVideo model type).
        self.attach_text_tower(path, tokenizer_class="CLIPTokenizer")

    def encode_video(self, pixels_NTCHW):
        N, T = pixels_NTCHW.shape[:2]
        vm = self.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels_NTCHW.flatten(0, 1)))   # [N*T, n, d]
        n, d = x.shape[1:]
        for layer in vm.encoder.layers:
            if self.time_attn:
                h = x.reshape(N, T, n, d).transpose(1, 2).reshape(N * n, T, d)
                if T != 1:  # as LanguageBind's layer: one frame gets no temporal position (its attention still runs)
                    h = h + layer.temporal_embedding[:, :T]
                h = h + layer.temporal_attn(hidden_states=layer.temporal_layer_norm1(h))[0]
                x = h.reshape(N, n, T, d).transpose(1, 2).reshape(N * T, n, d)
            x = x + layer.self_attn(hidden_states=layer.layer_norm1(x))[0]
            x = x + layer.mlp(layer.layer_norm2(x))
        cls = vm.post_layernorm(x[:, 0]).reshape(N, T, d).mean(dim=1)
        return self.model.visual_projection(cls)


def build_languagebind(weights=None, **_):
    return LanguageBindVideoEncoder(weights)
