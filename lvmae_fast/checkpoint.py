"""Model directories (config.json + model.safetensors) and import of amazon-science/lv-mae checkpoints.

Our parameter names equal the reference's state-dict keys, so conversion copies tensors; the fixed
sin-cos tables (`pos_embed`, `decoder_pos_embed`) are not stored: they are recomputed and checked
against the reference's copy so a checkpoint with unexpected positions is refused, not silently changed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text, fsync_dir, remove_stale_temps

log = logging.getLogger(__name__)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_model_dir(model, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory, (WEIGHTS_NAME, CONFIG_NAME))   # a killed save's (weights-sized)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # config.json last, and an old one removed first: a directory with a config always has the weights that
    # go with it. Replacing a model (convert-reference again) left the new weights under the old config when
    # the config write failed or was killed: head counts and the recipe are not in the tensor shapes, so it
    # loaded without a word. Now such a folder has weights and no config, which from_pretrained refuses.
    if (directory / CONFIG_NAME).exists():
        (directory / CONFIG_NAME).unlink()
        fsync_dir(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
    atomic_write_text(directory / CONFIG_NAME, config_text)


def read_json(file) -> dict:
    """A JSON settings file (a model's or an encoder checkpoint's config) as a dict; a damaged one is one
    line naming it (json's own message, 'Expecting value: line 1 column 1 (char 0)', names no file)."""
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


# The network itself: what its weights were trained as (widths, depths and head counts).
ARCHITECTURE_KEYS = ("in_dim", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                     "decoder_num_heads", "mlp_ratio")


def load_model_dir(directory, map_location="cpu", **overrides):
    from .model import LVMAE, LVMAEConfig

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    values = read_json(config_path)
    try:
        saved = LVMAEConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    # Overrides may change how the saved network runs or trains (backends, max_len, the masking and loss
    # recipe), not the network: head counts are in no tensor shape, so another num_heads loaded without a
    # word and computed something else.
    changed = sorted(k for k in ARCHITECTURE_KEYS if k in overrides and overrides[k] != getattr(saved, k))
    if changed:
        raise ValueError(f"from_pretrained({directory}): {', '.join(f'{k}={overrides[k]!r}' for k in changed)} would "
                         f"change the saved network ({', '.join(f'{k}={getattr(saved, k)!r}' for k in changed)}); "
                         f"only {', '.join(sorted(set(values) - set(ARCHITECTURE_KEYS)))} may be overridden")
    try:
        config = LVMAEConfig.from_dict({**saved.to_dict(), **overrides})
    except ValueError as err:
        raise ValueError(f"from_pretrained({directory}) override: {err}") from None
    model = LVMAE(config)
    try:
        state = read_safetensors(weights_path, str(map_location))
    except SafetensorError as err:  # a truncated or overwritten file (its header, its length)
        raise ValueError(f"{weights_path}: unreadable safetensors file ({type(err).__name__}: {err})") from None
    load_matching_state(model, state, f"{weights_path} does not match its config")
    return model.to(map_location)


def read_safetensors(path, device: str = "cpu") -> dict:
    """safetensors' load_file, also for a path that is not UTF-8 (a folder named in another encoding),
    which safetensors cannot open by name: such a file is read into memory first."""
    name = os.fsdecode(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return {key: tensor.to(device) for key, tensor in safetensors_load(Path(path).read_bytes()).items()}
    return load_file(name, device=device)


def load_matching_state(model, state: dict, what: str) -> None:
    """model.load_state_dict(state), with every mismatch (missing or unexpected keys, and shapes, which
    torch reports in a multi-line RuntimeError) in one ValueError that starts with `what`."""
    ours = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} (model {tuple(ours[k].shape)})" for k, v in state.items()
              if k in ours and v.shape != ours[k].shape]
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected or shapes:
        def few(items):  # a width mismatch touches every layer: name the first few
            return items[:4] + [f"... {len(items) - 4} more"] if len(items) > 4 else items
        raise ValueError(f"{what}: missing {few(missing)}, unexpected {few(unexpected)}, other shapes {few(shapes)}")
    model.load_state_dict(state)


# ---- reference import -----------------------------------------------------------------------------
REFERENCE_KIND = "a reference checkpoint (a .pth file saved by torch.save, state dict under 'model')"


