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


def _smooth_frame(h, w, seed=0):
    """Camera-like content: smooth colour fields with a little grain, uint8 [h, w, 3]."""
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(x / (w / 7) + c) * np.cos(y / (h / 5) - c) for c in range(3)], -1)
    return np.clip(img + np.random.default_rng(seed).normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


SHAPES = [(1080, 1920), (480, 854), (480, 640), (640, 480), (48, 64)]


@pytest.mark.parametrize("size", [{"shortest_edge": 224}, {"shortest_edge": 256}, {"height": 240, "width": 288}])
@pytest.mark.parametrize("resample, code", [("bilinear", 2), ("bicubic", 3)])
def test_preprocessing_matches_the_encoders_own_processors(tmp_path, transformers, resample, code, size):
    """Against transformers' CLIPImageProcessor (clip-mean: bicubic) and VideoMAEImageProcessor (X-CLIP:
    bilinear), with the settings read back from the preprocessor_config.json each saves: same resized size
    (the long side truncated: 640x480 was resized to 299 wide, not 298, which moved the crop by half a
    pixel, up to 1.7 in normalised units on noise; a `size` other than the crop's was ignored, so the crop
    saw another field of view), the same filter, the same crop; left to differ only by the processors'
    uint8 rounding of the resized image."""
    from transformers.image_transforms import get_resize_output_image_size

    from lvmae_fast.video.encoders.base import IMAGENET_MEAN, IMAGENET_STD
    from lvmae_fast.video.encoders.hf import normalisation
    from lvmae_fast.video.preprocess import resized_shape

    cls = transformers.CLIPImageProcessor if code == 3 else transformers.VideoMAEImageProcessor
    proc = cls(size=size, crop_size={"height": 224, "width": 224}, resample=code,
               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    proc.save_pretrained(tmp_path)
    mean, std, crop, filt, resize = normalisation(tmp_path, 32, resample="nearest")
    assert (crop, filt) == (224, resample)
    for h, w in SHAPES:
        if "shortest_edge" in size:
            assert resized_shape(h, w, resize) == tuple(get_resize_output_image_size(
                torch.zeros(h, w, 3).numpy(), size["shortest_edge"], default_to_square=False,
                input_data_format="channels_last"))
        frame = _smooth_frame(h, w)
        ref = torch.as_tensor(proc(images=[frame], return_tensors="pt")["pixel_values"][0])
        ours = frames_to_input(torch.from_numpy(frame)[None, None], crop, mean, std, resample=filt,
                               resize=resize)[0, 0]
        assert (ours - ref).abs().mean() < 0.008 and (ours - ref).abs().max() < 0.03, (h, w)


def _pytorchvideo_short_side_scale(frames_THWC, size, mean, std):
    """LanguageBind's video transform, written out: x / 255, normalise, pytorchvideo's ShortSideScale
    (F.interpolate bilinear, align_corners=False, no antialiasing; the long side floor(long * size /
    short)), torchvision's CenterCropVideo."""
    import math

    import torch.nn.functional as F

    x = frames_THWC.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h, w = x.shape[-2:]
    new = (size, int(math.floor(w / h * size))) if w >= h else (int(math.floor(h / w * size)), size)
    x = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def test_languagebind_preprocessing_is_its_own_transform(tmp_path, transformers):
    """LanguageBind resizes with pytorchvideo's ShortSideScale, which does not antialias, and crops with
    torchvision's rounding; frames were resized antialiased and cropped as transformers' processors do
    (mean 0.07, max 0.5 off at 1080p)."""
    _languagebind_dir(tmp_path, transformers, zero_temporal=True)
    enc = build_encoder("languagebind", weights=str(tmp_path))
    # 495: the crop at an odd 3.5-pixel offset; 224x488, 392x854: transformers' int(size * long / short) is a
    # pixel wider than pytorchvideo's floor(long / short * size) there
    for h, w in [(1080, 1920), (480, 854), (640, 480), (480, 495), (224, 488), (392, 854)]:
        frames = torch.from_numpy(_smooth_frame(h, w))[None]
        want = _pytorchvideo_short_side_scale(frames, 224, enc.mean, enc.std)
        got = frames_to_input(frames[None], 224, enc.mean, enc.std, resample=enc.resample, resize=enc.resize,
                              style=enc.preprocess_style)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{h}x{w}")


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


def _languagebind_dir(path, transformers, zero_temporal: bool, T: int = 4):
    """A checkpoint in LanguageBind_Video's published layout, random weights."""
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


def test_languagebind_adds_no_temporal_position_to_a_single_frame(tmp_path, transformers):
    """LanguageBind's layer adds its temporal embedding only `if t != 1`; a num_frames=1 checkpoint was
    encoded with it (up to 0.94 off). Its temporal attention still runs: out_proj matters, the table not."""
    from safetensors.torch import load_file, save_file

    _languagebind_dir(tmp_path, transformers, zero_temporal=False, T=1)
    x = torch.randn(2, 1, 3, 32, 32)
    before = build_encoder("languagebind", weights=str(tmp_path)).encode_video(x)
    state = load_file(str(tmp_path / "model.safetensors"))
    for key in [k for k in state if k.endswith("temporal_embedding")]:
        state[key] = state[key] + 3.0
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(build_encoder("languagebind", weights=str(tmp_path)).encode_video(x), before,
                               rtol=0, atol=0)
    for key in [k for k in state if k.endswith("temporal_attn.out_proj.weight")]:
        state[key] = state[key] + torch.randn(state[key].shape, generator=torch.Generator().manual_seed(1))
    save_file(state, str(tmp_path / "model.safetensors"))
    assert not torch.allclose(build_encoder("languagebind", weights=str(tmp_path)).encode_video(x), before, atol=1e-3)


def test_languagebind_wrong_layout_is_explained(tmp_path, transformers):
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=dict(VISION, add_time_attn=True),
                                                   projection_dim=24)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())  # its model type, without the temporal tensors
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="LanguageBindVideo")))
    with pytest.raises(ValueError, match="LanguageBind video layout"):
        build_encoder("languagebind", weights=str(tmp_path))


