"""Datasets (embedded, image folders, original release formats) and partitioners."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fedhq_core.data import DataError, load_dataset, partition_dirichlet, partition_iid, partition_kclass


def test_digits_is_embedded_and_seeded(digits):
    again = load_dataset("digits", seed=0)
    assert digits.in_shape == (1, 8, 8) and digits.num_classes == 10
    assert torch.equal(digits.test.y, again.test.y)
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(float(digits.train.x.mean())) < 1e-4  # standardized


def test_iid_covers_everything_once():
    labels = np.repeat(np.arange(10), 50)
    shards = partition_iid(labels, 7, np.random.default_rng(0))
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(500))


def test_dirichlet_min_size_skew_and_determinism():
    labels = np.repeat(np.arange(10), 100)
    a = partition_dirichlet(labels, 20, 0.1, np.random.default_rng(3), min_size=15)
    b = partition_dirichlet(labels, 20, 0.1, np.random.default_rng(3), min_size=15)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert min(len(s) for s in a) >= 15
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    # alpha=0.1 is skewed: most clients are dominated by few classes
    dominant = [np.bincount(labels[s], minlength=10).max() / len(s) for s in a]
    assert np.median(dominant) > 0.5


def test_dirichlet_impossible_min_size_is_an_error():
    with pytest.raises(ValueError, match="min_shard_size"):
        partition_dirichlet(np.zeros(50, dtype=int), 10, 0.5, np.random.default_rng(0), min_size=10)


def test_kclass_gives_k_classes():
    labels = np.repeat(np.arange(10), 40)
    shards = partition_kclass(labels, 10, 2, np.random.default_rng(0))
    assert all(len(np.unique(labels[s])) <= 2 for s in shards)
    assert len(np.concatenate(shards)) == 400


def _write_jpegs(root, n_per_class=3, classes=("cat", "dog")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")


def test_image_folder_loads_and_caches(tmp_path):
    _write_jpegs(tmp_path / "data")
    cache = tmp_path / "cache"
    ds = load_dataset("cifar10-folder", str(tmp_path / "data"), cache_dir=cache)
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.num_classes == 2
    assert len(list(cache.glob("*.npz"))) == 2
    ds2 = load_dataset("cifar10-folder", str(tmp_path / "data"), cache_dir=cache)
    assert torch.equal(ds.train.x, ds2.train.x)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10-folder", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="cifar10/cifar100 files not found"):
        load_dataset("cifar10", str(tmp_path))


def _write_cifar(root, name, n=12):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, meta, meta_key, ncls = "labels", "batches.meta", "label_names", 10
    else:
        base = root / "cifar-100-python"
        files = ["train", "test"]
        key, meta, meta_key, ncls = "fine_labels", "meta", "fine_label_names", 100
    base.mkdir(parents=True)
    for f in files:
        entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: rng.integers(0, ncls, n).tolist()}
        with open(base / f, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / meta, "wb") as fh:
        pickle.dump({meta_key: [f"c{i}" for i in range(ncls)]}, fh)


@pytest.mark.parametrize("name,ncls,ntrain", [("cifar10", 10, 60), ("cifar100", 100, 12)])
def test_original_cifar_formats(tmp_path, name, ncls, ntrain):
    _write_cifar(tmp_path, name)
    ds = load_dataset(name, str(tmp_path))
    assert ds.num_classes == ncls
    assert ds.train.x.shape == (ntrain, 3, 32, 32) and len(ds.test) == 12


def test_a_crafted_cifar_file_cannot_run_code(tmp_path):
    """A pickle gadget in a CIFAR batch is refused in one line; the gadget never runs."""
    import os

    _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"

    class Gadget:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({"data": Gadget(), "labels": [0]}, fh)
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR batch"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_original_svhn_format(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 9), ("test", 5)):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1))})
    ds = load_dataset("svhn", str(tmp_path))
    assert ds.train.x.shape == (9, 3, 32, 32) and len(ds.test) == 5
    assert int(ds.train.y.max()) <= 9 and int(ds.train.y.min()) >= 0


def test_shards_point_a_worker_at_the_images_the_run_trains_on():
    """A benchmark loads its data once (``data_seed``) and runs every seed on it: each shard's key
    is the key that data was loaded with, so a Dask worker that reloads the split from the key
    reads the same images as the run's own process (the digits split depends on the seed: with
    the run's seed in the key, a worker read other images)."""
    from fedhq_core.config import ExperimentConfig
    from fedhq_core.simulation import Simulation, load_data

    base = ExperimentConfig(clients=6, tracking=False)
    ds = load_data(base)                                   # seed 0's split
    sim = Simulation(base.replace(seed=1), dataset=ds)    # a later seed of the same bench
    reloaded = sim.shards[0].key.load().train             # what a worker reads
    for ref in sim.shards:
        assert torch.equal(reloaded.x[ref.idx], ds.train.x[ref.idx])
        assert torch.equal(reloaded.y[ref.idx], ds.train.y[ref.idx])
    # the images are drawn with data_seed alone: a run of seed 1 (fedhq run --seed 1) loads the
    # bench's images; another data_seed splits differently
    assert torch.equal(load_data(base.replace(seed=1)).train.x, ds.train.x)
    assert not torch.equal(load_data(base.replace(data_seed=1)).train.x, ds.train.x)


def test_validation_split_is_held_out_from_clients_and_proxy():
    """The experimenter's validation split, the server's proxy split and the clients' shards are
    disjoint, and together are the training images; the same seed draws the same split."""
    import numpy as np

    from fedhq_core.config import ExperimentConfig
    from fedhq_core.simulation import load_data, split_clients

    import dataclasses

    cfg = ExperimentConfig(clients=6, tracking=False, val_fraction=0.1)
    ds = load_data(cfg)
    x = ds.train.x.clone()
    x[:, 0, 0, 0] = torch.arange(len(x), dtype=x.dtype)           # each image tagged with its index
    ds = dataclasses.replace(ds, train=dataclasses.replace(ds.train, x=x))
    tags = lambda split: set(split.x[:, 0, 0, 0].long().tolist())   # noqa: E731
    proxy, _, shards, val = split_clients(cfg, ds)
    assert len(val) == round(0.1 * len(ds.train))
    pool = set(np.concatenate([s.idx for s in shards]).tolist())
    assert not tags(val) & tags(proxy) and not tags(val) & pool and not tags(proxy) & pool
    assert len(pool) + len(val) + len(proxy) == len(ds.train)
    assert tags(split_clients(cfg, ds)[3]) == tags(val)
    assert split_clients(cfg.replace(val_fraction=0.0), ds)[3] is None
