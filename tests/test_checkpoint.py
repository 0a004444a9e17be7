"""Reference checkpoint import: key names/shapes of amazon-science/lv-mae, round trip, safe loading."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvmae_fast.checkpoint import convert_reference, save_model_dir
from lvmae_fast.cli import main
from lvmae_fast.model import LVMAE, LVMAEConfig

from naive_lvmae import naive_forward, naive_sincos


def reference_state_dict(D=32, depth=2, Dd=16, ddepth=1, N=256, seed=0):
    """A state dict with the reference's key names and shapes, built by hand (not from our model)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    sd = {"cls_token": r(1, 1, D), "mask_token": r(1, 1, Dd),
          "pos_embed": naive_sincos(D, N).float()[None], "decoder_pos_embed": naive_sincos(Dd, N).float()[None]}

    def blocks(prefix, n, w):
        for i in range(n):
            p = f"{prefix}.{i}"
            sd.update({f"{p}.norm1.weight": 1 + r(w), f"{p}.norm1.bias": r(w), f"{p}.attn.qkv.weight": r(3 * w, w),
                       f"{p}.attn.qkv.bias": r(3 * w), f"{p}.attn.proj.weight": r(w, w), f"{p}.attn.proj.bias": r(w),
                       f"{p}.norm2.weight": 1 + r(w), f"{p}.norm2.bias": r(w), f"{p}.mlp.fc1.weight": r(4 * w, w),
                       f"{p}.mlp.fc1.bias": r(4 * w), f"{p}.mlp.fc2.weight": r(w, 4 * w), f"{p}.mlp.fc2.bias": r(w)})

    blocks("blocks", depth, D)
    blocks("decoder_blocks", ddepth, Dd)
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D), "decoder_embed.weight": r(Dd, D), "decoder_embed.bias": r(Dd),
               "decoder_norm.weight": 1 + r(Dd), "decoder_norm.bias": r(Dd), "decoder_pred.weight": r(D, Dd),
               "decoder_pred.bias": r(D)})
    return sd


def save_reference(path, sd, **args):
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "scaler": {},
                "args": argparse.Namespace(model="mae_lvmae", **args)}, path)


def test_convert_round_trip_matches_reference_math(tmp_path):
    sd = reference_state_dict()
    save_reference(tmp_path / "ref.pth", sd, num_heads=4, decoder_num_heads=2)
    model = convert_reference(tmp_path / "ref.pth", tmp_path / "out")
    c = model.config
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.in_dim,
            c.max_len) == (32, 2, 4, 16, 1, 2, 32, 256)
    loaded = LVMAE.from_pretrained(tmp_path / "out")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert set(json.loads((tmp_path / "out" / "config.json").read_text())) >= {"embed_dim", "depth", "in_dim"}

    torch.manual_seed(1)
    seqs = [torch.randn(n, 32) for n in (3, 40, 1)]
    visible = [torch.tensor([True, False, True]), torch.rand(40) < 0.6, torch.tensor([True])]
    visible[1][0] = True
    ref_cfg = argparse.Namespace(depth=2, num_heads=4, decoder_depth=1, decoder_num_heads=2)
    enc_ref, pred_ref = naive_forward(sd, ref_cfg, seqs, visible)
    preds = loaded.reconstruct(seqs, visible)
    for p, r in zip(preds, pred_ref):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5)
    cls, _ = loaded.encode(seqs)
    enc_all, _ = naive_forward(sd, ref_cfg, seqs, [torch.ones(len(s), dtype=torch.bool) for s in seqs])
    torch.testing.assert_close(cls, torch.stack([e[0] for e in enc_all]), rtol=1e-4, atol=1e-5)


def test_cli_convert_and_python_m_are_one_cli(tmp_path):
    save_reference(tmp_path / "ref.pth", reference_state_dict(N=64))
    out = subprocess.run([sys.executable, "-m", "lvmae_fast", "convert-reference", str(tmp_path / "ref.pth"),
                          "--out", str(tmp_path / "m"), "--num-heads", "8", "--decoder-num-heads", "4"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["num_heads"], cfg["decoder_num_heads"], cfg["max_len"]) == (8, 4, 64)


def test_convert_refuses_an_out_folder_holding_more_than_a_model(tmp_path):
    # It replaced a training run's model files (its checkpoints' link) without a word.
    save_reference(tmp_path / "ref.pth", reference_state_dict())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"the run's")
    with pytest.raises(ValueError, match=r"holds more than a model \(checkpoints\)"):
        convert_reference(tmp_path / "ref.pth", run)
    assert (run / "model.safetensors").read_bytes() == b"the run's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        convert_reference(tmp_path / "ref.pth", tmp_path / "file")
    convert_reference(tmp_path / "ref.pth", tmp_path / "m")
    convert_reference(tmp_path / "ref.pth", tmp_path / "m")  # a model folder again: replaced