def test_checkpoint_encoders_need_local_weights(tmp_path):
    for name in ("clip-mean", "xclip", "languagebind"):
        with pytest.raises(ValueError, match="--weights"):
            build_encoder(name)
    with pytest.raises(ValueError, match="video_tower.pt"):
        build_encoder("internvideo2", weights=str(tmp_path))


class MeanTower(torch.nn.Module):
    """A stand-in InternVideo2 video tower: [N, T, 3, S, S] -> [N, 16]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def forward(self, x):
        return self.proj(x.mean(dim=(1, 3, 4)))


def test_internvideo2_torchscript_layout(tmp_path):
    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32, "num_frames": 8}))
    enc = build_encoder("internvideo2", weights=str(tmp_path))
    assert enc.encode_video(torch.randn(2, 8, 3, 32, 32)).shape == (2, 16)
    # No mean/std in internvideo2.json: InternVideo2's own test transform (ImageNet statistics).
    assert (enc.mean, enc.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_internvideo2_sees_the_whole_frame_squashed_as_its_test_transform(tmp_path):
    """InternVideo2's test transform is Resize((S, S), BICUBIC) of the whole frame: the short-side resize and
    centre crop used before cut 44% of a 16:9 frame's width (a left-to-right ramp read 55..198, not 0..254)."""
    import torch.nn.functional as F

    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32}))
    enc = build_encoder("internvideo2", weights=str(tmp_path))
    frame = torch.zeros(72, 128, 3, dtype=torch.uint8)
    frame[..., 0] = torch.linspace(0, 255, 128).round().to(torch.uint8)  # red rises left to right
    got = frames_to_input(frame[None, None], enc.image_size, enc.mean, enc.std, resample=enc.resample,
                          resize=enc.resize, style=enc.preprocess_style)[0, 0]
    x = F.interpolate(frame.permute(2, 0, 1)[None].float() / 255, size=(32, 32), mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 1)[0]
    want = (x - torch.tensor(enc.mean).view(3, 1, 1)) / torch.tensor(enc.std).view(3, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    red = got[0, 16] * enc.std[0] + enc.mean[0]   # the middle row, back in [0, 1]
    assert red[0] < 0.02 and red[-1] > 0.98


def test_internvideo2_captions_are_padded_to_its_40_tokens(tmp_path):
    """A text tower exported at InternVideo2's fixed 40 tokens failed on every batch whose longest caption
    was shorter ("Guard failed: input_ids.size()[1] == 40"): captions were padded to the longest only."""
    transformers = pytest.importorskip("transformers")

    class LengthTower(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.stack([attention_mask.sum(1).float(), torch.full((len(input_ids),), float(input_ids.shape[1]))], 1)

    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    torch.jit.save(torch.jit.script(LengthTower()), str(tmp_path / "text_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 2, "image_size": 32}))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs"]))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    enc = build_encoder("internvideo2", weights=str(tmp_path))
    out = enc.encode_text(["a dog", "a dog runs"])
    assert out[:, 1].tolist() == [40.0, 40.0] and out[:, 0].tolist() == [4.0, 5.0]  # [CLS] ... [SEP]
    with pytest.raises(ValueError, match="encode_text takes a list of captions, got one string"):
        enc.encode_text("a dog")   # embedded each character
    with pytest.raises(ValueError, match="encode_text takes a list of captions, got one string"):
        build_encoder("tiny").encode_text("a dog")


def test_internvideo2_exported_program_layout(tmp_path):
    # build_encoder's eval() raised NotImplementedError: a torch.export module refuses train(False).
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(MeanTower(), (torch.randn(2, 8, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "video_tower.pt2"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32, "num_frames": 8}))
    enc = build_encoder("internvideo2", weights=str(tmp_path))
    assert not any(m.training for m in enc.modules())
    x = torch.randn(3, 8, 3, 32, 32)
    torch.testing.assert_close(enc.encode_video(x), program.module()(x))


def test_the_weights_fingerprint_reads_every_byte_and_skips_tokenizer_files(tmp_path):
    from lvmae_fast.video.encoders import SAMPLE_BYTES, legacy_weights_fingerprint, weights_fingerprint

    # A change between the old sampled regions (a fine-tune of a few layers) left the old fingerprint as it was.
    data = bytearray(range(256)) * (4 * SAMPLE_BYTES // 256)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(bytes(data))
    data[SAMPLE_BYTES + 5] ^= 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors").write_bytes(bytes(data))
    assert legacy_weights_fingerprint(tmp_path / "a") == legacy_weights_fingerprint(tmp_path / "b")
    assert weights_fingerprint(tmp_path / "a") != weights_fingerprint(tmp_path / "b")
    before = weights_fingerprint(tmp_path / "a")
    _write_tokenizer(tmp_path / "a")  # what encode_text asks for: the video embeddings stay the same
    (tmp_path / "a" / "README.md").write_text("notes")
    # InternVideo2's BERT vocabulary and text tower, or a sentencepiece model, added later (were hashed:
    # the extract job's resume was refused)
    for name in ("vocab.txt", "tokenizer.model", "text_tower.pt", "text_tower.pt2"):
        (tmp_path / "a" / name).write_bytes(b"text side")
    assert weights_fingerprint(tmp_path / "a") == before


def test_an_encoder_whose_output_is_not_its_stated_dim_stops_the_job_and_the_store_takes_the_fix(tmp_path):
    """internvideo2.json says dim 32, the exported tower gives 16: one clear error at the first batch (was
    numpy's 'could not broadcast'); the store it left holds no video, so the rerun with the json fixed
    extracts into it (an empty store takes the new width)."""
    pytest.importorskip("av")
    from lvmae_fast import synth
    from lvmae_fast.extract import extract_videos
    from lvmae_fast.store import Store

    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 32, "image_size": 32, "num_frames": 8}))
    video = synth.write_video(tmp_path / "v.mp4", duration=2.0, fps=10, codec="h264").path
    run = dict(encoder="internvideo2", weights=str(tmp_path), seconds=1.0, decoder="pyav")
    with pytest.raises(ValueError, match=r"gave embeddings of shape \[16\] per window, but declares dim 32"):
        extract_videos(str(video), tmp_path / "store", **run)
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32, "num_frames": 8}))
    assert extract_videos(str(video), tmp_path / "store", **run)["done"] == 1
    assert Store(tmp_path / "store").dim == 16


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


