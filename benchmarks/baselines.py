"""Our ConvLSTM / ConvGRU networks against a plain per-step loop, in one process (issue 14, item 3).

The reference is written plainly here: for each frame, encode; per layer one nn.Conv2d over cat([x_t, h])
with the conv's own zero padding (padding=k//2), the gates, residual + LayerNorm over [H, W]; decode
(ConvGRU: its last cell output, as the official code does). Its weights are copied from ours, and outputs
and gradients are checked equal at fp32 tolerance (TF32 off) before anything is timed. Then a full training
step (forward, MSE, backward, Adam) of each, A/B interleaved, median of `--repeats`.

    PYTHONPATH=. python benchmarks/baselines.py                        # H100: T 64 256, fp32 + bf16
    PYTHONPATH=. python benchmarks/baselines.py --device cpu --T 8 --grid 16 16 --hidden 8 --repeats 2
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch
from torch import Tensor, nn

from benchmarks.common import adam_step, check_equal, device_line, interleaved_ms, output_and_grads
from minconv_dist.models import ConvGRUCell, ConvLSTMCell, Network, build_model


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain zero-padded nn.Conv2d (padding=k//2) holding a copy of conv's weights."""
    k = conv.kernel_size[0]
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, k, padding=k // 2).to(conv.weight.device)
    plain.load_state_dict(conv.state_dict())
    return plain


class PerStepLoop(nn.Module):
    """The plain per-step ConvLSTM / ConvGRU network, a copy of `ours` (zeros padding, LayerNorm)."""

    def __init__(self, ours: Network):
        super().__init__()
        cell = ours.cells[0]
        self.lstm = isinstance(cell, ConvLSTMCell)
        if not self.lstm and not isinstance(cell, ConvGRUCell):
            raise ValueError(f"expected ConvLSTM or ConvGRU cells, got {type(cell).__name__}")
        if ours.grid is None:
            raise ValueError("the reference applies LayerNorm over [H, W]: build ours with norm='layer'")
        self.grid = ours.grid
        # Defined in the order of ours, so parameters() of both line up (the equality check compares them so).
        self.encoder = _plain_conv(ours.encoder[0])
        names = ["conv"] if self.lstm else ["conv_a", "conv_b"]
        self.convs = nn.ModuleList(nn.ModuleList(_plain_conv(getattr(c, n)) for n in names) for c in ours.cells)
        self.norms = nn.ModuleList(nn.LayerNorm(self.grid) for _ in ours.cells)
        for norm, theirs in zip(self.norms, ours.norms):
            norm.load_state_dict(theirs.state_dict())
        self.decoder = _plain_conv(ours.decoder)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C, H, W] (normalised units: ours has identity statistics) -> [B, T, C, H, W]."""
        hs: list[Tensor | None] = [None] * len(self.convs)
        cs = list(hs)
        outs = []
        for t in range(x.shape[1]):
            z = self.encoder(x[:, t])
            for layer, (convs, norm) in enumerate(zip(self.convs, self.norms)):
                if hs[layer] is None:  # zero state in the dtype of the layer's input, as ours (bf16 under autocast)
                    hs[layer] = cs[layer] = torch.zeros_like(z)
                h = hs[layer]
                if self.lstm:
                    n, i, f, o = convs[0](torch.cat([z, h], 1)).chunk(4, 1)
                    cs[layer] = torch.sigmoid(f) * cs[layer] + torch.sigmoid(i) * torch.tanh(n)
                    h = torch.sigmoid(o) * torch.tanh(cs[layer])
                else:
                    u, r = torch.sigmoid(convs[0](torch.cat([z, h], 1))).chunk(2, 1)
                    h = (1 - u) * h + u * torch.tanh(convs[1](torch.cat([z, r * h], 1)))
                hs[layer] = h
                z = norm(z + h)
            outs.append(self.decoder(z if self.lstm else h))
        return torch.stack(outs, 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=["convlstm", "convgru"], default=["convlstm", "convgru"])
    parser.add_argument("--T", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="bf16 = CUDA autocast; ignored (fp32 only) on CPU")
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 64])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN picks conv algorithms by timing (both)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    precisions = args.precisions if device.type == "cuda" else ["fp32"]
    torch.set_flush_denormal(True)  # CPU: denormal gates and Adam moments run ~100x slower; not what we measure
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # timed fp32 = TF32 convs
    print(f"device: {device_line(device)}; {args.layers} layers x {args.hidden} channels, grid {args.grid}, "
          f"batch {args.batch}; training step, median of {args.repeats}; cudnn.benchmark={args.cudnn_benchmark}")
    print("| model | T | precision | ms ours | ms per-step loop | ours / loop speed | max abs diff (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.models:
        for T in args.T:
            torch.manual_seed(0)
            ours = build_model(arch, 1, args.hidden, args.layers, grid=tuple(args.grid)).to(device)
            loop = PerStepLoop(ours).to(device)
            x = torch.randn(args.batch, T, 1, *args.grid, device=device)
            diff = check_equal(f"{arch} T={T}", output_and_grads(ours, x), output_and_grads(loop, x))
            target = torch.randn_like(x)
            for precision in precisions:
                steps = {"ours": adam_step(ours, x, target, precision == "bf16"),
                         "loop": adam_step(loop, x, target, precision == "bf16")}
                ms = interleaved_ms(steps, device, warmup=args.warmup, repeats=args.repeats)
                print(f"| {arch} | {T} | {precision} | {ms['ours']:.1f} | {ms['loop']:.1f} "
                      f"| {ms['loop'] / ms['ours']:.2f}x | {diff:.1e} |", flush=True)
            del ours, loop, steps
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