def _load_reference_state(path) -> dict:
    """torch.load with weights_only=True; argparse.Namespace (the reference saves its args) allow-listed.
    A file torch cannot read, or one that pickles anything else, is one line naming the file (torch's
    own messages run over many lines and suggest weights_only=False, which must not be done here)."""
    if Path(path).is_dir():
        raise ValueError(f"reference checkpoint {path} is a directory; give the .pth file (the reference's "
                         f"checkpoint-N.pth)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference checkpoint {path} not found")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not {REFERENCE_KIND}")
    torch.serialization.add_safe_globals([argparse.Namespace])
    if zipfile.is_zipfile(path):  # torch.load does not check the zip's CRCs: a flipped bit converted silently
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
            raise ValueError(f"{path} is not {REFERENCE_KIND}: damaged zip ({err})") from None
        if bad is not None:
            raise ValueError(f"{path}: damaged data (CRC mismatch in {bad}); not converted")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": a multi-line warning about plain pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - never fall back to a full unpickle
        # torch words a blocked module's callable "Trying to load unsupported GLOBAL posix.system whose module ..."
        unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
        if unsafe:
            raise ValueError(f"{path}: refused: it pickles {unsafe.group(1)}, which torch.load(weights_only=True) "
                             f"does not load; only {REFERENCE_KIND} is supported") from err
        raise ValueError(f"{path} is not {REFERENCE_KIND}: torch.load cannot read it") from err
    if isinstance(ckpt, dict) and "model" in ckpt:
        state, args, where = ckpt["model"], ckpt.get("args"), "its 'model' entry"
    elif isinstance(ckpt, dict) and "cls_token" in ckpt:
        state, args, where = ckpt, None, "its state dict"
    else:
        raise ValueError(f"{path}: no reference state dict found (expected a dict with key 'model')")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {where} is a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():  # a complex or integer tensor would be cast silently by .float()
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: {where} holds {key!r} ({what}), not a floating-point tensor")
    return state, args