def test_languagebind_text_tower_loads_clips_tokenizer_under_its_own_names(tmp_path, transformers):
    """LanguageBind's checkpoints name the model type LanguageBindVideo and save CLIP's BPE files under its
    own tokenizer class, neither known to AutoTokenizer: the text tower failed with "no tokenizer" although
    the files were there. Its text features are CLIP's text tower on the same weights."""
    clip = _languagebind_dir(tmp_path, transformers, zero_temporal=True)
    expected = _write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LanguageBindVideoTokenizer"}))
    enc = build_encoder("languagebind", weights=str(tmp_path))
    with torch.no_grad():
        _check_text_tower(enc, clip.eval(), expected)


def test_text_tower_without_tokenizer_files_is_explained(tmp_path, transformers):
    transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                   projection_dim=24)).save_pretrained(tmp_path)
    enc = build_encoder("clip-mean", weights=str(tmp_path))  # video-only dir: still builds
    with pytest.raises(ValueError, match="no tokenizer"):
        enc.encode_text(["a dog"])


def _clip(transformers):
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))


def test_each_encoder_takes_its_processors_resize_filter(tmp_path, transformers):
    """clip-mean resizes bicubic (CLIPImageProcessor's default), unless the checkpoint's
    preprocessor_config.json names another filter; X-CLIP bilinear (VideoMAEImageProcessor's)."""
    _clip(transformers).save_pretrained(tmp_path / "clip")
    assert build_encoder("clip-mean", weights=str(tmp_path / "clip")).resample == "bicubic"
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "resample": 2}))
    assert build_encoder("clip-mean", weights=str(tmp_path / "clip")).resample == "bilinear"
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "resample": 0}))
    with pytest.raises(ValueError, match="resample=0 is not supported"):
        build_encoder("clip-mean", weights=str(tmp_path / "clip"))
    vision = dict(VISION, num_frames=4, mit_hidden_size=24, mit_intermediate_size=48, mit_num_hidden_layers=1,
                  mit_num_attention_heads=2)
    transformers.XCLIPModel(transformers.XCLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24,
                                                     prompt_layers=1)).save_pretrained(tmp_path / "xclip")
    assert build_encoder("xclip", weights=str(tmp_path / "xclip")).resample == "bilinear"
    assert build_encoder("tiny").resample == "bilinear"
    for cfg, problem in [({"crop_size": 32, "size": {"shortest_edge": 24}}, "smaller than crop_size 32"),
                         ({"crop_size": 32, "size": {"longest_edge": 48}}, "is not supported"),
                         ({"crop_size": 32, "do_center_crop": False}, "do_center_crop=false is not supported")]:
        (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=problem):
            build_encoder("clip-mean", weights=str(tmp_path / "clip"))


