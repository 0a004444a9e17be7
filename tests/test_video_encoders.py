"""Every registry entry yields [windows, d] with the right d (random weights, tiny configs)."""
import json

import pytest
import torch

from lvmae_fast.video.encoders import ENCODERS, build_encoder
from lvmae_fast.video.preprocess import frames_to_input

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def test_registry_names():
    assert set(ENCODERS) == {"tiny", "clip-mean", "xclip", "languagebind", "internvideo2"}
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vjepa")


def test_tiny_shapes_and_determinism():
    a, b = build_encoder("tiny", seed=0), build_encoder("tiny", seed=0)
    x = torch.randn(3, 8, 3, a.image_size, a.image_size)
    ea, eb = a.encode_video(x), b.encode_video(x)
    assert ea.shape == (3, a.dim)
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)
    assert not torch.allclose(build_encoder("tiny", seed=1).encode_video(x), ea)
    assert a.encode_text(["a dog", "", "zebra crossing"]).shape == (3, a.dim)
    # Windows are independent: batching does not change a window's embedding.
    torch.testing.assert_close(a.encode_video(x[1:2]), ea[1:2], rtol=1e-5, atol=1e-5)
    # More frames than its temporal table: refused up front, not on the first batch of a job.
    a.check_frames(64)
    with pytest.raises(ValueError, match="at most 64 frames"):
        a.check_frames(65)


