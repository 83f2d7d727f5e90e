"""Is a GPU training step a function of its inputs alone? A process restarted from a checkpoint (a killed worker, a
`--resume`) must redo the same arithmetic. Two things could make it differ:

- the Triton autotuner: each new process times the tile configs again and may pick another; a tile of BT steps
  is scanned as a tree (`tl.associative_scan`), so another BT or layout may round differently;
- cuDNN or atomics: a kernel whose result varies from call to call with the same inputs.

For each case (plain scan and fused gates, fp32 and bf16, short / e2e / long-walk shapes) this runs the forward with
every forward config and the backward with every backward config on the same inputs, and counts how many distinct
bit patterns they give; and repeats one config and a model's training-step gradients to catch run-to-run noise.

    python benchmarks/scan_determinism.py      # on the GPU machine; one markdown table
"""
from __future__ import annotations

import contextlib
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minconv_dist.models import build_model  # noqa: E402
from minconv_dist.ops.scan import triton_scan as ts  # noqa: E402

SHAPES = {"demo [4, 20, 12288]": (4, 20, 12288), "e2e [2, 8, 16384]": (2, 8, 16384),
          "long walk [1, 730, 12288]": (1, 730, 12288), "long [1, 8760, 12288]": (1, 8760, 12288)}


@contextlib.contextmanager
def forced(kernel, config) -> Iterator[None]:
    """Run `kernel` (an autotuned Triton kernel) with `config` only: no timing, no choice."""
    saved = kernel.configs, dict(kernel.cache)
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved[0], saved[1]


def label(config) -> str:
    return f"BT{config.kwargs['BT']}/BD{config.kwargs['BD']}/w{config.num_warps}"


def run(kind: str, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, g: torch.Tensor
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(h, [grads]) of one scan with upstream gradient g."""
    xs = [t.detach().clone().requires_grad_(True) for t in ((x, y, h0) if kind == "plain" else (x, h0))]
    h = ts.scan_triton(*xs)[0] if kind == "plain" else ts.gate_scan_triton(kind, *xs)[0]
    h.backward(g)
    return h.detach(), [t.grad for t in xs]


def groups(results: list[tuple[str, list[torch.Tensor]]]) -> list[list[str]]:
    """Config labels grouped by bit-equal results."""
    out: list[tuple[list[torch.Tensor], list[str]]] = []
    for name, tensors in results:
        for ref, names in out:
            if all(torch.equal(a, b) for a, b in zip(ref, tensors)):
                names.append(name)
                break
        else:
            out.append((tensors, [name]))
    return [names for _, names in out]


def case(kind: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple[str, str, str]:
    B, T, D = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = {"plain": 1, "gru": 2, "lstm": 3}[kind]
    x = torch.randn(B, T, blocks * D, device="cuda", generator=gen).to(dtype)
    y = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype)
    if kind == "plain":
        x = torch.sigmoid(x.float()).to(dtype)  # a in (0, 1)
    h0 = torch.randn(B, D, device="cuda", generator=gen).to(dtype)
    g = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype)
    first_bwd = ts._bwd_kernel.configs[0]
    fwd = []
    for config in ts._FWD_CONFIGS:
        with forced(ts._fwd_kernel, config), forced(ts._bwd_kernel, first_bwd):
            fwd.append((label(config), [run(kind, x, y, h0, g)[0]]))
    bwd = []
    for config in ts._CONFIGS:
        with forced(ts._fwd_kernel, ts._FWD_CONFIGS[0]), forced(ts._bwd_kernel, config):
            bwd.append((label(config), run(kind, x, y, h0, g)[1]))
    with forced(ts._fwd_kernel, ts._FWD_CONFIGS[0]), forced(ts._bwd_kernel, first_bwd):
        again = [run(kind, x, y, h0, g) for _ in range(2)]
    repeat = all(torch.equal(a, b) for a, b in zip([again[0][0], *again[0][1]], [again[1][0], *again[1][1]]))
    show = lambda gs: f"{len(gs)} of {sum(map(len, gs))}" + ("" if len(gs) == 1 else f": {gs}")
    return show(groups(fwd)), show(groups(bwd)), "yes" if repeat else "**no**"


def model_step_repeats(dtype: torch.dtype) -> bool:
    """The demo network's training-step gradients, twice from the same weights and batch: bit-equal?"""
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z", "t"], 24, 3, grid=(16, 32), padding="cylinder").cuda().to(dtype)
    x = torch.randn(4, 21, 2, 16, 32, device="cuda")
    grads = []
    for _ in range(2):
        model.zero_grad()
        ((model(x[:, :-1].to(dtype), teacher_steps=16).float() - x[:, 1:]) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def main() -> None:
    print(f"# Scan determinism: `python benchmarks/scan_determinism.py`, {torch.cuda.get_device_name(0)}, torch "
          f"{torch.__version__}, {datetime.date.today().isoformat()}\n")
    print("| case | dtype | shape [B, T, D] | distinct forwards over configs | distinct backwards over configs "
          "| one config twice equal |\n|---|---|---|---|---|---|")
    for kind in ("plain", "gru", "lstm"):
        for dtype in (torch.float32, torch.bfloat16):
            for name, shape in SHAPES.items():
                if kind != "gru" and name.startswith("long ["):
                    continue
                fw, bw, rep = case(kind, dtype, shape)
                print(f"| {kind} | {str(dtype)[6:]} | {name} | {fw} | {bw} | {rep} |", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"\nMinConvGRU training-step gradients twice, {str(dtype)[6:]}: "
              f"{'bit-equal' if model_step_repeats(dtype) else '**differ**'}", flush=True)


if __name__ == "__main__":
    main()