def test_checkpoints_that_would_load_random_weights_are_refused(tmp_path, transformers):
    """transformers loads a checkpoint lacking the vision tower, or another architecture's, with a
    warning and random tensors: two runs then stored different embeddings under one fingerprint."""
    from safetensors.torch import load_file, save_file

    _clip(transformers).save_pretrained(tmp_path / "novision")
    weights = tmp_path / "novision" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("vision_model.")}, str(weights))
    with pytest.raises(ValueError, match=r"lacks \d+ tensors of the CLIPModel \(e.g. vision_model"):
        build_encoder("clip-mean", weights=str(tmp_path / "novision"))
    vision = dict(VISION, num_frames=4, mit_hidden_size=24, mit_intermediate_size=48, mit_num_hidden_layers=1,
                  mit_num_attention_heads=2)
    transformers.XCLIPModel(transformers.XCLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24,
                                                     prompt_layers=1)).save_pretrained(tmp_path / "xclip")
    with pytest.raises(ValueError, match="holds a 'xclip' checkpoint, not 'clip'"):
        build_encoder("clip-mean", weights=str(tmp_path / "xclip"))


@pytest.mark.parametrize("name", ["clip-mean", "tiny"])
def test_damaged_weights_are_one_line_errors(tmp_path, transformers, name, capsys):
    """A cut safetensors file (SafetensorError tracebacks before) or a config that does not fit the
    weights (RuntimeError size mismatch): one line from `lvmae extract` naming the checkpoint."""
    from lvmae_fast.cli import main

    if name == "tiny":
        from safetensors.torch import save_file
        save_file(build_encoder("tiny").state_dict(), str(tmp_path / "tiny.safetensors"))
        damaged = tmp_path / "tiny.safetensors"
    else:
        _clip(transformers).save_pretrained(tmp_path)
        damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:200])
    video = tmp_path / "v.mp4"
    video.write_bytes(b"unused: the encoder is built first")
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["extract", str(video), "--encoder", name, "--weights", str(tmp_path), "--out",
                 str(tmp_path / "store"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"encoder {name!r}: cannot load the checkpoint at {tmp_path}" in err[0], err
    if name == "clip-mean":  # the whole file again, with a config that does not fit it
        _clip(transformers).save_pretrained(tmp_path)
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["vision_config"]["intermediate_size"] = 48
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="cannot load the checkpoint"):
            build_encoder("clip-mean", weights=str(tmp_path))


def test_an_unknown_resize_filter_is_refused():
    with pytest.raises(ValueError, match="resample must be one of"):
        frames_to_input(torch.zeros(1, 1, 8, 8, 3, dtype=torch.uint8), 4, (0.5,) * 3, (0.5,) * 3, resample="lanczos")


def _xclip(transformers):
    vision = dict(VISION, num_frames=4, mit_hidden_size=24, mit_intermediate_size=48, mit_num_hidden_layers=1,
                  mit_num_attention_heads=2)
    return transformers.XCLIPModel(transformers.XCLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24,
                                                            prompt_layers=1))


