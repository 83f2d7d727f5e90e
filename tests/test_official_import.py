"""Official-checkpoint import (issue 2): outputs equal the official forward; bad files get clear errors."""
import pytest
import torch

from minconv_dist.models import build_model, from_official_checkpoint, to_official_state_dict
from tests.official_reference import official_forward, random_official_state_dict

CASES = [
    ("minconvgru", "zeros", (6, 7)),
    ("minconvlstm", "circular", None),
    ("minconvexplstm", "cylinder", (6, 8)),
    ("convlstm", "cylinder", None),
    ("convgru", "zeros", (6, 7)),
]


@pytest.mark.parametrize("arch, padding, grid", CASES)
@pytest.mark.parametrize("tanh_encoder", [False, True])
def test_import_matches_official_forward_float64(tmp_path, arch, padding, grid, tanh_encoder):
    H, W = grid or (5, 6)
    sd = random_official_state_dict(arch, 2, 4, 3, grid, padding)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}, "scheduler_state_dict": None, "epoch": 3,
                "iteration": 10, "best_val_error": 0.5}, path)
    model = from_official_checkpoint(path, arch, padding=padding, tanh_encoder=tanh_encoder)
    assert (model.spec["hidden_size"], model.spec["layers"]) == (4, 3) and model.spec["norm"] == ("layer" if grid else "group")
    x = torch.randn(2, 9, 2, H, W, dtype=torch.float64)
    for k in (1, 4, 9):
        ref = official_forward(sd, arch, x, k, padding, tanh_encoder)
        assert torch.allclose(model(x, teacher_steps=k), ref, rtol=0, atol=1e-10), (arch, k)


@pytest.mark.parametrize("arch, padding, grid", CASES)
def test_import_matches_official_forward_float32(arch, padding, grid):
    H, W = grid or (5, 6)
    sd = {k: v.float() for k, v in random_official_state_dict(arch, 1, 6, 2, grid, padding).items()}
    model = from_official_checkpoint(sd, arch, padding=padding)  # a bare state dict in memory
    x = torch.randn(3, 12, 1, H, W)
    assert torch.allclose(model(x, teacher_steps=8), official_forward(sd, arch, x, 8, padding), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["convlstm", "convgru"])
@pytest.mark.parametrize("padding, grid", [("zeros", (5, 6)), ("circular", None), ("cylinder", (5, 6))])
def test_baseline_gradients_match_official_per_step_loop(arch, padding, grid):
    """Our baselines read all frames at once (one unbind; zero padding inside the conv); the official code
    steps frame by frame with F.pad. Same gradients w.r.t. the input and every weight."""
    sd = {k: v.requires_grad_() for k, v in random_official_state_dict(arch, 2, 3, 2, grid, padding).items()}
    model = from_official_checkpoint({k: v.detach() for k, v in sd.items()}, arch, padding=padding)
    x = torch.randn(2, 7, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 2, 5, 6, dtype=torch.float64)
    ref = torch.autograd.grad((official_forward(sd, arch, x, 5, padding) * w).sum(), [x, *sd.values()],
                              materialize_grads=True)  # ConvGRU decodes its last cell output: last norm unused
    ours = torch.autograd.grad((model(x, teacher_steps=5) * w).sum(), [x, *model.parameters()],
                               materialize_grads=True)
    names = ["x", *to_official_state_dict(model)]  # our parameters' official names, in their order
    ref_by_name = dict(zip(["x", *sd], ref))
    for name, grad in zip(names, ours, strict=True):
        assert torch.allclose(grad, ref_by_name[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("arch, padding, grid", CASES)
def test_round_trip_through_official_layout(tmp_path, arch, padding, grid):
    torch.manual_seed(0)
    model = build_model(arch, 3, 5, 2, padding=padding, norm="layer" if grid else "group", grid=grid)
    torch.save(to_official_state_dict(model), tmp_path / "bare.pt")
    again = from_official_checkpoint(tmp_path / "bare.pt", arch, padding=padding)
    x = torch.randn(2, 6, 3, *(grid or (4, 4)))
    assert torch.equal(again(x, teacher_steps=3), model(x, teacher_steps=3))


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        from_official_checkpoint(junk, "minconvgru")
    torch.save({"epoch": 3}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="not an official checkpoint"):
        from_official_checkpoint(tmp_path / "dict.pt", "minconvgru")
    torch.save({"model_state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="encoder.0.weight"):
        from_official_checkpoint(tmp_path / "other.pt", "minconvgru")


@pytest.mark.parametrize(
    "saved_arch, asked_arch, padding, match",
    [
        ("minconvgru", "minconvlstm", "zeros", "don't fit arch 'minconvlstm'"),
        ("convlstm", "minconvlstm", "zeros", r"expected \(12, 4, 3, 3\)"),
        ("minconvgru", "convgru", "zeros", "conv_a"),
        ("minconvgru", "minconvgru", "cylinder", "no CylinderPad"),
    ],
)
def test_weights_that_dont_fit_arch(saved_arch, asked_arch, padding, match):
    sd = random_official_state_dict(saved_arch, 1, 4, 2, None, "zeros")
    with pytest.raises(ValueError, match=match):
        from_official_checkpoint(sd, asked_arch, padding=padding)


def test_cylinder_checkpoint_needs_cylinder_padding():
    sd = random_official_state_dict("minconvgru", 1, 4, 2, None, "cylinder")
    with pytest.raises(ValueError, match="trained with cylinder padding"):
        from_official_checkpoint(sd, "minconvgru", padding="zeros")


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        from_official_checkpoint({}, "transformer")
