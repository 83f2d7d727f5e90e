"""Models (issue 2): parallel == step, padding, network semantics, bad input."""
import pytest
import torch

from minconv_dist.models import ARCHS, DEFAULT_H0, MinConvCell, build_model, check_weights, pad

MIN_KINDS = ["gru", "lstm", "explstm"]


def _cell(kind, hidden, padding="zeros", seed=0):
    torch.manual_seed(seed)
    cell = MinConvCell(kind, hidden, padding).double()
    with torch.no_grad():  # larger weights so gates span (0, 1) and g's two branches are both used
        cell.conv.weight.mul_(3)
    return cell


@pytest.mark.parametrize("kind", MIN_KINDS)
@pytest.mark.parametrize("shape", [(2, 7, 3, 5, 6), (1, 1, 2, 4, 4), (3, 12, 1, 3, 9)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_parallel_form_equals_step_form(kind, shape, with_h0):
    B, T, C, H, W = shape
    cell = _cell(kind, C, "circular")
    x = torch.randn(shape, dtype=torch.float64)
    h0 = torch.randn(B, C, H, W, dtype=torch.float64) if with_h0 else None
    h_par, last_par = cell(x, h0)
    h, steps = h0, []
    for t in range(T):
        out, h = cell.step(x[:, t], h)
        steps.append(out)
    h_seq = torch.stack(steps, 1)
    assert torch.allclose(h_par, h_seq, rtol=1e-10, atol=1e-10)
    assert torch.allclose(last_par, h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", MIN_KINDS)
def test_parallel_and_step_gradients_agree(kind):
    cell = _cell(kind, 2)
    x = torch.randn(2, 5, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 2, 4, 4, dtype=torch.float64)
    params = [x, h0, *cell.parameters()]
    g_par = torch.autograd.grad((cell(x, h0)[0] * w).sum(), params)
    h, outs = h0, []
    for t in range(5):
        out, h = cell.step(x[:, t], h)
        outs.append(out)
    g_seq = torch.autograd.grad((torch.stack(outs, 1) * w).sum(), params)
    for a, b in zip(g_par, g_seq):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", MIN_KINDS)
def test_min_cell_gradcheck(kind):
    cell = _cell(kind, 1)
    x = torch.randn(1, 3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.rand(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: cell(x, h0)[0], (x, h0))


def test_default_initial_state_is_official_g0():
    cell = _cell("gru", 2)
    x = torch.randn(1, 3, 2, 4, 4, dtype=torch.float64)
    explicit = cell(x, torch.full((1, 2, 4, 4), DEFAULT_H0, dtype=torch.float64))[0]
    assert torch.equal(cell(x)[0], explicit)
    assert not torch.allclose(cell(x, torch.zeros(1, 2, 4, 4, dtype=torch.float64))[0], explicit)


def test_cylinder_padding_wraps_longitude_and_zero_pads_latitude():
    field = torch.arange(12.0).reshape(1, 1, 3, 4)  # rows = latitude, columns = longitude
    out = pad(field, "cylinder")
    assert out.shape == (1, 1, 5, 6)
    assert torch.equal(out[0, 0, 0], torch.zeros(6)) and torch.equal(out[0, 0, -1], torch.zeros(6))
    assert torch.equal(out[0, 0, 1:-1, 0], field[0, 0, :, -1])  # west halo = easternmost column
    assert torch.equal(out[0, 0, 1:-1, -1], field[0, 0, :, 0])  # east halo = westernmost column
    assert torch.equal(out[0, 0, 1:-1, 1:-1], field[0, 0])
    circ = pad(field, "circular")
    assert torch.equal(circ[0, 0, 0, 1:-1], field[0, 0, -1])  # circular also wraps latitude
    assert torch.equal(pad(field, "zeros")[0, 0, 0], torch.zeros(6))


def test_cylinder_conv_sees_across_the_dateline():
    net = build_model("minconvgru", 1, 2, 1, padding="cylinder", norm="group")
    conv = net.cells[0].conv
    x = torch.zeros(1, 1, 2, 5, 8)
    x[0, 0, :, 2, 0] = 1.0  # a spike on the westernmost column
    y_cyl = conv(x.expand(-1, -1, 2, -1, -1).contiguous()) - conv(torch.zeros(1, 1, 2, 5, 8))
    assert y_cyl[..., -1].abs().sum() > 0  # felt on the easternmost column
    y_zero = build_model("minconvgru", 1, 2, 1, padding="zeros", norm="group").cells[0].conv
    y_zero.load_state_dict(conv.state_dict())
    z = y_zero(x.expand(-1, -1, 2, -1, -1).contiguous()) - y_zero(torch.zeros(1, 1, 2, 5, 8))
    assert z[..., -1].abs().sum() == 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_network_shapes_multichannel(arch, norm):
    model = build_model(arch, 3, 4, 2, padding="cylinder", norm=norm, grid=(6, 8))
    x = torch.randn(2, 5, 3, 6, 8)
    assert model(x, teacher_steps=3).shape == (2, 5, 3, 6, 8)
    forecast, state = model.rollout(x[:, :2], steps=4)
    assert forecast.shape == (2, 4, 3, 6, 8) and len(state) == 2


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_closed_loop_feeds_predictions_back(arch):
    torch.manual_seed(0)
    model = build_model(arch, 1, 3, 2, norm="group").double()
    x = torch.randn(2, 6, 1, 5, 5, dtype=torch.float64)
    y = model(x, teacher_steps=2)
    # Teacher-forced outputs depend only on the frames seen so far.
    assert torch.allclose(y[:, :2], model(x[:, :2], teacher_steps=2), rtol=1e-12)
    # Closed-loop outputs ignore the true frames 2.. and equal feeding back each prediction by hand.
    x_other = x.clone()
    x_other[:, 2:] = 100.0
    assert torch.allclose(model(x_other, teacher_steps=2), y, rtol=1e-12)
    manual = x[:, :2]
    for _ in range(4):
        pred = model(manual, teacher_steps=manual.shape[1])[:, -1:]
        manual = torch.cat([manual, pred], 1)
    assert torch.allclose(manual[:, 2:], y[:, 1:5], rtol=1e-9, atol=1e-10)
    # ... while with full teacher forcing they do depend on the true frames.
    assert not torch.allclose(model(x_other, teacher_steps=6)[:, 3:], model(x, teacher_steps=6)[:, 3:])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rollout_continues_exactly(arch):
    torch.manual_seed(1)
    model = build_model(arch, 2, 3, 2, norm="layer", grid=(4, 5)).double()
    ctx = torch.randn(1, 3, 2, 4, 5, dtype=torch.float64)
    full, _ = model.rollout(ctx, 7)
    first, state = model.rollout(ctx, 3)
    rest, _ = model.rollout(first[:, -1:], 5, state)
    assert torch.allclose(torch.cat([first, rest[:, :4]], 1), full, rtol=1e-10, atol=1e-12)
    # forward with k teacher steps == rollout from the same context
    x = torch.cat([ctx, torch.zeros(1, 4, 2, 4, 5, dtype=torch.float64)], 1)
    assert torch.allclose(model(x, teacher_steps=3)[:, 2:], full[:, :5], rtol=1e-10, atol=1e-12)


def test_batch_and_grid_sizes_are_free_per_call():
    model = build_model("minconvlstm", 1, 4, 1, norm="group", padding="circular")
    for shape in [(1, 3, 1, 8, 8), (5, 2, 1, 16, 12)]:
        assert model(torch.randn(shape), teacher_steps=1).shape == shape


def test_torch_compile_friendly():
    model = build_model("minconvgru", 1, 4, 2, norm="layer", grid=(8, 8))
    x = torch.randn(2, 5, 1, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    assert torch.allclose(compiled(x, teacher_steps=3), model(x, teacher_steps=3), atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randn(2, 1, 8, 8), teacher_steps=1), "5-D tensor"),
        (lambda m: m(torch.randn(2, 3, 2, 8, 8), teacher_steps=1), "2 channels"),
        (lambda m: m(torch.randn(2, 3, 1, 8, 8), teacher_steps=0), r"teacher_steps=0 must lie in \[1, T=3\]"),
        (lambda m: m(torch.randn(2, 3, 1, 8, 8), teacher_steps=4), r"teacher_steps=4"),
        (lambda m: m(torch.randn(2, 3, 1, 9, 8), teacher_steps=2), "LayerNorm grid"),
        (lambda m: m.rollout(torch.randn(2, 3, 1, 8, 8), steps=0), "steps=0"),
    ],
)
def test_bad_network_input(call, match):
    model = build_model("minconvgru", 1, 4, 2, grid=(8, 8))
    with pytest.raises(ValueError, match=match):
        call(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="rnn"), "unknown arch"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(layers=0), "layers=0"),
        (dict(padding="reflect"), "unknown padding"),
        (dict(norm="batch"), "unknown norm"),
        (dict(grid=None), "needs grid"),
        (dict(channels=0), "at least one channel"),
        (dict(channels=[]), "at least one channel"),
    ],
)
def test_bad_build_arguments(kwargs, match):
    args = dict(arch="minconvgru", channels=1, hidden_size=4, layers=2, grid=(8, 8)) | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_chunked_network_equals_unchunked_values_and_grads():
    torch.manual_seed(3)
    plain = build_model("minconvlstm", 1, 3, 2, norm="group").double()
    chunked = build_model("minconvlstm", 1, 3, 2, norm="group", chunk_size=4).double()
    chunked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 11, 1, 5, 5, dtype=torch.float64)
    y_plain, y_chunked = plain(x, teacher_steps=9), chunked(x, teacher_steps=9)
    assert torch.allclose(y_chunked, y_plain, rtol=1e-10, atol=1e-12)
    g_plain = torch.autograd.grad(y_plain.square().sum(), list(plain.parameters()))
    g_chunked = torch.autograd.grad(y_chunked.square().sum(), list(chunked.parameters()))
    for a, b in zip(g_plain, g_chunked):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="chunk_size"):
        build_model("minconvgru", 1, 3, 1, norm="group", chunk_size=0)