def _write_preprocessor(path, **settings):
    (path / "preprocessor_config.json").write_text(json.dumps(settings))


@pytest.mark.parametrize("name", ["clip-mean", "xclip"])
def test_the_settings_transformers_5_processors_save_are_read(tmp_path, transformers, name):
    """CLIPProcessor / XCLIPProcessor.save_pretrained (transformers 5) write the image processor's settings
    under "image_processor" in processor_config.json, and no preprocessor_config.json: size, mean, std and
    resample fell back to the defaults. Against the image processor transformers loads from the same dir."""
    from lvmae_fast.video.encoders.hf import PIL_RESAMPLE

    model, proc_cls, image_cls = ((_clip(transformers), transformers.CLIPProcessor, transformers.CLIPImageProcessor)
                                  if name == "clip-mean" else
                                  (_xclip(transformers), transformers.XCLIPProcessor,
                                   transformers.VideoMAEImageProcessor))
    model.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    code = 2 if name == "clip-mean" else 3  # not the encoder's default filter
    image_proc = image_cls(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=code,
                           image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    proc_cls(image_processor=image_proc, tokenizer=tokenizer).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()

    def check():
        ref = image_cls.from_pretrained(str(tmp_path))
        enc = build_encoder(name, weights=str(tmp_path))
        assert enc.mean == pytest.approx(tuple(ref.image_mean)) and enc.std == pytest.approx(tuple(ref.image_std))
        assert (enc.image_size, enc.resize, enc.resample) == (
            ref.crop_size["height"], ref.size["shortest_edge"], PIL_RESAMPLE[int(ref.resample)])
        frame = _smooth_frame(48, 64)
        want = torch.as_tensor(ref(images=[frame], return_tensors="pt")["pixel_values"][0])
        got = frames_to_input(torch.from_numpy(frame)[None, None], enc.image_size, enc.mean, enc.std,
                              resample=enc.resample, resize=enc.resize)[0, 0]
        assert (got - want).abs().max() < 0.03
        return enc

    assert check().mean == pytest.approx((0.1, 0.2, 0.3))
    # Beside a preprocessor_config.json too: the one transformers reads (the nested settings, in 5.x).
    _write_preprocessor(tmp_path, crop_size=32, size={"shortest_edge": 48}, image_mean=[0.7] * 3,
                        image_std=[0.2] * 3, resample=3 if code == 2 else 2)
    check()


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path, transformers):
    """A config.json with fewer layers than the weights: transformers drops the extra layers' tensors with a
    warning and the encoder was a shortened network (exit 0). A save_pretrained dir still loads."""
    _clip(transformers).save_pretrained(tmp_path)
    build_encoder("clip-mean", weights=str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"encoder 'clip-mean': {tmp_path} holds 16 tensors the CLIPModel of its "
                                         r"config.json has no place for \(e.g. vision_model.encoder.layers.1."):
        build_encoder("clip-mean", weights=str(tmp_path))