class Evil:
    """Any non-allow-listed global: weights_only loading must refuse it (no blind pickle fallback)."""


def test_refuses_unsafe_pickles_and_wrong_positions(tmp_path):
    torch.save({"model": reference_state_dict(), "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        convert_reference(tmp_path / "evil.pth")
    sd = reference_state_dict()
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    save_reference(tmp_path / "bad.pth", sd)
    with pytest.raises(ValueError, match="sin-cos"):
        convert_reference(tmp_path / "bad.pth")
    for key in ("decoder_pred.weight", "blocks.0.mlp.fc1.weight"):  # the second was a KeyError traceback
        sd = reference_state_dict()
        del sd[key]
        save_reference(tmp_path / "missing.pth", sd)
        with pytest.raises(ValueError, match=rf"lacks keys \['{key}'\]"):
            convert_reference(tmp_path / "missing.pth")


@pytest.mark.parametrize("key, shape, message", [
    ("cls_token", (1, 1, 48), r"pos_embed has shape \[1, 257, 32\], expected \[1, positions, 48\] \(cls_token is 48 wide\)"),
    ("mask_token", (1, 1, 32), r"decoder_pos_embed has shape \[1, 257, 16\], expected \[1, positions, 32\] "
                               r"\(mask_token is 32 wide\)"),
    ("decoder_pred.weight", (24, 16), r"decoder_pred.weight predicts 24-dim rows but the encoder is 32 wide")])
def test_a_width_that_disagrees_with_the_position_tables_is_named(tmp_path, capsys, key, shape, message):
    """cls_token / mask_token of another width than their position tables: a RuntimeError traceback from
    comparing tables of two widths; a decoder_pred of another width: a message naming no key."""
    sd = reference_state_dict()
    sd[key] = torch.zeros(shape)
    if key == "decoder_pred.weight":
        sd["decoder_pred.bias"] = torch.zeros(shape[0])
    save_reference(tmp_path / "bad.pth", sd)
    assert main(["convert-reference", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize("name", [b"m", b"mod\xe9le"])  # the second is not UTF-8: safetensors cannot open it by name
def test_save_load_round_trip_and_missing_dir(tmp_path, name):
    import os

    folder = os.fsdecode(bytes(tmp_path) + b"/" + name)
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=12))
    model.save_pretrained(folder)
    again = LVMAE.from_pretrained(folder)
    assert again.config == model.config
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(Path(folder).glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        LVMAE.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("override, names", [
    ({"embed_dim": 32}, "blocks.0.attn.qkv.weight"),
    ({"mlp_ratio": 2.0}, "blocks.0.mlp.fc1.weight"),
    ({"depth": 3}, "missing ['blocks.2."),
])
def test_weights_that_do_not_fit_the_config_are_one_value_error(tmp_path, override, names):
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=12))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **override}))  # edited by hand
    with pytest.raises(ValueError, match="does not match its config") as err:
        LVMAE.from_pretrained(tmp_path / "m")
    assert names in str(err.value) and "\n" not in str(err.value)


def test_from_pretrained_overrides_may_not_change_the_network(tmp_path):
    """num_heads=1 on a 3-head model loaded without a word (head counts are in no tensor shape) and
    encode differed by 0.52; an override's own mistake was blamed on the saved config.json."""
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=12))
    model.save_pretrained(tmp_path / "m")
    heads = model.config.num_heads
    for override in ({"num_heads": 1}, {"decoder_num_heads": 1}, {"embed_dim": 32}):
        with pytest.raises(ValueError, match=rf"from_pretrained\(.*\): {list(override)[0]}=.* would change the saved "
                                             r"network .*; only .*attn_impl.* may be overridden"):
            LVMAE.from_pretrained(tmp_path / "m", **override)
    with pytest.raises(ValueError, match=r"from_pretrained\(.*\) override: config: unknown keys \['foo'\]"):
        LVMAE.from_pretrained(tmp_path / "m", foo=1)
    again = LVMAE.from_pretrained(tmp_path / "m", num_heads=heads, attn_impl="sdpa", max_len=64, masking="random")
    assert (again.config.max_len, again.config.masking, again.config.attn_impl) == (64, "random", "sdpa")