def test_normalizing_is_the_models_first_step_and_its_last_is_the_inverse():
    """A model with statistics on physical data == the same weights with identity statistics on normalised
    data, de-normalised: the statistics change units, nothing else."""
    torch.manual_seed(4)
    physical = build_model("minconvlstm", ["z", "t"], 3, 2, norm="group").double()
    physical.normalizer.set_stats([54000.0, 280.0], [3300.0, 15.0])
    plain = build_model("minconvlstm", ["z", "t"], 3, 2, norm="group").double()
    plain.load_state_dict({k: v for k, v in physical.state_dict().items() if not k.startswith("normalizer.")},
                          strict=False)
    mean = torch.tensor([54000.0, 280.0], dtype=torch.float64).view(2, 1, 1)
    std = torch.tensor([3300.0, 15.0], dtype=torch.float64).view(2, 1, 1)
    z = torch.randn(2, 6, 2, 5, 5, dtype=torch.float64)
    expected = plain(z, teacher_steps=4) * std + mean
    torch.testing.assert_close(physical(z * std + mean, teacher_steps=4), expected, rtol=1e-12, atol=1e-9)
    forecast, _ = physical.rollout(z[:, :3] * std + mean, 4)
    torch.testing.assert_close(forecast, plain.rollout(z[:, :3], 4)[0] * std + mean, rtol=1e-12, atol=1e-9)