def test_preprocess_shapes_and_normalisation():
    frames = torch.full((2, 4, 48, 64, 3), 128, dtype=torch.uint8)
    x = frames_to_input(frames, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (2, 4, 3, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers not installed")


def test_clip_mean(tmp_path, transformers):
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = build_encoder("clip-mean", weights=str(tmp_path))
    assert (enc.dim, enc.image_size, enc.num_frames) == (24, 32, None)
    x = torch.randn(2, 4, 3, 32, 32)
    out = enc.encode_video(x)
    assert out.shape == (2, 24)
    per_frame = ref.get_image_features(pixel_values=x.flatten(0, 1))
    per_frame = per_frame if isinstance(per_frame, torch.Tensor) else per_frame.pooler_output
    torch.testing.assert_close(out, per_frame.reshape(2, 4, 24).mean(1), rtol=1e-5, atol=1e-5)


def test_xclip(tmp_path, transformers):
    vision = dict(VISION, num_frames=4, mit_hidden_size=24, mit_intermediate_size=48, mit_num_hidden_layers=1,
                  mit_num_attention_heads=2)
    cfg = transformers.XCLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24, prompt_layers=1)
    transformers.XCLIPModel(cfg).save_pretrained(tmp_path)
    enc = build_encoder("xclip", weights=str(tmp_path))
    assert (enc.dim, enc.num_frames) == (24, 4)
    # No preprocessor_config.json: X-CLIP's own normalisation (microsoft/xclip-*: ImageNet), not CLIP's.
    assert (enc.mean, enc.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert enc.encode_video(torch.randn(3, 4, 3, 32, 32)).shape == (3, 24)
    with pytest.raises(ValueError, match="needs 4 frames"):
        enc.check_frames(8)


def _languagebind_dir(path, transformers, zero_temporal: bool):
    """A checkpoint in LanguageBind_Video's published layout, random weights."""
    T = 4
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                          projection_dim=24)).eval()
    state = dict(clip.state_dict())
    g = torch.Generator().manual_seed(0)
    for i in range(VISION["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        scale = 0.0 if zero_temporal else 0.5
        state[p + "temporal_embedding"] = torch.randn(1, T, 32, generator=g) * scale
        state[p + "temporal_layer_norm1.weight"] = torch.ones(32)
        state[p + "temporal_layer_norm1.bias"] = torch.zeros(32)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[p + f"temporal_attn.{proj}.weight"] = torch.randn(32, 32, generator=g) * (0.2 if proj != "out_proj" else scale)
            state[p + f"temporal_attn.{proj}.bias"] = torch.zeros(32)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = {"model_type": "LanguageBindVideo", "projection_dim": 24, "text_config": TEXT,
              "vision_config": dict(VISION, add_time_attn=True, num_frames=T, lora_r=2)}
    (path / "config.json").write_text(json.dumps(config))
    return clip


def test_languagebind_reduces_to_clip_without_temporal_signal(tmp_path, transformers):
    clip = _languagebind_dir(tmp_path, transformers, zero_temporal=True)
    enc = build_encoder("languagebind", weights=str(tmp_path))
    assert (enc.dim, enc.num_frames) == (24, 4)
    x = torch.randn(2, 4, 3, 32, 32)
    per_frame = clip.get_image_features(pixel_values=x.flatten(0, 1))
    per_frame = per_frame if isinstance(per_frame, torch.Tensor) else per_frame.pooler_output
    # Zero temporal embedding and zero temporal out_proj: the temporal branch adds nothing, so the
    # video embedding is the mean of CLIP's per-frame projected CLS features (projection has no bias).
    torch.testing.assert_close(enc.encode_video(x), per_frame.reshape(2, 4, 24).mean(1), rtol=1e-4, atol=1e-5)


def test_languagebind_temporal_branch_is_used(tmp_path, transformers):
    clip = _languagebind_dir(tmp_path, transformers, zero_temporal=False)
    enc = build_encoder("languagebind", weights=str(tmp_path))
    x = torch.randn(2, 4, 3, 32, 32)
    per_frame = clip.get_image_features(pixel_values=x.flatten(0, 1))
    per_frame = per_frame if isinstance(per_frame, torch.Tensor) else per_frame.pooler_output
    out = enc.encode_video(x)
    assert out.shape == (2, 24)
    assert not torch.allclose(out, per_frame.reshape(2, 4, 24).mean(1), atol=1e-3)


def test_languagebind_wrong_layout_is_explained(tmp_path, transformers):
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=dict(VISION, add_time_attn=True),
                                                   projection_dim=24)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LanguageBind video layout"):
        build_encoder("languagebind", weights=str(tmp_path))


def test_checkpoint_encoders_need_local_weights(tmp_path):
    for name in ("clip-mean", "xclip", "languagebind"):
        with pytest.raises(ValueError, match="--weights"):
            build_encoder(name)
    with pytest.raises(ValueError, match="video_tower.pt"):
        build_encoder("internvideo2", weights=str(tmp_path))


def test_internvideo2_torchscript_layout(tmp_path):
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 16)

        def forward(self, x):
            return self.proj(x.mean(dim=(1, 3, 4)))
    torch.jit.save(torch.jit.script(Tower()), str(tmp_path / "video_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32, "num_frames": 8}))
    enc = build_encoder("internvideo2", weights=str(tmp_path))
    assert enc.encode_video(torch.randn(2, 8, 3, 32, 32)).shape == (2, 16)
    # No mean/std in internvideo2.json: InternVideo2's own test transform (ImageNet statistics).
    assert (enc.mean, enc.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _write_tokenizer(path):
    """A hand-written CLIP byte-level BPE tokenizer (vocab.json + merges.txt) small enough for TEXT's
    vocab_size: the two special tokens, a-z inside and at the end of a word, and two merges (d o, do g</w>)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = (["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
              + ["do", "dog</w>"])
    assert len(tokens) <= TEXT["vocab_size"] and tokens.index("<|endoftext|>") == TEXT["eos_token_id"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nd o\ndo g</w>\n")
    vocab = {t: i for i, t in enumerate(tokens)}
    # What the tokenizer must produce: <start> a</w> dog</w> <end>; zebra crossing letter by letter.
    return {"a dog": [0, vocab["a</w>"], vocab["dog</w>"], 1],
            "zebra crossing": [0] + [vocab[c] for c in "zebr"] + [vocab["a</w>"]]
                              + [vocab[c] for c in "crossin"] + [vocab["g</w>"], 1]}


def _check_text_tower(enc, ref, expected_ids):
    texts = ["a dog", "zebra crossing"]
    out = enc.encode_text(texts)
    assert out.shape == (2, enc.dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    again = enc.encode_text(["zebra crossing", "a dog", "a dog"])
    torch.testing.assert_close(again[1], again[2], rtol=0, atol=0)
    torch.testing.assert_close(again[[1, 0]], out, rtol=1e-5, atol=1e-5)  # batch order / padding: no effect
    # Tokenizer + projection: the same as the reference model on the hand-computed token ids.
    for i, text in enumerate(texts):
        ids = torch.tensor([expected_ids[text]])
        want = ref.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        torch.testing.assert_close(out[i], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["clip-mean", "xclip"])
def test_text_tower(tmp_path, transformers, name):
    if name == "clip-mean":
        ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
    else:
        vision = dict(VISION, num_frames=4, mit_hidden_size=24, mit_intermediate_size=48, mit_num_hidden_layers=1,
                      mit_num_attention_heads=2)
        ref = transformers.XCLIPModel(transformers.XCLIPConfig(text_config=TEXT, vision_config=vision,
                                                               projection_dim=24, prompt_layers=1))
    ref.eval().save_pretrained(tmp_path)
    expected = _write_tokenizer(tmp_path)
    enc = build_encoder(name, weights=str(tmp_path))
    with torch.no_grad():
        _check_text_tower(enc, ref, expected)


def test_text_tower_without_tokenizer_files_is_explained(tmp_path, transformers):
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                   projection_dim=24)).save_pretrained(tmp_path)
    enc = build_encoder("clip-mean", weights=str(tmp_path))  # video-only dir: still builds
    with pytest.raises(ValueError, match="no tokenizer"):
        enc.encode_text(["a dog"])
