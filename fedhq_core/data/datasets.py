"""Datasets as in-memory tensors: the embedded digits, CIFAR-10 image folders, and the original
CIFAR-10 / CIFAR-100 / SVHN release formats read through torchvision from a local directory.

Nothing is downloaded unless ``download=True`` is passed explicitly (``--download``). Decoded
image folders are cached as ``.npz`` under ``<state_dir>/cache`` so a second run does not decode
60,000 JPEGs again.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


from ..errors import DataError


@dataclass
class Split:
    """Normalized images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> "Split":
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[idx_t], self.y[idx_t])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def _normalize(train_u8: np.ndarray, test_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8/float NHWC or NCHW arrays -> float32 NCHW, standardised with train statistics."""
    # one float32 copy each, standardised in place (no full-size temporaries: the peak memory of
    # a run is its data load)
    tr = torch.tensor(np.ascontiguousarray(train_u8), dtype=torch.float32)
    te = torch.tensor(np.ascontiguousarray(test_u8), dtype=torch.float32)
    dims = (0, 2, 3)
    mean = tr.mean(dim=dims, keepdim=True)
    std = tr.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return tr.sub_(mean).div_(std), te.sub_(mean).div_(std)


def _digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    tr, te = _normalize(xtr, xte)
    return Dataset("digits", Split(tr, torch.as_tensor(ytr)), Split(te, torch.as_tensor(yte)), 10)


# --- CIFAR-10 as image folders ----------------------------------------------------------

def _decode(paths: list[str]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB").resize((32, 32)) if im.size != (32, 32) else im.convert("RGB"))
        out[i] = arr
    return out


def _scan_folder(root: Path, per_class: int = 0) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders found")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(f for f in os.listdir(root / c) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        files = files[:per_class] if per_class > 0 else files
        paths += [str(root / c / f) for f in files]
        labels += [ci] * len(files)
    if not paths:
        raise DataError(f"{root}: no images found")
    return paths, labels, classes


def _load_folder_split(root: Path, cache_dir: Path, per_class: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    paths, labels, classes = _scan_folder(root, per_class)
    key = hashlib.sha1(("|".join([str(root.resolve()), str(len(paths)), paths[0], paths[-1]])).encode()).hexdigest()[:16]
    cache = cache_dir / f"imagefolder-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["x"], z["y"], classes
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            x = np.concatenate(list(ex.map(_decode, chunks)))
    else:
        x = np.concatenate([_decode(c) for c in chunks])
    y = np.asarray(labels, dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return x, y, classes


def _cifar_folder(data_dir: Path, cache_dir: Path, per_class: int = 0) -> Dataset:
    xtr, ytr, classes = _load_folder_split(data_dir / "train", cache_dir, per_class)
    xte, yte, classes_te = _load_folder_split(data_dir / "test", cache_dir, per_class)
    if classes != classes_te:
        raise DataError(f"{data_dir}: train and test class folders differ")
    tr, te = _normalize(xtr.transpose(0, 3, 1, 2), xte.transpose(0, 3, 1, 2))
    return Dataset("cifar10-folder", Split(tr, torch.as_tensor(ytr)), Split(te, torch.as_tensor(yte)), len(classes))


# --- original release formats through torchvision -------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR release's python batches are pickles: read them allowing only what a batch holds
    (dicts, lists, strings, numbers and numpy arrays), so a crafted ``--data-dir`` cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a CIFAR batch holds")


def _read_cifar_file(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: cifar10/cifar100 files not found; pass --download to fetch the release")
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a CIFAR batch ({str(err)[:120]})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR batch (a {type(entry).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_release(name: str, data_dir: Path, download: bool):
    """CIFAR-10/100 in the release's python format. ``--download`` fetches it with torchvision (which
    checks every file's md5); reading is ours, with a restricted unpickler, downloaded or not."""
    from torchvision import datasets as tvd

    base = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if download:
        base(str(data_dir), train=True, download=True)
    folder = data_dir / base.base_folder
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def read(files) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fn, _md5 in files:
            entry = _read_cifar_file(folder / fn)
            try:
                xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(entry[label_key], dtype=np.int64))
            except (KeyError, ValueError) as err:
                raise DataError(f"{folder / fn}: not a {name} batch ({type(err).__name__}: {err})") from None
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read(base.train_list)
    xte, yte = read(base.test_list)
    classes = _read_cifar_file(folder / base.meta["filename"]).get(base.meta["key"])
    ncls = 10 if name == "cifar10" else 100
    if classes is not None and len(classes) != ncls:
        raise DataError(f"{folder / base.meta['filename']}: {len(classes)} class names, expected {ncls}")
    return xtr, ytr, xte, yte, ncls


def _torchvision_sets(name: str, data_dir: Path, download: bool):
    from torchvision import datasets as tvd

    # SVHN's release is .mat files (scipy.io, no pickle); torchvision checks each file's md5 before
    # reading, so the loader checks presence instead and can be tested on small files in the same
    # format. Downloads keep torchvision's checks.
    def exists_only(cls, files):
        class _Local(cls):  # type: ignore[misc, valid-type]
            def _check_integrity(self) -> bool:  # noqa: D401
                return all((Path(self.root) / f(self)).is_file() for f in files)
        return _Local

    try:
        if name in ("cifar10", "cifar100"):
            xtr, ytr, xte, yte, ncls = _cifar_release(name, data_dir, download)
        else:
            cls = tvd.SVHN if download else exists_only(tvd.SVHN, [lambda s: s.filename])
            tr = cls(str(data_dir), split="train", download=download)
            te = cls(str(data_dir), split="test", download=download)
            xtr, ytr, xte, yte = tr.data, np.asarray(tr.labels), te.data, np.asarray(te.labels)
            ncls = 10
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{data_dir}: {name} files not found or unreadable ({err}); pass --download to fetch them") from None
    trn, ten = _normalize(xtr, xte)
    return Dataset(name, Split(trn, torch.as_tensor(ytr, dtype=torch.long)),
                   Split(ten, torch.as_tensor(yte, dtype=torch.long)), ncls)


def _subsample(split: Split, n: int, rng: np.random.Generator) -> Split:
    if n <= 0 or n >= len(split):
        return split
    return split.subset(np.sort(rng.choice(len(split), size=n, replace=False)))


def load_dataset(name: str, data_dir: str | None = None, *, download: bool = False, seed: int = 0,
                 test_fraction: float = 0.2, max_train: int = 0, max_test: int = 0,
                 cache_dir: str | os.PathLike = ".fedhq/cache", per_class: int = 0) -> Dataset:
    """Load ``name`` into memory, optionally subsampled (seeded). ``per_class`` > 0 reads only the
    first N files of each class folder (image folders only; for quick tests)."""
    if name == "digits":
        ds = _digits(test_fraction, seed)
    else:
        if data_dir is None:
            raise DataError(f"data_dir: dataset {name!r} needs --data-dir")
        root = Path(data_dir)
        if not root.is_dir() and not download:
            raise DataError(f"{root}: data directory not found")
        if name == "cifar10-folder":
            ds = _cifar_folder(root, Path(cache_dir), per_class)
        elif name in ("cifar10", "cifar100", "svhn"):
            ds = _torchvision_sets(name, root, download)
        else:
            raise DataError(f"dataset: unknown dataset {name!r}")
    rng = np.random.default_rng(seed + 7919)
    return Dataset(ds.name, _subsample(ds.train, max_train, rng), _subsample(ds.test, max_test, rng), ds.num_classes)