@pytest.mark.parametrize("step", ["do_normalize", "do_rescale"])
def test_processor_steps_that_would_be_done_anyway_are_refused(tmp_path, transformers, step):
    _clip(transformers).save_pretrained(tmp_path)
    _write_preprocessor(tmp_path, crop_size=32, **{step: False})
    with pytest.raises(ValueError, match=f"preprocessor_config.json: {step}=false is not supported"):
        build_encoder("clip-mean", weights=str(tmp_path))


def test_mean_and_std_are_checked_when_the_checkpoint_loads(tmp_path, transformers):
    """A wrong-length mean built and failed mid-job in preprocess.py; a single number (which transformers
    takes for every channel) raised "'float' object is not iterable"."""
    _clip(transformers).save_pretrained(tmp_path)
    for key, value in [("image_mean", [0.5]), ("image_std", [0.5, 0.5, 0.5, 0.5]), ("image_mean", "0.5"),
                       ("image_std", [0.5, 0.0, 0.5])]:
        _write_preprocessor(tmp_path, crop_size=32, **{key: value})
        with pytest.raises(ValueError, match=rf"preprocessor_config.json: {key}=.* (is not supported|must be)"):
            build_encoder("clip-mean", weights=str(tmp_path))
    _write_preprocessor(tmp_path, crop_size=32, size=32, image_mean=0.5, image_std=0.25)
    enc = build_encoder("clip-mean", weights=str(tmp_path))
    assert (enc.mean, enc.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ref = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path))
    frame = _smooth_frame(48, 64)
    want = torch.as_tensor(ref(images=[frame], return_tensors="pt")["pixel_values"][0])
    got = frames_to_input(torch.from_numpy(frame)[None, None], 32, enc.mean, enc.std, resample=enc.resample)[0, 0]
    assert (got - want).abs().max() < 0.03
    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "image_size": 32, "mean": [0.5]}))
    with pytest.raises(ValueError, match=r"internvideo2.json: mean=\[0.5\] is not supported"):
        build_encoder("internvideo2", weights=str(tmp_path))


def test_a_crop_other_than_the_models_input_is_refused_at_load(tmp_path, transformers):
    _clip(transformers).save_pretrained(tmp_path)
    _write_preprocessor(tmp_path, crop_size={"height": 24, "width": 24})
    with pytest.raises(ValueError, match=rf"encoder 'clip-mean': {tmp_path}: the image processor's crop_size 24 "
                                         r"is not the vision model's image_size 32"):
        build_encoder("clip-mean", weights=str(tmp_path))
    _write_preprocessor(tmp_path, crop_size={"height": 32, "width": 24})
    with pytest.raises(ValueError, match="crop_size=.* is not supported"):
        build_encoder("clip-mean", weights=str(tmp_path))


@pytest.mark.parametrize("file", ["config.json", "preprocessor_config.json", "processor_config.json",
                                  "internvideo2.json"])
def test_a_settings_file_that_is_not_json_is_named(tmp_path, transformers, file):
    if file == "internvideo2.json":
        torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    else:
        _clip(transformers).save_pretrained(tmp_path)
    (tmp_path / file).write_text("")
    with pytest.raises(ValueError, match=f"{tmp_path / file}: not valid JSON"):
        build_encoder("internvideo2" if file == "internvideo2.json" else "clip-mean", weights=str(tmp_path))