def _count_blocks(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


# Reference models (models_mae.py) whose head counts are fixed in code, (encoder, decoder). A run with one
# of these --model names still saves args.num_heads / args.decoder_num_heads (parser defaults 8 / 16) that
# the model never read, so for them the name, not those args, gives the heads.
REFERENCE_FIXED_HEADS = {
    "mae_vit_base_patch16": (12, 16), "mae_vit_base_patch16_dec512d8b": (12, 16),
    "mae_vit_large_patch16": (16, 16), "mae_vit_large_patch16_dec512d8b": (16, 16),
    "mae_vit_huge_patch14": (16, 16), "mae_vit_huge_patch14_dec512d8b": (16, 16),
}


def reference_heads(args) -> tuple[int | None, int | None]:
    """(encoder, decoder) heads the reference built from its saved args: fixed by --model for the
    timm-style presets, else args.num_heads / args.decoder_num_heads (None where args lack them)."""
    model_name = getattr(args, "model", None)
    if isinstance(model_name, str) and model_name in REFERENCE_FIXED_HEADS:
        return REFERENCE_FIXED_HEADS[model_name]
    return getattr(args, "num_heads", None), getattr(args, "decoder_num_heads", None)


def config_from_reference(state: dict, args=None, num_heads: int | None = None, decoder_num_heads: int | None = None,
                          max_len: int | None = None, **overrides):
    """Infer widths/depths from shapes; heads (not visible in shapes) from flags, the saved args (the
    --model name for the reference's fixed-architecture models), or the reference's 16/16."""
    from .model import LVMAEConfig

    required = ["cls_token", "mask_token", "decoder_pred.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc1.weight", "pos_embed"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"reference state dict lacks keys {missing}")
    D = state["cls_token"].shape[-1]
    Dd = state["mask_token"].shape[-1]
    in_dim = state["decoder_pred.weight"].shape[0]
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    empty = [k for k, n in (("cls_token", D), ("mask_token", Dd), ("decoder_pred.weight", in_dim),
                            ("blocks.0.mlp.fc1.weight", mlp_hidden)) if n == 0]
    if empty:
        raise ValueError(f"reference state dict: {', '.join(empty)} has a width of 0")
    for name, value in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    args_heads, args_dec_heads = reference_heads(args)
    heads = num_heads or args_heads or 16
    dec_heads = decoder_num_heads or args_dec_heads or 16
    return LVMAEConfig(in_dim=in_dim, embed_dim=D, depth=_count_blocks(state, "blocks"), num_heads=heads,
                       decoder_embed_dim=Dd, decoder_depth=_count_blocks(state, "decoder_blocks"),
                       decoder_num_heads=dec_heads, mlp_ratio=mlp_hidden / D,
                       max_len=state["pos_embed"].shape[1] - 1 if max_len is None else max_len,  # 0: refused
                       **{**recipe_from_reference_args(args), **overrides})


def recipe_from_reference_args(args) -> dict:
    """The run's loss and masking from the reference's saved argparse args (main_pretrain.py flags
    --cos_loss, --norm_pix_loss, --mask_ratio, --masking_strategy: importance masking, which is our
    semantic_inverted, else random). Without args: semantic_inverted, the rest our defaults."""
    if args is None:
        return {"masking": "semantic_inverted"}
    recipe = {"loss": "cosine" if getattr(args, "cos_loss", False) else "mse",
              "norm_targets": bool(getattr(args, "norm_pix_loss", False)),
              "masking": "semantic_inverted" if getattr(args, "masking_strategy", True) else "random"}
    if getattr(args, "mask_ratio", None) is not None:
        try:
            recipe["mask_ratio"] = float(args.mask_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"the checkpoint's saved args (its 'args' entry) hold mask_ratio={args.mask_ratio!r}, "
                             f"not a number") from None
    return recipe


def check_model_out(out: Path) -> None:
    """A converted model goes to a new or empty folder, or replaces a model folder's two files: never
    into a training run (its model files are a checkpoint's) or a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the model")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in
                        (CONFIG_NAME, WEIGHTS_NAME))
        if others:
            raise ValueError(f"--out {out} holds more than a model ({', '.join(others[:5])}"
                             f"{' ...' if len(others) > 5 else ''}); choose a new or empty directory")


def convert_reference(ckpt_path, out_dir=None, **config_overrides):
    """Load a reference checkpoint into an LVMAE (and write it as a model dir when out_dir is given)."""
    from .model import LVMAE, sincos_table

    if out_dir is not None:
        check_model_out(Path(out_dir))
    state, args = _load_reference_state(ckpt_path)
    stored = {k: v.dtype for k, v in state.items()}
    state = {k: v.float() for k, v in state.items()}
    config = config_from_reference(state, args, **config_overrides)
    for key, width in (("pos_embed", config.embed_dim), ("decoder_pos_embed", config.decoder_embed_dim)):
        if key in state:
            shape = tuple(state[key].shape)
            if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != width:
                token = "cls_token" if key == "pos_embed" else "mask_token"
                raise ValueError(f"{ckpt_path}: {key} has shape {list(shape)}, expected [1, positions, {width}] "
                                 f"({token} is {width} wide)")
            ref_table = state.pop(key)[0]
            ours = sincos_table(width, ref_table.shape[0] - 1)
            # A checkpoint saved in fp16/bf16 holds the table rounded to that precision (values in [-1, 1]).
            atol = max(1e-5, torch.finfo(stored[key]).eps) if stored[key].is_floating_point else 1e-5
            if not torch.allclose(ref_table, ours, atol=atol):
                raise ValueError(f"{ckpt_path}: {key} is not the fixed 1-D sin-cos table this model uses")
    if config.in_dim != config.embed_dim:
        raise ValueError(f"{ckpt_path}: decoder_pred.weight predicts {config.in_dim}-dim rows but the encoder is "
                         f"{config.embed_dim} wide; reference checkpoints have encoder width == embedding dim")
    model = LVMAE(config)
    load_matching_state(model, state, f"{ckpt_path}: keys do not match the reference layout")
    if out_dir is not None:
        save_model_dir(model, out_dir)
    return model


def _run_convert(args) -> int:
    model = convert_reference(args.checkpoint, args.out, num_heads=args.num_heads,
                              decoder_num_heads=args.decoder_num_heads, max_len=args.max_len)
    c = model.config
    print(f"converted {args.checkpoint} -> {args.out} ({model.num_params() / 1e6:.1f}M params, "
          f"encoder {c.embed_dim}x{c.depth}/{c.num_heads}h, decoder {c.decoder_embed_dim}x{c.decoder_depth}/{c.decoder_num_heads}h)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert-reference", help="import an amazon-science/lv-mae checkpoint",
                       description="Convert an amazon-science/lv-mae checkpoint (.pth, state dict under 'model') into "
                                   "DIR/config.json + DIR/model.safetensors, loadable with LVMAE.from_pretrained(DIR).")
    p.add_argument("checkpoint", help="reference checkpoint (.pth)")
    p.add_argument("--out", required=True, help="output model directory")
    # --model is the reference's training flag, saved in its checkpoint's args: not an option here.
    for flag, side, saved in (("--num-heads", "encoder", "num_heads"), ("--decoder-num-heads", "decoder",
                                                                         "decoder_num_heads")):
        p.add_argument(flag, type=int, default=None,
                       help=f"{side} heads (default: the checkpoint's saved args, i.e. the reference run's "
                            f"--{saved} or the fixed heads of its --model; else 16)")
    p.add_argument("--max-len", type=int, default=None, help="max sequence length (default: the reference's table size)")
    p.set_defaults(func=_run_convert)
