"""Accuracy properties of PTQ and QAT on real data (small, seeded versions of the README's runs)."""
from __future__ import annotations

import pytest
import torch

from fedhq_core.client import TrainSpec, train_client
from fedhq_core.data import load_dataset
from fedhq_core.models import build_model
from fedhq_core.quant import model_state, prepare_model, set_bits
from fedhq_core.server import calibrate_on_server, evaluate_global

from ..conftest import SHARED_CIFAR


def _fresh(ds, w_bits, a_bits, first_last):
    torch.manual_seed(0)
    m = build_model("cnn", ds.in_shape, ds.num_classes)
    return prepare_model(m, w_bits, a_bits, first_last)


def _train(model, ds, strategy, epochs, lr=0.05, bs=32):
    g = {k: v.clone() for k, v in model_state(model).items()}
    r = train_client(model, 0, ds.train.x, ds.train.y, g, None, TrainSpec(strategy, epochs, bs, lr, 0.9, 5e-4, 32))
    return r


def _ptq_acc(model, ds, w_bits, a_bits, first_last):
    state = model_state(model)
    set_bits(model, w_bits, a_bits, first_last)
    ranges = calibrate_on_server(model, state, ds.train.x[:512])
    return evaluate_global(model, state, ranges, ds.test.x, ds.test.y)


def test_ptq_8bit_is_nearly_free_and_2bit_is_not(digits):
    model = _fresh(digits, 8, 8, 0)
    _train(model, digits, "fp32", epochs=8)
    r8 = _ptq_acc(model, digits, 8, 8, 0)
    r2 = _ptq_acc(model, digits, 2, 2, 0)
    assert r8["acc_fp32"] > 0.9
    assert r8["acc_fp32"] - r8["acc_q"] < 0.01
    assert r2["acc_fp32"] - r2["acc_q"] > 0.10


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 image folder not present")
def test_qat_recovers_most_of_ptq_loss_on_cifar10_at_2bit_weights(tmp_path):
    # README: CIFAR-10 images, small CNN, w2a8 (first/last layer 8-bit) is where PTQ visibly loses.
    ds = load_dataset("cifar10-folder", str(SHARED_CIFAR), per_class=150, cache_dir=tmp_path)
    fp = _fresh(ds, 2, 8, 8)
    _train(fp, ds, "fp32", epochs=6)
    ptq = _ptq_acc(fp, ds, 2, 8, 8)
    qat_model = _fresh(ds, 2, 8, 8)
    r = _train(qat_model, ds, "qat", epochs=6)
    steps = {k: torch.from_numpy(v) for k, v in r.payload.weight_steps.items()}
    qat = evaluate_global(qat_model, model_state(qat_model), r.payload.act_ranges, ds.test.x, ds.test.y, steps)
    loss = ptq["acc_fp32"] - ptq["acc_q"]
    print("fp32", ptq["acc_fp32"], "ptq", ptq["acc_q"], "qat", qat["acc_q"])
    assert loss > 0.05                                   # PTQ visibly loses at 2-bit weights
    assert qat["acc_q"] - ptq["acc_q"] > 0.5 * loss      # QAT recovers most of it