def test_statistics_survive_bf16_and_travel_in_the_state_dict(tmp_path):
    from minconv_dist.models import load_model_file, save_model_file

    model = build_model("minconvgru", ["geopotential@500"], 4, 1, grid=(8, 8))
    model.normalizer.set_stats([54321.0], [3210.5])
    model.bfloat16()
    assert model.normalizer.mean.dtype == torch.float32 and model.normalizer.mean.item() == 54321.0
    assert model.encoder[0].weight.dtype == torch.bfloat16
    out = model(torch.full((1, 2, 1, 8, 8), 54321.0), teacher_steps=2)
    assert out.dtype == torch.float32 and 4e4 < out.mean() < 7e4  # de-normalised in float32
    model.float()
    save_model_file(tmp_path / "m.pt", model)
    loaded = load_model_file(tmp_path / "m.pt")
    assert loaded.normalizer.channels == ["geopotential@500"] and loaded.normalizer.std.item() == 3210.5
    with pytest.raises(ValueError, match="std > 0"):
        loaded.normalizer.set_stats([0.0], [0.0])
    with pytest.raises(ValueError, match="not a minconv_dist model file"):
        torch.save({"spec": {}, "state_dict": {}}, tmp_path / "old.pt")
        load_model_file(tmp_path / "old.pt")


