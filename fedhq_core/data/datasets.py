"""Datasets as in-memory tensors: the embedded digits, CIFAR-10 image folders, any image folder
(``image-folder``), arrays from the user's own loader (``package.module:loader``), and the
original CIFAR-10 / CIFAR-100 / SVHN release formats read through torchvision from a local
directory. Every reader ends in :func:`standardized`, which checks shapes and classes.

Nothing is downloaded unless ``download=True`` is passed explicitly (``--download``). Decoded
image folders are cached as ``.npz`` under ``<state_dir>/cache`` so a second run does not decode
60,000 JPEGs again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    mean: tuple[float, ...] = ()      # per channel: what a deployed model's inputs are standardised with
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()     # class names by label
    # the key it was loaded with (``worker.DataKey``): what a Dask worker reloads the train split
    # from, so a client's shard indices point at the same images there
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def _normalize(train_u8: np.ndarray, test_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """uint8/float NCHW arrays -> float32 NCHW, standardised per channel with train statistics
    (which are returned too: a deployed model's inputs need the same)."""
    # one float32 copy each, standardised in place (no full-size temporaries: the peak memory of
    # a run is its data load)
    tr = torch.tensor(np.ascontiguousarray(train_u8), dtype=torch.float32)
    te = torch.tensor(np.ascontiguousarray(test_u8), dtype=torch.float32)
    dims = (0, 2, 3)
    mean = tr.mean(dim=dims, keepdim=True)
    std = tr.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return tr.sub_(mean).div_(std), te.sub_(mean).div_(std), mean.flatten().tolist(), std.flatten().tolist()


def standardized(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
                 classes: list[str] | None = None, source: str | None = None) -> Dataset:
    """A :class:`Dataset` from raw arrays: images (N, C, H, W) or (N, H, W), integer labels 0..K-1.
    Checked here, for every reader, with one-line errors naming ``source``: equal image and label
    counts, the same image shape in train and test, at least two classes."""
    src = source or name
    xs = []
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DataError(f"{src}: {split} images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{src}: {split} has {len(x)} images but labels of shape {y.shape}")
        if len(x) == 0:
            raise DataError(f"{src}: the {split} split is empty")
        if not (np.issubdtype(y.dtype, np.integer) and y.min() >= 0):
            raise DataError(f"{src}: {split} labels must be integers >= 0 (got {y.dtype}, min {y.min()})")
        xs.append((x, y.astype(np.int64)))
    (xtr, ytr), (xte, yte) = xs
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{src}: train images are {xtr.shape[1:]} but test images {xte.shape[1:]} (mismatched shapes)")
    k = int(max(ytr.max(), yte.max())) + 1
    if classes is not None:
        if len(classes) < k:
            raise DataError(f"{src}: labels reach {k - 1} but only {len(classes)} class names")
        k = len(classes)
    if len(np.unique(ytr)) < 2:
        raise DataError(f"{src}: fewer than two classes in the train split ({len(np.unique(ytr))})")
    tr, te, mean, std = _normalize(xtr, xte)
    return Dataset(name, Split(tr, torch.as_tensor(ytr)), Split(te, torch.as_tensor(yte)), k, tuple(mean),
                   tuple(std), tuple(classes) if classes is not None else tuple(str(i) for i in range(k)))


def _digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return standardized("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)])


# --- CIFAR-10 as image folders ----------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _decode(paths: list[str], size: tuple[int, int] | None = (32, 32), mode: str = "RGB") -> np.ndarray:
    """Images as (N, H, W, C) uint8. ``size`` resizes every image; None keeps the first image's
    size and refuses any other (one line naming the file)."""
    from PIL import Image

    out: np.ndarray | None = None
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size)
            arr = np.asarray(im)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if out is None:
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DataError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]} but {paths[0]} is "
                            f"{out.shape[2]}x{out.shape[1]} (mismatched shapes)")
        out[i] = arr
    assert out is not None
    return out


def _scan_folder(root: Path, per_class: int = 0) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root}: fewer than two class sub-folders ({len(classes)})")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(f for f in os.listdir(root / c) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise DataError(f"{root / c}: empty class folder (no {'/'.join(IMAGE_EXTS)} files)")
        files = files[:per_class] if per_class > 0 else files
        paths += [str(root / c / f) for f in files]
        labels += [ci] * len(files)
    return paths, labels, classes


