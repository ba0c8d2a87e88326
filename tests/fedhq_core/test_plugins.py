"""Your own model and data: ``package.module:factory``, ``package.module:loader`` and
``image-folder``, with one-line errors for what cannot be used."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from fedhq_core.errors import ConfigError, DataError


def test_custom_model_run_quantizes_prices_and_trains(tiny_cfg):
    from fedhq_core import run
    from fedhq_core.quant import quant_layers

    from fedhq_core.simulation import Simulation

    sim = Simulation(tiny_cfg.replace(model="examples.tiny_resnet:build", first_last_bits=8, w_bits=4, rounds=2))
    start = {k: v.clone() for k, v in sim.server.global_state.items()}
    run(sim.cfg, sim=sim)
    layers = quant_layers(sim.server.eval_model)
    assert [n for n, _ in layers] == ["stem", "block.conv1", "block.conv2", "head"]
    assert [m.wq.bits for _, m in layers] == [8, 4, 4, 8]           # the first/last-layer rule
    summary = sim.summary()
    rounds = summary["rounds"]
    # it trained: SGD moved every quantized layer's weights (BatchNorm statistics alone move at
    # lr 0 and lower the loss too), the clients' loss falls, and the deployed network ends above
    # chance (3 standard errors of a chance classifier on 360 images; 0.17 here after 2 rounds)
    for name, _ in layers:
        moved = (sim.server.global_state[f"{name}.weight"] - start[f"{name}.weight"]).abs().max()
        assert moved > 1e-3, name
    assert summary["total_sim_s"] > 0 and rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert summary["final_acc_q"] > 0.1 + 3 * (0.09 / 360) ** 0.5
    # the trace-based clock priced the custom network: its QAT step costs more than its FP32 step
    book = sim.pricing.trace_book()
    qat, fp32 = book.get("qat", 32).totals(), book.get("fp32", 32).totals()
    assert qat["ops"] > fp32["ops"] > 0 and fp32["flops"] > 0


@pytest.mark.parametrize("spec,match", [
    ("examples.tiny_resnet:no_layers", "no Conv2d or Linear layer"),
    ("examples.no_such_module:build", "cannot import"),
    ("examples.tiny_resnet:missing", "no attribute"),
    ("not a spec", "unknown model"),
])
def test_bad_models_are_one_line_errors(tiny_cfg, spec, match):
    from fedhq_core.simulation import Simulation

    with pytest.raises(ConfigError, match=match) as err:
        Simulation(tiny_cfg.replace(model=spec))
    assert str(err.value).startswith("model: ") and "\n" not in str(err.value)


def test_loader_dataset_runs(tiny_cfg):
    from fedhq_core import run

    sim = run(tiny_cfg.replace(dataset="examples.stripes_data:load", rounds=2))
    assert sim.num_classes == 3 and sim.in_shape == (1, 12, 12)
    assert sim.input_norm["classes"] == ["horizontal", "vertical", "diagonal"]
    assert sim.summary()["final_acc_q"] > 1 / 3 + 0.1        # stripes are learnable


@pytest.fixture
def loaders(monkeypatch):
    mod = types.ModuleType("fedhq_test_loaders")
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 1, 6, 6)), np.arange(20) % 2
    mod.shapes = lambda: (x, y, rng.random((10, 1, 5, 5)), y[:10])
    mod.counts = lambda: (x, y[:19], x, y)
    mod.one_class = lambda: (x, np.zeros(20, dtype=np.int64), x, y)
    mod.broken = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "fedhq_test_loaders", mod)


@pytest.mark.parametrize("name,match", [("shapes", "mismatched shapes"), ("counts", "labels of shape"),
                                        ("one_class", "fewer than two classes"), ("broken", "ZeroDivisionError")])
def test_bad_loader_output_is_one_line(loaders, name, match):
    from fedhq_core.data import load_dataset

    with pytest.raises((DataError, ConfigError), match=match) as err:
        load_dataset(f"fedhq_test_loaders:{name}")
    assert str(err.value).startswith("dataset: ") and "\n" not in str(err.value)


def _write_images(root, classes=("a", "b", "c"), n=8, size=(10, 10), split_sizes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size[::-1], dtype=np.uint8) + 60 * ci   # classes differ in brightness
                Image.fromarray(img.astype(np.uint8), mode="L").save(d / f"{i}.png")


def test_image_folder_run_on_generated_images(tiny_cfg, tmp_path):
    from fedhq_core import run

    _write_images(tmp_path / "imgs", n=40)
    cfg = tiny_cfg.replace(dataset="image-folder", data_dir=str(tmp_path / "imgs"),
                           rounds=2, min_shard_size=4)
    sim = run(cfg)
    assert sim.in_shape == (1, 10, 10) and sim.num_classes == 3
    assert sim.input_norm["classes"] == ["a", "b", "c"] and len(sim.input_norm["mean"]) == 1
    assert sim.summary()["final_acc_q"] > 0.5


def test_image_folder_errors_name_the_folder_or_file(tmp_path):
    from PIL import Image

    from fedhq_core.data import load_dataset

    _write_images(tmp_path / "empty")
    (tmp_path / "empty" / "train" / "d").mkdir()
    with pytest.raises(DataError, match=r"train/d: empty class folder"):
        load_dataset("image-folder", str(tmp_path / "empty"), cache_dir=tmp_path / "c")
    _write_images(tmp_path / "one", classes=("a",))
    with pytest.raises(DataError, match="fewer than two class"):
        load_dataset("image-folder", str(tmp_path / "one"), cache_dir=tmp_path / "c")
    _write_images(tmp_path / "sizes")
    Image.fromarray(np.zeros((12, 10), dtype=np.uint8), mode="L").save(tmp_path / "sizes" / "train" / "b" / "9.png")
    with pytest.raises(DataError, match=r"b/9.png: image is 10x12 .*mismatched shapes"):
        load_dataset("image-folder", str(tmp_path / "sizes"), cache_dir=tmp_path / "c")
