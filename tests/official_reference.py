"""An independent, functional re-implementation of the official forward pass (AdaptiveAILab/minconvrnns).

It works straight from an official-layout state dict with plain torch ops, following the official
code's steps literally: log-space parallel path with `log g(h0)` for h0 = 0, `torch.chunk` splits,
CylinderPad (circular W, then zeros H), step mode from the state the parallel path left, ConvGRU
decoding its last cell output. Tests compare `minconv_dist.models` against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PREFIX = {"minconvgru": "cgru", "convgru": "cgru", "minconvlstm": "clstm", "minconvexplstm": "clstm", "convlstm": "clstm"}


def _g(x):
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def _log_g(x):
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def _conv(sd, name, x, padding):
    if padding == "cylinder":
        x = F.pad(x, (1, 1, 0, 0), mode="circular")
        x = F.pad(x, (0, 0, 1, 1), mode="constant")
        w, b = sd[f"{name}.1.weight"], sd[f"{name}.1.bias"]
        return F.conv2d(x, w, b)
    w, b = sd[f"{name}.0.weight"], sd[f"{name}.0.bias"]
    if padding == "circular":
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w, b)
    return F.conv2d(x, w, b, padding=1)


def _norm(sd, layer, x):
    w, b = sd[f"norms.{layer}.weight"], sd[f"norms.{layer}.bias"]
    if w.dim() == 2:
        return F.layer_norm(x, list(w.shape), w, b, eps=1e-5)
    return F.group_norm(x, 1, w, b, eps=1e-5)


def _min_log_gates(arch, pre, hid):
    if arch == "minconvgru":
        k, h_tilde = torch.chunk(pre, 2, dim=2)
        return -F.softplus(k), -F.softplus(-k) + _log_g(h_tilde)
    f, i, h_tilde = torch.chunk(pre, 3, dim=2)
    if arch == "minconvlstm":
        diff = F.softplus(-f) - F.softplus(-i)
        return -F.softplus(diff), -F.softplus(-diff) + _log_g(h_tilde)
    diff = f - i
    log_f = F.logsigmoid(diff)
    return log_f, log_f - diff + _log_g(h_tilde)


def _min_step(arch, pre, h_prev):
    if arch == "minconvgru":
        z, h_tilde = torch.chunk(pre, 2, dim=1)
        z = torch.sigmoid(z)
        return (1 - z) * h_prev + z * _g(h_tilde)
    f, i, h_tilde = torch.chunk(pre, 3, dim=1)
    if arch == "minconvlstm":
        f, i = torch.sigmoid(f), torch.sigmoid(i)
        return f / (f + i) * h_prev + i / (f + i) * _g(h_tilde)
    fp = torch.sigmoid(f - i)
    return fp * h_prev + (1.0 - fp) * _g(h_tilde)


def official_forward(sd: dict[str, Tensor], arch: str, x: Tensor, tf_steps: int, padding: str = "zeros",
                     tanh_encoder: bool = False) -> Tensor:
    """The official model's output for input x [B, T, C, H, W] with `tf_steps` teacher-forced frames."""
    prefix = PREFIX[arch]
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")})
    b, t, c, h, w = x.shape

    def encode(v):
        v = F.conv2d(v, sd["encoder.0.weight"], sd["encoder.0.bias"])
        return torch.tanh(v) if tanh_encoder else v

    def decode(v):
        return F.conv2d(v, sd["decoder.weight"], sd["decoder.bias"])

    if arch in ("convlstm", "convgru"):
        hid = sd["encoder.0.weight"].shape[0]
        hs = [x.new_zeros(b, hid, h, w) for _ in layers]
        cs = [x.new_zeros(b, hid, h, w) for _ in layers]
        outs = []
        for step in range(t):
            x_t = x[:, step] if step < tf_steps else x_t
            x_t = encode(x_t)
            for layer in layers:
                name = f"{prefix}.{layer}"
                if arch == "convlstm":
                    res = _conv(sd, f"{name}.conv", torch.cat((x_t, hs[layer]), 1), padding)
                    n, i, f, o = torch.split(res, hid, dim=1)
                    cs[layer] = torch.sigmoid(f) * cs[layer] + torch.sigmoid(i) * torch.tanh(n)
                    hs[layer] = torch.sigmoid(o) * torch.tanh(cs[layer])
                else:
                    hp = hs[layer]
                    z, r = torch.chunk(torch.sigmoid(_conv(sd, f"{name}.conv_a", torch.cat([x_t, hp], 1), padding)), 2, 1)
                    cand = torch.tanh(_conv(sd, f"{name}.conv_b", torch.cat([x_t, r * hp], 1), padding))
                    hs[layer] = (1 - z) * hp + z * cand
                z_t = hs[layer]
                x_t = _norm(sd, layer, x_t + z_t)
            x_t = decode(z_t if arch == "convgru" else x_t)
            outs.append(x_t)
        return torch.stack(outs, dim=1)

    hid = sd["encoder.0.weight"].shape[0]
    tf = min(tf_steps, t)
    x_tf = encode(x[:, :tf].reshape(b * tf, c, h, w))
    last_h = []
    for layer in layers:
        pre = _conv(sd, f"{prefix}.{layer}.conv", x_tf, padding).view(b, tf, -1, h, w).contiguous()
        log_coeffs, log_vals = _min_log_gates(arch, pre, hid)
        log_h0 = _log_g(x.new_zeros(b, 1, hid, h, w))
        log_values = torch.cat([log_h0, log_vals], dim=1)
        a_star = F.pad(torch.cumsum(log_coeffs, dim=1), (0, 0, 0, 0, 0, 0, 1, 0))
        out = torch.exp(a_star + torch.logcumsumexp(log_values - a_star, dim=1))[:, 1:].contiguous()
        last_h.append(out[:, -1])
        x_tf = _norm(sd, layer, out.view(b * tf, hid, h, w) + x_tf)
    out = decode(x_tf).view(b, tf, c, h, w)
    outs = [out]
    x_t = out[:, -1]
    for _ in range(t - tf):
        x_t = encode(x_t)
        for layer in layers:
            last_h[layer] = _min_step(arch, _conv(sd, f"{prefix}.{layer}.conv", x_t, padding), last_h[layer])
            x_t = _norm(sd, layer, x_t + last_h[layer])
        x_t = decode(x_t)
        outs.append(x_t.unsqueeze(1))
    return torch.cat(outs, dim=1)