@pytest.mark.parametrize("arch", ["minconvgru", "minconvlstm", "minconvexplstm"])
def test_warm_states_equal_step_by_step_warm_up(arch):
    """One pass in segments with the state carried == a rollout over all frames up to each end, in float64."""
    torch.manual_seed(5)
    model = build_model(arch, ["z", "t"], 3, 2, padding="cylinder", norm="layer", grid=(4, 6)).double()
    model.normalizer.set_stats([54000.0, 280.0], [3300.0, 15.0])
    scale = torch.tensor([3300.0, 15.0], dtype=torch.float64).view(2, 1, 1)
    mean = torch.tensor([54000.0, 280.0], dtype=torch.float64).view(2, 1, 1)
    x = mean + scale * torch.randn(2, 13, 2, 4, 6, dtype=torch.float64)
    ends = [0, 4, 5, 9]
    first, carry = model.warm_states(x[:, :7], [e for e in ends if e < 7])  # the record in two stretches
    rest, last = model.warm_states(x[:, 7:], [e - 7 for e in ends if e >= 7], carry)
    for end, (state, y) in zip(ends, first + rest):
        expected, expected_state = model.rollout(x[:, :end + 1], 4)
        torch.testing.assert_close(y, expected[:, 0], rtol=1e-10, atol=1e-10)
        more, _ = model.rollout(y[:, None], 3, state)  # the forecast continues from the warm state
        torch.testing.assert_close(more, expected[:, 1:], rtol=1e-10, atol=1e-10)
        step_state = None  # the cells' step form, frame by frame
        for t in range(end + 1):
            _, step_state = model._layers(model._normalized(x[:, t]), step_state, parallel=False)
        for a, b in zip(state, step_state):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    _, full = model.rollout(x, 1)
    for a, b in zip(last, full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_warm_states_rejects_bad_ends():
    model = build_model("minconvgru", 1, 2, 1, norm="group")
    for ends in ([3, 3], [5], [-1]):
        with pytest.raises(ValueError, match="ascending frame indices"):
            model.warm_states(torch.randn(1, 5, 1, 4, 4), ends)


def test_grid_layer_norm_equals_layer_norm_over_the_grid():
    """The flattened form (a workaround for CUDA's 2-D LayerNorm backward) computes what nn.LayerNorm([H, W])
    does, values and gradients, with the same [H, W] parameters (the official checkpoint layout)."""
    from minconv_dist.models.network import GridLayerNorm

    torch.manual_seed(5)
    ours, ref = GridLayerNorm((4, 6)).double(), torch.nn.LayerNorm([4, 6]).double()
    with torch.no_grad():
        for p in (*ours.parameters(), *ref.parameters()):
            p.copy_(torch.arange(24, dtype=torch.float64).view(4, 6) / 10 + 0.5)
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ref)
    grads_ours = torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), g)
    grads_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    for a, b in zip(grads_ours, grads_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_check_scales_each_parameter_and_wants_buffers_exact():
    """The recovery checks' comparison: a tolerance scaled to the largest value of the state dict (the
    normaliser's mean, 54100) would pass both perturbations below; per parameter, with exact buffers, each fails."""
    want = build_model("minconvgru", ["z"], 4, 2, grid=(4, 8))
    want.normalizer.set_stats([54100.0], [3300.0])
    got = build_model("minconvgru", ["z"], 4, 2, grid=(4, 8))
    got.load_state_dict(want.state_dict())
    diffs = check_weights(got, want)  # equal: passes at 0
    assert {d.kind for d in diffs} == {"parameter", "buffer"} and all(d.max_abs == 0 for d in diffs)
    old_allowance = 2 * max(v.abs().max().item() for v in want.state_dict().values()) * 2.0**-8
    assert old_allowance > 400
    with torch.no_grad():
        got.encoder[0].weight[0, 0] += 1e-3 * want.encoder[0].weight.abs().max()
    with pytest.raises(AssertionError, match=r"parameter encoder.0.weight differs by .*, 0.001 of its scale"):
        check_weights(got, want, rel_tol=1e-4)
    check_weights(got, want, rel_tol=2e-3)  # within its own scale's allowance
    got.load_state_dict(want.state_dict())
    with torch.no_grad():
        got.normalizer.mean += 1.0  # 2e-5 of the mean: tiny, but a buffer is copied, never trained
    with pytest.raises(AssertionError, match="buffer normalizer.mean differs by 1"):
        check_weights(got, want, rel_tol=1e-2)


@pytest.mark.parametrize("kind", MIN_KINDS)
def test_chrono_init_spreads_the_retain_gates_time_constants(kind):
    """At zero input the retain gate is a = u / (1 + u), u ~ U(1, max - 1) per channel (Tallec & Ollivier), so the
    time constants 1 / (1 - a) = 1 + u lie in [2, max], spread over it, in every kind; the default is a = 0.5."""
    from minconv_dist.ops.gates import gate_rule

    hidden, longest = 256, 720
    cell = MinConvCell(kind, hidden).double()
    zero = torch.zeros(1, hidden, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        cell.conv.weight.zero_()
        cell.conv.bias.zero_()
        assert torch.allclose(gate_rule(kind)(cell.conv(zero))[0], torch.full_like(zero, 0.5), rtol=0, atol=1e-15)
        cell.chrono_init_(longest, generator=torch.Generator().manual_seed(3))
        tau = 1 / (1 - gate_rule(kind)(cell.conv(zero))[0].flatten())
    u = torch.rand(hidden, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * (longest - 2) + 1
    torch.testing.assert_close(tau, 1 + u, rtol=1e-9, atol=0)  # 1e-9: the gate's float64 rounding, scaled by tau
    assert tau.min() >= 2 and tau.max() <= longest
    assert tau.min() < 0.1 * longest and tau.max() > 0.9 * longest  # spread over the range, not bunched
    with pytest.raises(ValueError, match="max_steps must be >= 3"):
        cell.chrono_init_(2)


def test_chrono_init_is_what_training_builds():
    """`model.chrono_max` reaches every cell of the network a run trains; without it the gate biases keep torch's
    default init (small, both signs)."""
    from minconv_dist.data.stats import NormStats
    from minconv_dist.train.config import load_config
    from minconv_dist.train.datasets import build_network

    stats = NormStats(["geopotential@500", "temperature@850"], [5e4, 270.0], [300.0, 10.0])
    for chrono, expect_long in ((None, False), (500, True)):
        torch.manual_seed(0)
        cfg = load_config(overrides=["model.layers=2", *([f"model.chrono_max={chrono}"] if chrono else [])])
        net = build_network(cfg, stats, (4, 8))
        for cell in net.cells:
            retain_logit = -cell.conv.bias[:cell.hidden]  # minconvgru: a = sigmoid(-k)
            assert (retain_logit.max() > 5) == expect_long  # tau = 1 + e^logit > 149 somewhere only with chrono