def test_internvideo2_json_values_are_checked_at_load(tmp_path):
    torch.jit.save(torch.jit.script(MeanTower()), str(tmp_path / "video_tower.pt"))
    for meta, problem in [({"dim": 16, "num_frames": "8"}, "num_frames='8' is not supported"),
                          ({"dim": 16, "num_frames": 0}, "num_frames=0 is not supported"),
                          ({"dim": "16"}, "dim='16' is not supported"),
                          ({"image_size": 32}, "no 'dim'")]:
        (tmp_path / "internvideo2.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=f"internvideo2.json: {problem}"):
            build_encoder("internvideo2", weights=str(tmp_path))
    (tmp_path / "internvideo2.json").write_text(json.dumps({"dim": 16, "num_frames": None}))
    assert build_encoder("internvideo2", weights=str(tmp_path)).num_frames is None


def test_weights_that_are_not_a_checkpoint_dir_of_the_encoder_are_explained(tmp_path, transformers):
    _clip(transformers).save_pretrained(tmp_path)
    # A plain CLIP checkpoint for languagebind: no temporal layers, and model_type 'clip'.
    with pytest.raises(ValueError, match="holds a 'clip' checkpoint, not 'LanguageBindVideo'"):
        build_encoder("languagebind", weights=str(tmp_path))
    with pytest.raises(ValueError, match="--weights must be the checkpoint directory"):
        build_encoder("clip-mean", weights=str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json has no model_type \(expected 'clip'"):
        build_encoder("clip-mean", weights=str(tmp_path))
    (tmp_path / "only_config").mkdir()
    _clip(transformers).config.save_pretrained(tmp_path / "only_config")
    with pytest.raises(ValueError, match=f"encoder 'clip-mean': cannot load the checkpoint at {tmp_path}/only_config"):
        build_encoder("clip-mean", weights=str(tmp_path / "only_config"))


def test_no_captions_encode_to_an_empty_batch(tmp_path, transformers):
    _clip(transformers).save_pretrained(tmp_path / "clip")
    _xclip(transformers).save_pretrained(tmp_path / "xclip")
    for name in ("clip", "xclip"):
        _write_tokenizer(tmp_path / name)
    for enc in (build_encoder("tiny"), build_encoder("clip-mean", weights=str(tmp_path / "clip")),
                build_encoder("xclip", weights=str(tmp_path / "xclip"))):
        out = enc.encode_text([])  # was an IndexError (clip-mean, xclip) or torch.cat's error (tiny)
        assert out.shape == (0, enc.dim) and out.dtype == enc.encode_text(["a dog"]).dtype, enc.name


@pytest.mark.parametrize("factor", [1 / 127.5, 1.0])
def test_a_processors_rescale_factor_reaches_the_frames(tmp_path, transformers, factor):
    """rescale_factor was not read: frames were always x / 255, so a processor mapping pixels to [-1, 1]
    (1/127.5, mean 1, std 1) gave inputs up to 0.94 off, silently. Against the processor itself."""
    _clip(transformers).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                    rescale_factor=factor, image_mean=[1.0, 1.0, 1.0],
                                    image_std=[1.0, 0.5, 2.0]).save_pretrained(tmp_path)
    enc = build_encoder("clip-mean", weights=str(tmp_path))
    ref = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path))
    frame = _smooth_frame(48, 64)
    want = torch.as_tensor(ref(images=[frame], return_tensors="pt")["pixel_values"][0])
    got = frames_to_input(torch.from_numpy(frame)[None, None], enc.image_size, enc.mean, enc.std,
                          resample=enc.resample, resize=enc.resize)[0, 0]
    assert (got - want).abs().max() < 0.03 * 255 * factor, (got - want).abs().max()
    for bad in (0, -1.0, "1/255", True):
        _write_preprocessor(tmp_path, crop_size=32, rescale_factor=bad)
        with pytest.raises(ValueError, match=r"rescale_factor=.* must be a positive number"):
            build_encoder("clip-mean", weights=str(tmp_path))