def _load_folder_split(root: Path, cache_dir: Path, per_class: int = 0, size: tuple[int, int] | None = (32, 32),
                       mode: str = "RGB") -> tuple[np.ndarray, np.ndarray, list[str]]:
    paths, labels, classes = _scan_folder(root, per_class)
    key = hashlib.sha1(("|".join([str(root.resolve()), str(len(paths)), paths[0], paths[-1], str(size), mode])
                        ).encode()).hexdigest()[:16]
    cache = cache_dir / f"imagefolder-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["x"], z["y"], classes
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_decode, chunks, [size] * len(chunks), [mode] * len(chunks)))
    else:
        parts = [_decode(c, size, mode) for c in chunks]
    if len({p.shape[1:] for p in parts}) > 1:
        raise DataError(f"{root}: images of different sizes (mismatched shapes)")
    x = np.concatenate(parts)
    y = np.asarray(labels, dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return x, y, classes


def _image_folder(data_dir: Path, cache_dir: Path, per_class: int = 0) -> Dataset:
    """Any ``train/<class>/``, ``test/<class>/`` folder: images at their own size (all alike),
    grayscale when the first image is, RGB otherwise; labels are the sorted class names."""
    from PIL import Image

    first = _scan_folder(data_dir / "train", 1)[0][0]
    with Image.open(first) as im:
        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
    return _folder_dataset("image-folder", data_dir, cache_dir, per_class, None, mode)


def _folder_dataset(name: str, data_dir: Path, cache_dir: Path, per_class: int, size: tuple[int, int] | None,
                    mode: str) -> Dataset:
    """``train/`` and ``test/`` class folders with the same class names, read as ``size`` (None:
    the images' own) in ``mode``."""
    xtr, ytr, classes = _load_folder_split(data_dir / "train", cache_dir, per_class, size, mode)
    xte, yte, classes_te = _load_folder_split(data_dir / "test", cache_dir, per_class, size, mode)
    if classes != classes_te:
        raise DataError(f"{data_dir}: train and test class folders differ")
    return standardized(name, xtr.transpose(0, 3, 1, 2), ytr, xte.transpose(0, 3, 1, 2), yte, classes, str(data_dir))


def _plugin_dataset(spec: str, data_dir: str | None, seed: int) -> Dataset:
    """``package.module:loader``: the user's function returns ``(x_train, y_train, x_test,
    y_test)`` or a dict with those keys and optionally ``classes``; it is passed ``data_dir`` and
    ``seed`` if its signature names them."""
    from ..plugins import call_with, load_object

    out = call_with(load_object(spec, "dataset"), "dataset", data_dir=data_dir, seed=seed)
    classes = None
    if isinstance(out, dict):
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in out]
        if missing:
            raise DataError(f"dataset: {spec}: the loader's dict has no {', '.join(missing)}")
        classes = out.get("classes")
        out = (out["x_train"], out["y_train"], out["x_test"], out["y_test"])
    if not (isinstance(out, (tuple, list)) and len(out) == 4):
        raise DataError(f"dataset: {spec}: a loader returns (x_train, y_train, x_test, y_test) or a dict of them")
    arrays = [a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in out]
    return standardized(spec, *arrays, [str(c) for c in classes] if classes is not None else None, f"dataset: {spec}")


def _cifar_folder(data_dir: Path, cache_dir: Path, per_class: int = 0) -> Dataset:
    return _folder_dataset("cifar10-folder", data_dir, cache_dir, per_class, (32, 32), "RGB")


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
    return standardized(name, xtr, np.asarray(ytr, dtype=np.int64), xte, np.asarray(yte, dtype=np.int64),
                        [str(i) for i in range(ncls)], str(data_dir))


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
    elif ":" in name:
        ds = _plugin_dataset(name, data_dir, seed)
    else:
        if data_dir is None:
            raise DataError(f"data_dir: dataset {name!r} needs --data-dir")
        root = Path(data_dir)
        if not root.is_dir() and not download:
            raise DataError(f"{root}: data directory not found")
        if name == "cifar10-folder":
            ds = _cifar_folder(root, Path(cache_dir), per_class)
        elif name == "image-folder":
            ds = _image_folder(root, Path(cache_dir), per_class)
        elif name in ("cifar10", "cifar100", "svhn"):
            ds = _torchvision_sets(name, root, download)
        else:
            raise DataError(f"dataset: unknown dataset {name!r}")
    rng = np.random.default_rng(seed + 7919)
    return dataclasses.replace(ds, train=_subsample(ds.train, max_train, rng), test=_subsample(ds.test, max_test, rng))