def random_official_state_dict(arch: str, in_channels: int, hidden: int, layers: int, grid: tuple[int, int] | None,
                               padding: str = "zeros", dtype=torch.float64, seed: int = 0) -> dict[str, Tensor]:
    """A state dict laid out exactly as the official code writes it (MODELS.md), random weights."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale)

    idx = 1 if padding == "cylinder" else 0
    prefix = PREFIX[arch]
    convs = {"minconvgru": {"conv": (2, 1)}, "minconvlstm": {"conv": (3, 1)}, "minconvexplstm": {"conv": (3, 1)},
             "convlstm": {"conv": (4, 2)}, "convgru": {"conv_a": (2, 2), "conv_b": (1, 2)}}[arch]
    sd = {"encoder.0.weight": rnd(hidden, in_channels, 1, 1), "encoder.0.bias": rnd(hidden)}
    for layer in range(layers):
        for name, (o, i) in convs.items():
            sd[f"{prefix}.{layer}.{name}.{idx}.weight"] = rnd(o * hidden, i * hidden, 3, 3, scale=0.15)
            sd[f"{prefix}.{layer}.{name}.{idx}.bias"] = rnd(o * hidden)
    for layer in range(layers):
        shape = tuple(grid) if grid is not None else (hidden,)
        sd[f"norms.{layer}.weight"] = 1 + rnd(*shape, scale=0.1)
        sd[f"norms.{layer}.bias"] = rnd(*shape, scale=0.1)
    sd["decoder.weight"] = rnd(in_channels, hidden, 1, 1)
    sd["decoder.bias"] = rnd(in_channels)
    return sd