def test_missing_reference_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_reference(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="is a directory; give the .pth file"):   # was "not found"
        convert_reference(tmp_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from lvmae_fast.atomic import atomic_write

    target = tmp_path / "f.json"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))

    def half_then_crash(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"


@pytest.mark.parametrize("flags, want", [
    (dict(cos_loss=True, norm_pix_loss=True, mask_ratio=0.7, masking_strategy=False),
     dict(loss="cosine", norm_targets=True, mask_ratio=0.7, masking="random")),
    (dict(cos_loss=False, norm_pix_loss=False, mask_ratio=0.5, masking_strategy=True),
     dict(loss="mse", norm_targets=False, mask_ratio=0.5, masking="semantic_inverted")),
])
def test_converted_config_carries_the_reference_runs_loss_and_masking(tmp_path, flags, want):
    save_reference(tmp_path / "ref.pth", reference_state_dict(), num_heads=4, decoder_num_heads=2, **flags)
    c = convert_reference(tmp_path / "ref.pth", tmp_path / "out").config
    assert {k: getattr(c, k) for k in want} == want
    assert LVMAE.from_pretrained(tmp_path / "out").config.loss == want["loss"]
    assert convert_reference(tmp_path / "ref.pth", masking="semantic").config.masking == "semantic"  # flags win


@pytest.mark.parametrize("model_name, want_heads", [("mae_vit_base_patch16", (12, 16)),
                                                    ("mae_vit_large_patch16_dec512d8b", (16, 16)),
                                                    ("mae_vit_base_custom", (8, 16))])
def test_heads_of_the_references_fixed_architecture_models_come_from_the_model_name(tmp_path, model_name, want_heads):
    # The reference's mae_vit_{base,large,huge}_* builders hard-code their heads (base: 12 / 16) and ignore
    # args.num_heads, which the run still saves at the parser default 8; mae_vit_base_custom reads the args.
    sd = reference_state_dict(D=48, depth=1, Dd=32, ddepth=1, N=16)
    torch.save({"model": sd, "optimizer": {}, "epoch": 0, "scaler": {},
                "args": argparse.Namespace(model=model_name, num_heads=8, decoder_num_heads=16)}, tmp_path / "ref.pth")
    model = convert_reference(tmp_path / "ref.pth", tmp_path / "out")
    assert (model.config.num_heads, model.config.decoder_num_heads) == want_heads
    assert convert_reference(tmp_path / "ref.pth", num_heads=4).config.num_heads == 4  # an explicit flag still wins

    torch.manual_seed(2)
    seqs = [torch.randn(n, 48) for n in (5, 16)]
    visible = [torch.tensor([True, False, True, False, True]), torch.arange(16) % 3 == 0]
    heads_cfg = argparse.Namespace(depth=1, num_heads=want_heads[0], decoder_depth=1, decoder_num_heads=want_heads[1])
    _, pred_ref = naive_forward(sd, heads_cfg, seqs, visible)
    for p, r in zip(LVMAE.from_pretrained(tmp_path / "out").reconstruct(seqs, visible), pred_ref):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5)


