"""A deliberately naive, padded LV-MAE written independently of the packed model (per-sample loops,
explicit attention masks, reference-style parameter names). Tests use it as the ground truth."""
import math

import torch


def naive_sincos(dim, n):
    rows = [[0.0] * dim]
    for p in range(n):
        half = dim // 2
        omegas = [1.0 / 10000 ** (i / half) for i in range(half)]
        rows.append([math.sin(p * w) for w in omegas] + [math.cos(p * w) for w in omegas])
    return torch.tensor(rows, dtype=torch.float64)


def linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(sd, name, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def block(sd, prefix, x, key_valid, heads):
    """x [B, N, C] padded, key_valid [B, N] bool."""
    B, N, C = x.shape
    h = layer_norm(sd, f"{prefix}.norm1", x)
    qkv = linear(sd, f"{prefix}.attn.qkv", h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    x = x + linear(sd, f"{prefix}.attn.proj", out)
    h = layer_norm(sd, f"{prefix}.norm2", x)
    h = torch.nn.functional.gelu(linear(sd, f"{prefix}.mlp.fc1", h))
    return x + linear(sd, f"{prefix}.mlp.fc2", h)


def pad(rows_list):
    n = max(r.shape[0] for r in rows_list)
    out = rows_list[0].new_zeros(len(rows_list), n, rows_list[0].shape[1])
    valid = torch.zeros(len(rows_list), n, dtype=torch.bool)
    for i, r in enumerate(rows_list):
        out[i, : r.shape[0]] = r
        valid[i, : r.shape[0]] = True
    return out, valid


def naive_forward(sd, cfg, seqs, visible):
    """Returns (encoder outputs per sample [1 + keep_i, D], predictions per sample [L_i, d])."""
    D, Dd = sd["cls_token"].shape[-1], sd["mask_token"].shape[-1]
    maxL = max(s.shape[0] for s in seqs)
    # The reference keeps its fp64-computed table as fp32 parameters: round the same way.
    pos = naive_sincos(D, maxL).float().to(seqs[0].dtype)
    dpos = naive_sincos(Dd, maxL).float().to(seqs[0].dtype)
    enc_inputs = []
    for s, vis in zip(seqs, visible):
        idx = torch.nonzero(vis).flatten()
        tok = s[idx]
        if "input_proj.weight" in sd:
            tok = linear(sd, "input_proj", tok)
        tok = tok + pos[idx + 1]
        enc_inputs.append(torch.cat([sd["cls_token"].reshape(1, D) + pos[0], tok]))
    x, valid = pad(enc_inputs)
    for i in range(cfg.depth):
        x = block(sd, f"blocks.{i}", x, valid, cfg.num_heads)
    x = layer_norm(sd, "norm", x)
    enc_out = [x[i, : int(valid[i].sum())] for i in range(len(seqs))]
    dec_inputs = []
    for e, s, vis in zip(enc_out, seqs, visible):
        e = linear(sd, "decoder_embed", e)
        full = sd["mask_token"].reshape(1, Dd).repeat(s.shape[0], 1)
        full = full.clone()
        full[torch.nonzero(vis).flatten()] = e[1:]
        dec_inputs.append(torch.cat([e[:1], full]) + dpos[: s.shape[0] + 1])
    y, dvalid = pad(dec_inputs)
    for i in range(cfg.decoder_depth):
        y = block(sd, f"decoder_blocks.{i}", y, dvalid, cfg.decoder_num_heads)
    y = linear(sd, "decoder_pred", layer_norm(sd, "decoder_norm", y))
    preds = [y[i, 1 : s.shape[0] + 1] for i, s in enumerate(seqs)]
    return enc_out, preds


def naive_loss(sd, cfg, seqs, visible):
    _, preds = naive_forward(sd, cfg, seqs, visible)
    per_token = [((p - s) ** 2).mean(-1)[~v] for p, s, v in zip(preds, seqs, visible)]
    return torch.cat(per_token).mean()
