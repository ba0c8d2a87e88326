"""Quantization primitives, quantizable layers and the upload payload."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedhq_core.quant import (LSQWeight, STEActivation, act_qrange, act_scale_zp, bias_codes, dequantize, get_act_ranges,
                              integer_weights, mse_weight_scale, pack_update, prepare_deploy, prepare_model, quantize,
                              quant_layers, set_mode, unpack_update, weight_qrange)
from fedhq_core.quant.payload import pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quant_forward_equals_quantize_dequantize(bits):
    # Prepare
    w = torch.randn(16, 8, 3, 3)
    step = mse_weight_scale(w, bits).view(-1, 1, 1, 1)
    qmin, qmax = weight_qrange(bits)
    # Execute
    fake = LSQWeight.apply(w, step, qmin, qmax, 1.0)
    real = dequantize(quantize(w, step, 0.0, qmin, qmax), step, 0.0)
    # Assert: bit-identical, and on the integer grid
    assert torch.equal(fake, real)
    ints = real / step
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.round().min() >= qmin and ints.round().max() <= qmax


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_fake_quant_forward_equals_quantize_dequantize(bits):
    x = torch.randn(4, 8, 5, 5) * 3
    scale, zp = act_scale_zp(torch.tensor(-2.0), torch.tensor(5.0), bits)
    qmin, qmax = act_qrange(bits)
    fake = STEActivation.apply(x, scale, zp, qmin, qmax)
    assert torch.equal(fake, dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp))


def test_qat_layer_forward_equals_deployed_layer_on_same_weights_and_ranges():
    # QAT's fake-quant forward (train path) == PTQ/deploy quantize->dequantize with the same steps/ranges.
    torch.manual_seed(1)
    net = prepare_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)), 3, 4)
    x = torch.randn(5, 3, 8, 8)
    set_mode(net, "observe")
    net(x)
    ranges = get_act_ranges(net)
    prepare_deploy(net, ranges)
    # deploy adds the bias on the integer accumulator's grid (s_x * s_w), as an integer kernel does:
    # at most half a grid step from the float bias, and exactly codes * scale
    for _, m in quant_layers(net):
        codes, scale = bias_codes(m)
        assert torch.equal(m._bias(), codes.float() * scale)
        assert (m._bias() - m.bias).abs().le(scale / 2 + 1e-7).all() and not torch.equal(m._bias(), m.bias)
    with torch.no_grad():                 # biases on their grid: QAT's forward and deploy's are one
        for _, m in quant_layers(net):
            m.bias.copy_(m._bias())
    deployed = net(x)
    set_mode(net, "qat")
    net.eval()  # no EMA update: same ranges
    assert torch.equal(net(x), deployed)


def test_lsq_gradients_match_definition():
    x = torch.tensor([[-3.0, -0.26, 0.1, 0.74, 5.0]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    out = LSQWeight.apply(x, s, -2, 1, 1.0)
    out.sum().backward()
    v = x.detach() / 0.5
    inside = (v >= -2) & (v <= 1)
    assert torch.equal(x.grad, inside.float())
    expected = torch.where(inside, v.round() - v, v.clamp(-2, 1)).sum()
    assert torch.allclose(s.grad.sum(), expected)


def test_mse_scale_beats_max_abs_at_low_bits():
    w = torch.randn(32, 64)
    qmin, qmax = weight_qrange(2)
    err = lambda s: ((dequantize(quantize(w, s[:, None], 0.0, qmin, qmax), s[:, None], 0.0) - w) ** 2).sum()  # noqa: E731
    assert err(mse_weight_scale(w, 2)) < 0.8 * err(w.abs().amax(1) / qmax)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bit_packing_round_trip(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 2**bits, size=1001).astype(np.uint8)
    data = pack_bits(torch.from_numpy(v), bits)
    assert len(data) == int(np.ceil(1001 * bits / 8))
    # the torch packer writes numpy's MSB-first layout, independently computed here
    assert data == np.packbits(np.unpackbits(v[:, None], axis=1)[:, 8 - bits:].reshape(-1)).tobytes()
    assert np.array_equal(unpack_bits(data, bits, 1001), v)


def test_payload_is_really_packed_and_unbiased():
    g = {"w": torch.zeros(64, 128), "b": torch.zeros(64), "n": torch.tensor(3)}
    local = {"w": torch.randn(64, 128) * 1e-3, "b": torch.randn(64) * 1e-3, "n": torch.tensor(4)}
    p8 = pack_update(local, g, 8, torch.Generator().manual_seed(0))
    p4 = pack_update(local, g, 4, torch.Generator().manual_seed(0))
    assert "n" not in p8.tensors  # integer buffers are not sent
    assert 0.45 < p4.nbytes / p8.nbytes < 0.55
    assert p8.nbytes < 64 * 129 * 4 / 3.5
    # Stochastic rounding: the mean of many dequantized 2-bit uploads approaches the update.
    mean = sum(unpack_update(pack_update(local, g, 2, torch.Generator().manual_seed(i)))["w"] for i in range(400)) / 400
    rel = (mean - local["w"]).norm() / local["w"].norm()
    assert rel < 0.12


def test_integer_weights_are_int8_on_grid():
    net = prepare_model(nn.Sequential(nn.Linear(6, 5)), 4, 8)
    prepare_deploy(net, None)
    ints = integer_weights(net)
    q = ints["0.weight_int"]
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    rebuilt = q.float() * ints["0.weight_scale"][:, None]
    set_mode(net, "deploy")
    assert torch.allclose(rebuilt, net[0].wq(net[0].weight, "deploy"))


def test_batched_mse_search_equals_a_sequential_scan():
    torch.manual_seed(3)
    for shape, bits in (((16, 3, 3, 3), 2), ((10, 300), 4), ((4, 2_000_000 // 4), 3)):
        w = torch.randn(*shape)
        flat = w.reshape(shape[0], -1)
        qmin, qmax = weight_qrange(bits)
        amax = flat.abs().amax(1).clamp_min(1e-12)
        best_err, best = None, None
        for a in torch.linspace(0.15, 1.0, 24):                # the scan, one candidate at a time
            s = (a * amax / qmax)[:, None]
            err = ((dequantize(quantize(flat, s, 0.0, qmin, qmax), s, 0.0) - flat) ** 2).sum(1)
            if best is None:
                best_err, best = err, s[:, 0].clone()
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s[:, 0], best)
        torch.testing.assert_close(mse_weight_scale(w, bits), best)


def test_batchnorm_statistics_travel_at_full_precision():
    """BatchNorm means and variances go at 32 bits (``tensor_bits``), the weights at the upload
    bits (even where fedfq gives per-tensor bits): a variance comes back to float32's rounding, so
    an average of uploads stays a variance; the priced upload size counts them at 32 bits too."""
    from fedhq_core.pricing import upload_size
    from fedhq_core.quant import tensor_bits

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    local = {k: v.clone() for k, v in glob.items()}
    local["0.weight"] += 0.01 * torch.randn_like(local["0.weight"])
    local["1.running_var"] = torch.rand(8) * 1e-3          # small variances, far below the weights' scale
    local["1.running_mean"] = torch.randn(8)
    p = pack_update(local, glob, 8, torch.Generator().manual_seed(0))
    assert p.tensors["0.weight"].bits == 8 and p.tensors["1.running_var"].bits == 32
    assert tensor_bits("layer1.0.bn1.running_mean", 4) == 32 and tensor_bits("fc.weight", 4) == 4
    back = unpack_update(p)        # a float32 delta: exact to float32's rounding around the global value
    assert torch.allclose(glob["1.running_var"] + back["1.running_var"], local["1.running_var"], rtol=0, atol=1e-7)
    at8 = unpack_update(pack_update(local, glob, {k: 8 for k in local}, torch.Generator().manual_seed(0)))
    assert p.tensors["1.running_var"].bits == 32 and torch.equal(at8["1.running_var"], back["1.running_var"])
    assert upload_size(glob, 8) == sum(t.nbytes for t in p.tensors.values())


def test_resnet18_aggregates_batchnorm_variances_as_variances(tiny_cfg):
    """Two rounds of ResNet-18 (20 BatchNorms): every averaged running variance is at least the
    floor and none was clamped (at full precision an average of variances is one), and the
    deployed model's outputs are finite. Before, 8-bit stochastically rounded deltas averaged one
    below zero here, the clamp at 0 scaled its channel by ~316 (1/sqrt(eps))."""
    from fedhq_core import run
    from fedhq_core.server import VAR_FLOOR

    sim = run(tiny_cfg.replace(model="resnet18", rounds=2, strategy="all-ptq", max_train_samples=240))
    variances = {k: v for k, v in sim.server.global_state.items() if k.endswith("running_var")}
    assert len(variances) == 20
    assert all(torch.isfinite(v).all() and (v > VAR_FLOOR).all() for v in variances.values())
    with torch.no_grad():
        out = sim.server.eval_model(sim.server.test.x[:64])
    assert torch.isfinite(out).all()