def test_unreadable_and_empty_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    """An .npy given to convert-reference printed torch's multi-line weights_only message; an empty file
    "... weights_only=True ()". Both are one line naming the file; an unsafe pickle names its global."""
    import numpy as np

    from lvmae_fast.cli import main

    np.save(tmp_path / "X.npy", np.zeros(3))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("hello")
    torch.save({"model": reference_state_dict(), "args": Evil()}, tmp_path / "evil.pth")
    expected = {"X.npy": "is not a reference checkpoint (a .pth file saved by torch.save",
                "empty.pth": "is empty (0 bytes), not a reference checkpoint (a .pth file saved by torch.save",
                "notes.pth": "is not a reference checkpoint (a .pth file saved by torch.save",
                "evil.pth": "Evil, which torch.load(weights_only=True) does not load"}
    for name, message in expected.items():
        capsys.readouterr()
        assert main(["convert-reference", str(tmp_path / name), "--out", str(tmp_path / "D")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"lvmae convert-reference: error: {tmp_path / name}") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Please file an issue" not in err, err
    assert not (tmp_path / "D").exists()


def test_a_failed_atomic_write_names_the_file_and_leaves_no_temp(tmp_path):
    """torch.save's zip writer reports a full disk as RuntimeError('[enforce fail at inline_container.cc...]
    unexpected pos'): it is a write error (an OSError the CLI prints as one line) naming the file, and the
    temp file goes; the old file stays."""
    import errno

    from lvmae_fast.atomic import WriteError, atomic_write

    target = tmp_path / "w.pt"
    atomic_write(target, lambda tmp: torch.save({"a": 1}, tmp))

    def torch_full(tmp):
        open(tmp, "wb").write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2483714176 vs 2483714068")

    def enospc(tmp):
        open(tmp, "wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=rf"could not write {target}: RuntimeError: \[enforce fail.*MiB free") as err:
        atomic_write(target, torch_full)
    assert isinstance(err.value, OSError) and "\n" not in str(err.value)
    with pytest.raises(WriteError, match=rf"could not write {target}: No space left on device$") as err:
        atomic_write(target, enospc)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    assert torch.load(target) == {"a": 1}


def test_model_dir_files_follow_the_umask(tmp_path):
    """safetensors' save_file replaces the temp file with one of mode 0600: a model dir other users or jobs
    could not read (config.json was 0644)."""
    import os
    import stat

    from lvmae_fast.checkpoint import save_model_dir
    from lvmae_fast.model import LVMAE, LVMAEConfig

    save_model_dir(LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8)), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


class RunsCode:
    """A pickle that would call os.system on load: torch blocks the module (a message other than Evil's)."""

    def __reduce__(self):
        import os
        return (os.system, ("true",))


def _flip_a_byte_of(archive_path, member_suffix: str) -> None:
    """Flip one byte inside a stored (uncompressed) zip member, as a bad disk or copy would."""
    import struct
    import zipfile

    with zipfile.ZipFile(archive_path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(Path(archive_path).read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len] ^= 0x40
    Path(archive_path).write_bytes(bytes(data))


def test_damaged_or_malformed_reference_checkpoints_are_one_line_errors(tmp_path, capsys):
    """A flipped bit in the weights converted silently (torch.load does not check zip CRCs: cls_token came
    out -1.6e38); non-tensor entries, a 'model' that is no dict and a zero width were tracebacks; a pickled
    os.system was refused but called unreadable."""
    from lvmae_fast.cli import main

    save_reference(tmp_path / "flipped.pth", reference_state_dict())
    _flip_a_byte_of(tmp_path / "flipped.pth", "data/0")
    with_epoch = reference_state_dict()
    with_epoch["epoch"] = 3
    torch.save(with_epoch, tmp_path / "epoch.pth")
    torch.save({"model": None}, tmp_path / "none.pth")
    integer = reference_state_dict()
    integer["norm.bias"] = integer["norm.bias"].long()
    save_reference(tmp_path / "integer.pth", integer)
    zero = reference_state_dict()
    zero["cls_token"] = torch.zeros(1, 1, 0)
    save_reference(tmp_path / "zero.pth", zero)
    torch.save({"model": reference_state_dict(), "args": RunsCode()}, tmp_path / "runs_code.pth")
    expected = {"flipped.pth": "damaged data (CRC mismatch in ",
                "epoch.pth": "its state dict holds 'epoch' (int), not a floating-point tensor",
                "none.pth": "its 'model' entry is a NoneType, not a state dict of tensors",
                "integer.pth": "holds 'norm.bias' (torch.int64 tensor), not a floating-point tensor",
                "zero.pth": "cls_token has a width of 0",
                "runs_code.pth": "refused: it pickles "}
    for name, message in expected.items():
        capsys.readouterr()
        assert main(["convert-reference", str(tmp_path / name), "--out", str(tmp_path / "D")]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("lvmae convert-reference: error: ") and message in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "D").exists()
    save_reference(tmp_path / "intact.pth", reference_state_dict())  # the same save, undamaged, converts
    assert main(["convert-reference", str(tmp_path / "intact.pth"), "--out", str(tmp_path / "D")]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_reference_checkpoint_converts(tmp_path, dtype):
    """A checkpoint saved in fp16/bf16 holds the sin-cos tables rounded to that precision (up to 2e-3 off in
    bf16): it was refused as "not the fixed 1-D sin-cos table". Its weights load as they were stored."""
    sd = {k: v.to(dtype) for k, v in reference_state_dict().items()}
    save_reference(tmp_path / "half.pth", sd, num_heads=4, decoder_num_heads=2)
    model = convert_reference(tmp_path / "half.pth")
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"].float())
    wrong = dict(sd, pos_embed=(sd["pos_embed"].float() + 0.05).to(dtype))  # off by more than the rounding
    save_reference(tmp_path / "bad.pth", wrong, num_heads=4, decoder_num_heads=2)
    with pytest.raises(ValueError, match="sin-cos"):
        convert_reference(tmp_path / "bad.pth")


@pytest.mark.parametrize("flag", ["num_heads", "decoder_num_heads"])
def test_zero_heads_are_refused_not_replaced(tmp_path, flag):
    save_reference(tmp_path / "ref.pth", reference_state_dict(), num_heads=4, decoder_num_heads=2)
    with pytest.raises(ValueError, match=f"{flag} must be a positive integer, got 0"):
        convert_reference(tmp_path / "ref.pth", **{flag: 0})


def test_a_saved_mask_ratio_that_is_not_a_number_is_named(tmp_path):
    save_reference(tmp_path / "ref.pth", reference_state_dict(), num_heads=4, decoder_num_heads=2, mask_ratio="abc")
    with pytest.raises(ValueError, match=r"saved args \(its 'args' entry\) hold mask_ratio='abc', not a number"):
        convert_reference(tmp_path / "ref.pth")   # was "could not convert string to float: 'abc'"


def test_a_zero_max_len_is_refused_not_replaced_by_the_table_size(tmp_path):
    save_reference(tmp_path / "ref.pth", reference_state_dict(), num_heads=4, decoder_num_heads=2)
    with pytest.raises(ValueError, match="max_len=0 must be >= 1"):
        convert_reference(tmp_path / "ref.pth", max_len=0)
    assert convert_reference(tmp_path / "ref.pth", max_len=300).config.max_len == 300


def test_a_damaged_model_dir_is_one_value_error_naming_the_file(tmp_path):
    """from_pretrained on a damaged dir raised SafetensorError / JSONDecodeError / a TypeError from torch
    without naming the file."""
    model = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8))
    save_model_dir(model, tmp_path / "m")
    config, weights = tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()
    damage = [(config, "{not json", "not valid JSON"),
              (config, "[1, 2]", "expected a JSON object"),
              (config, json.dumps({**json.loads(good_config), "max_len": 2.5}), "max_len=2.5 is not an int"),
              (config, json.dumps({**json.loads(good_config), "depth": "2"}), "depth='2' is not an int"),
              (weights, good_weights[: len(good_weights) // 2], "unreadable safetensors file")]
    for path, content, message in damage:
        config.write_text(good_config), weights.write_bytes(good_weights)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=message) as err:
            LVMAE.from_pretrained(tmp_path / "m")
        assert str(path) in str(err.value)
    config.write_text(good_config), weights.write_bytes(good_weights)
    assert LVMAE.from_pretrained(tmp_path / "m").config == model.config


def test_replacing_a_model_whose_config_write_fails_leaves_no_old_config(tmp_path, monkeypatch):
    """A model folder replaced (convert-reference again) kept its old config.json when the new config's write
    failed or was killed: the new weights loaded under the old head count without a word (heads are not in
    the tensor shapes). A killed save's weights-sized temp file is removed by the next save."""
    import errno

    from lvmae_fast import checkpoint

    first = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, num_heads=4))
    save_model_dir(first, tmp_path / "m")
    (tmp_path / "m" / ".model.safetensors.k1ll.tmp").write_bytes(b"half of a killed save")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_text", full)
    second = LVMAE(LVMAEConfig.from_preset("tiny", in_dim=8, num_heads=2))
    with pytest.raises(OSError):
        save_model_dir(second, tmp_path / "m")
    assert not (tmp_path / "m" / "config.json").exists()
    assert not (tmp_path / "m" / ".model.safetensors.k1ll.tmp").exists()
    with pytest.raises((FileNotFoundError, ValueError)):
        LVMAE.from_pretrained(tmp_path / "m")
    monkeypatch.undo()
    save_model_dir(second, tmp_path / "m")
    assert LVMAE.from_pretrained(tmp_path / "m").config.num_heads == 2
