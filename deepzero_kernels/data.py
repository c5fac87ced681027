"""Datasets for the trainer and experiments: embedded digits, CIFAR-10 (python format), synthetic.

Everything is a plain in-memory tensor; a batch iterator draws its order from an explicit
``torch.Generator`` so a run (and a resumed run) is reproducible bit for bit.

* :func:`digits` -- scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), shipped
  with scikit-learn: no download. Fixed stratified train/test split, normalised.
* :func:`cifar10` -- CIFAR-10 from a directory in the standard python pickle format
  (``data_batch_1..5``, ``test_batch``), read by an unpickler that admits only the types those
  files hold (a crafted file cannot run code). Images are kept as uint8 (150 MB instead of 600 MB of
  float32) and converted, augmented and normalised per batch by :meth:`Dataset.prepare`.
* :func:`synthetic` -- Gaussian class clusters of any shape (learnable, so smoke tests can see
  accuracy rise).
* a user's data: :func:`tensor_file` (``.npz``/``.pt`` with ``x_train, y_train, x_test, y_test``) or
  :func:`user_dataset` (``"package.module:factory"``), both through :func:`from_tensors`.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "digits", "cifar10", "synthetic", "load_dataset", "from_tensors", "tensor_file", "user_dataset",
           "batches",
           "random_crop_flip", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_URL", "DatasetError"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# Per-channel statistics of the CIFAR-10 training set (the usual values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


class DatasetError(ValueError):
    """A dataset file exists but cannot be used (corrupt, truncated, wrong format)."""


@dataclass
class Dataset:
    """Train/test tensors plus how to turn a batch of stored inputs into model inputs.

    ``x_*`` are either float32 model-ready inputs (digits, synthetic) or uint8 images
    (CIFAR-10, ``(N, 3, 32, 32)``) that :meth:`prepare` converts, augments and normalises.
    """
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: Optional[Tuple[float, ...]] = None   # per-channel normalisation applied in prepare()
    std: Optional[Tuple[float, ...]] = None
    augment: bool = False                      # random crop (padding 4) + horizontal flip
    info: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1]) if self.x_train.dim() >= 2 else 1

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        for k in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def prepare(self, x: torch.Tensor, train: bool, generator: Optional[torch.Generator] = None):
        """Stored batch -> float model input. Augmentation only when ``train`` and enabled;
        its randomness comes from ``generator`` (required then, for reproducibility)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if train and self.augment:
            if generator is None:
                raise ValueError("augmentation needs an explicit torch.Generator")
            x = random_crop_flip(x, padding=4, generator=generator)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


# ----------------------------------------------------------------------------- augmentation
def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None,
                     flip: bool = True) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image (same size as the input) and random
    horizontal flip (p=0.5), as torchvision's RandomCrop(padding)+RandomHorizontalFlip, but
    vectorised over the batch. ``x``: ``(B, C, H, W)`` float in [0, 1] (padding is black,
    i.e. applied before normalisation like torchvision)."""
    B, C, H, W = x.shape
    # Random numbers are drawn on the CPU generator then moved: same stream on every device.
    oy = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(x.device)
    flips = (torch.rand(B, generator=generator) < 0.5).to(x.device) if flip else None
    xp = F.pad(x, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]   # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]   # (B,1,1,W)
    bidx = torch.arange(B, device=x.device)[:, None, None, None]
    cidx = torch.arange(C, device=x.device)[None, :, None, None]
    out = xp[bidx, cidx, rows, cols]
    if flips is not None:
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out


# ----------------------------------------------------------------------------- iteration
def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None,
            shuffle: bool = True, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Yield index tensors covering ``range(n)`` in batches; the order is a permutation drawn
    from ``generator`` when ``shuffle`` (so a checkpointed generator state reproduces it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


# ----------------------------------------------------------------------------- digits
def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits: ``(N, 1, 8, 8)`` float32, 10 classes.

    The split is stratified and fixed (``split_seed``), so every run and every seed of the
    trainer sees the same 1437 train / 360 test images. Pixels (0..16) are standardised with
    the training set's mean and std.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                          random_state=split_seed)
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    return Dataset("digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                   torch.from_numpy(yte), num_classes=10,
                   info={"source": "sklearn.datasets.load_digits", "split_seed": split_seed,
                         "test_fraction": test_fraction, "pixel_mean": mean, "pixel_std": std})


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_dir(data_dir: str) -> str:
    """Accept either the batches directory itself or its parent (``cifar-10-batches-py``)."""
    sub = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(data_dir, CIFAR10_TEST_FILE)) and os.path.isdir(sub):
        return sub
    return data_dir


class _UnsafePickle(pickle.UnpicklingError):
    """A pickle names a global that a CIFAR-10 batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batch files that admits only what the real files hold: dicts,
    lists, strings/bytes, ints and NumPy arrays. ``pickle.load`` would call any importable
    function a crafted file names (``os.system``, ``builtins.exec``, ...); here every global
    outside the few NumPy array constructors is refused before anything is called."""

    def find_class(self, module, name):
        try:  # NumPy >= 2 keeps the implementation in numpy._core; old files name numpy.core
            from numpy._core import multiarray, numeric
        except ImportError:  # pragma: no cover - NumPy 1.x
            from numpy.core import multiarray, numeric
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        for pkg in ("numpy.core", "numpy._core"):
            allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct  # arrays
            allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar              # NumPy scalars
            allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer          # arrays, protocol 5
        if (module, name) not in allowed:
            raise _UnsafePickle(f"{module}.{name}")
        return allowed[(module, name)]


def _read_cifar_batch(path: str, expect_n: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CIFAR-10 file {path!r} not found. Download the 'CIFAR-10 python version' "
            f"(cifar-10-python.tar.gz) from {CIFAR10_URL}, extract it and pass the "
            f"'cifar-10-batches-py' directory (or its parent) as --data-dir.")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _UnsafePickle as e:
        raise DatasetError(f"CIFAR-10 file {path!r} refers to {e}, which a CIFAR-10 batch never holds "
                           f"(only dicts, lists, strings, ints and NumPy arrays): refusing to load it, "
                           f"since unpickling it could run code. Re-download the dataset from "
                           f"{CIFAR10_URL}") from None
    except Exception as e:  # truncated pickle, wrong file, ... all mean the same to the user
        raise DatasetError(f"CIFAR-10 file {path!r} is corrupt or not a CIFAR-10 python batch "
                           f"({type(e).__name__}: {e}); re-download it from {CIFAR10_URL}") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 file {path!r} does not hold a dict (got "
                           f"{type(batch).__name__}); is it the python version from {CIFAR10_URL}?")
    # Keys are bytes when the file was written by Python 2 (the official files), str otherwise.
    get = lambda k: batch.get(k.encode(), batch.get(k))  # noqa: E731
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise DatasetError(f"CIFAR-10 file {path!r} lacks the 'data' or 'labels' entry "
                           f"(keys: {sorted(map(str, batch))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"CIFAR-10 file {path!r}: 'data' must be uint8 of shape (N, 3072), "
                           f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"CIFAR-10 file {path!r}: {data.shape[0]} images but labels of "
                           f"shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"CIFAR-10 file {path!r}: labels outside 0..9 "
                           f"(min {labels.min()}, max {labels.max()})")
    if expect_n is not None and data.shape[0] != expect_n:
        raise DatasetError(f"CIFAR-10 file {path!r} holds {data.shape[0]} images, expected "
                           f"{expect_n}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10(data_dir: str, augment: bool = True, expect_full: bool = False) -> Dataset:
    """CIFAR-10 from ``data_dir`` in the standard python format. Train images get the paper's
    augmentation (random crop with padding 4, horizontal flip) when ``augment``; all images
    are normalised per channel. ``expect_full`` checks 10000 images per file."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"CIFAR-10 directory {data_dir!r} does not exist. Download the 'CIFAR-10 python version' "
            f"from {CIFAR10_URL} and extract it there (it holds data_batch_1..5 and test_batch).")
    d = _cifar_dir(data_dir)
    n = 10000 if expect_full else None
    parts = [_read_cifar_batch(os.path.join(d, f), n) for f in CIFAR10_TRAIN_FILES]
    xte, yte = _read_cifar_batch(os.path.join(d, CIFAR10_TEST_FILE), n)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                   torch.from_numpy(yte), num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                   augment=augment, info={"data_dir": os.path.abspath(d)})


# ----------------------------------------------------------------------------- synthetic
def synthetic(shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, n_train: int = 512,
              n_test: int = 256, seed: int = 0, noise: float = 1.0) -> Dataset:
    """Gaussian class clusters of any per-sample ``shape``: ``x = prototype[y] + noise * N(0, I)``
    with a random prototype per class. Deterministic in ``seed``, learnable and (unlike labels
    of a random teacher) learnable in a way that generalises, so smoke tests see accuracy rise."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"synthetic shape must be non-empty positive sizes, got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, *shape, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    x = protos[y] + noise * torch.randn(n_train + n_test, *shape, generator=g)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                   num_classes=num_classes, info={"seed": seed, "shape": list(shape), "noise": noise})


def load_dataset(name: str, data_dir: Optional[str] = None, *, augment: bool = True,
                 synthetic_shape: Sequence[int] = (3, 32, 32), synthetic_n: Tuple[int, int] = (512, 256),
                 seed: int = 0) -> Dataset:
    """Dispatch by name: ``digits``, ``cifar10`` (needs ``data_dir``), ``synthetic`` (the one
    dataset dispatch; the trainer calls it with its flags)."""
    if name == "digits":
        return digits()
    if name == "cifar10":
        if not data_dir:
            raise DatasetError(f"cifar10 needs a data directory (download from {CIFAR10_URL})")
        return cifar10(data_dir, augment=augment)
    if name == "synthetic":
        return synthetic(synthetic_shape, n_train=synthetic_n[0], n_test=synthetic_n[1], seed=seed)
    if name.endswith((".npz", ".pt")):
        return tensor_file(name)
    if os.path.isdir(name):
        return image_folder(name)
    if ":" in name:
        return user_dataset(name)
    raise ValueError(f"unknown dataset {name!r}; choose digits, cifar10, synthetic, a .npz/.pt file or "
                     "package.module:factory")


_SPLITS = ("x_train", "y_train", "x_test", "y_test")


def from_tensors(name: str, x_train, y_train, x_test, y_test, num_classes: Optional[int] = None) -> Dataset:
    """A dataset from in-memory arrays or tensors: float inputs ``(N, ...)`` (converted to
    float32), integer class labels ``(N,)``. Every problem is a :class:`DatasetError` naming it."""
    parts = {}
    for k, v in zip(_SPLITS, (x_train, y_train, x_test, y_test)):
        try:
            t = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach().cpu()
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{name}: {k} is not an array ({e})") from None
        parts[k] = t
    for k in ("x_train", "x_test"):
        if parts[k].dim() < 2 or not (parts[k].is_floating_point() or parts[k].dtype == torch.uint8):
            raise DatasetError(f"{name}: {k} must be (N, ...) float inputs, got shape {tuple(parts[k].shape)} "
                               f"dtype {parts[k].dtype}")
        parts[k] = parts[k].float() if parts[k].dtype != torch.uint8 else parts[k].float().div_(255.0)
        if not torch.isfinite(parts[k]).all():
            raise DatasetError(f"{name}: {k} holds non-finite values")
    for k in ("y_train", "y_test"):
        if parts[k].dim() != 1 or parts[k].is_floating_point() or parts[k].is_complex() or parts[k].dtype == torch.bool:
            raise DatasetError(f"{name}: {k} must be (N,) integer class labels, got shape {tuple(parts[k].shape)} "
                               f"dtype {parts[k].dtype}")
        parts[k] = parts[k].long()
    for s_ in ("train", "test"):
        if parts[f"x_{s_}"].shape[0] != parts[f"y_{s_}"].shape[0] or parts[f"x_{s_}"].shape[0] == 0:
            raise DatasetError(f"{name}: x_{s_} has {parts[f'x_{s_}'].shape[0]} samples and y_{s_} "
                               f"{parts[f'y_{s_}'].shape[0]} (need the same, at least one)")
    if parts["x_train"].shape[1:] != parts["x_test"].shape[1:]:
        raise DatasetError(f"{name}: train inputs {tuple(parts['x_train'].shape[1:])} and test inputs "
                           f"{tuple(parts['x_test'].shape[1:])} differ in shape")
    lo = min(int(parts["y_train"].min()), int(parts["y_test"].min()))
    if lo < 0:
        raise DatasetError(f"{name}: negative class label {lo}")
    top = max(int(parts["y_train"].max()), int(parts["y_test"].max())) + 1
    num_classes = num_classes or top
    if top > num_classes:
        raise DatasetError(f"{name}: label {top - 1} but num_classes {num_classes}")
    return Dataset(name, parts["x_train"], parts["y_train"], parts["x_test"], parts["y_test"], int(num_classes))


def tensor_file(path: str) -> Dataset:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally ``num_classes``) from a
    ``.npz`` file (``np.savez``) or a ``.pt`` dict (``torch.save``); nothing in them is executed."""
    if not os.path.isfile(path):
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                got = {k: z[k] for k in z.files}
        else:
            got = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # zip/pickle/format errors
        raise DatasetError(f"cannot read dataset file {path} ({type(e).__name__}: {e})") from None
    if not isinstance(got, dict) or any(k not in got for k in _SPLITS):
        have = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise DatasetError(f"{path} must hold {', '.join(_SPLITS)}; it holds {have}")
    n = got.get("num_classes")
    return from_tensors(os.path.basename(path), *(got[k] for k in _SPLITS),
                        num_classes=int(np.asarray(n)) if n is not None else None)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def is_image_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test"))


def _read_split(root: str, split: str, classes: list) -> tuple:
    """uint8 images (N, C, H, W) and labels of ``root/split/<class>/*``; every image the size of
    the first one (grey if every image is, else RGB)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DatasetError("image folders are read with Pillow: pip install pillow") from None
    files = [(os.path.join(root, split, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, split, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise DatasetError(f"{os.path.join(root, split)} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                           "folders")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    mode = "L" if all(im.mode in ("L", "1") for im in images) else "RGB"
    size = images[0].size
    arrays = []
    for (path, _), im in zip(files, images):
        if im.size != size:
            raise DatasetError(f"image {path} is {im.size[0]}x{im.size[1]}, but {files[0][0]} is {size[0]}x{size[1]}: "
                               "all images of a folder dataset must have one size (resize them first)")
        a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(arrays), np.array([i for _, i in files], dtype=np.int64)


def image_folder(root: str) -> Dataset:
    """Images in ``root/train/<class>/*`` and ``root/test/<class>/*`` (the class folder names,
    sorted, are the classes; the same in both splits), read with Pillow into (N, C, H, W) floats in
    [0, 1]: grey images give one channel, anything else RGB. Problems (no images, an unreadable
    file, sizes that differ, class folders that differ) are a :class:`DatasetError`."""
    if not is_image_folder(root):
        raise DatasetError(f"{root} must hold train/ and test/ folders with one folder per class")
    classes = {s_: sorted(d for d in os.listdir(os.path.join(root, s_)) if os.path.isdir(os.path.join(root, s_, d)))
               for s_ in ("train", "test")}
    if not classes["train"]:
        raise DatasetError(f"{os.path.join(root, 'train')} has no class folders")
    if classes["train"] != classes["test"]:
        raise DatasetError(f"{root}: the class folders of train/ {classes['train']} and test/ {classes['test']} differ")
    x_tr, y_tr = _read_split(root, "train", classes["train"])
    x_te, y_te = _read_split(root, "test", classes["train"])
    ds = from_tensors(os.path.basename(os.path.normpath(root)), x_tr, y_tr, x_te, y_te,
                      num_classes=len(classes["train"]))
    ds.info = {**(ds.info or {}), "classes": classes["train"], "root": os.path.abspath(root)}
    return ds


def user_dataset(spec: str) -> Dataset:
    """A user's ``"package.module:factory"``: ``factory()`` returns a :class:`Dataset`, a dict with
    ``x_train, y_train, x_test, y_test`` (and optionally ``num_classes``) or those four in a tuple."""
    from .runtime import import_object
    try:
        factory = import_object(spec)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    try:
        got = factory()
    except Exception as e:  # the user's code
        raise DatasetError(f"{spec}: the factory failed ({type(e).__name__}: {e})") from None
    if isinstance(got, Dataset):
        return got
    if isinstance(got, dict):
        if any(k not in got for k in _SPLITS):
            raise DatasetError(f"{spec} returned a dict without {', '.join(k for k in _SPLITS if k not in got)}")
        return from_tensors(spec, *(got[k] for k in _SPLITS), num_classes=got.get("num_classes"))
    if isinstance(got, (tuple, list)) and len(got) == 4:
        return from_tensors(spec, *got)
    raise DatasetError(f"{spec} returned {type(got).__name__}; return a Dataset, a dict of x_train, y_train, "
                       "x_test, y_test, or those four in a tuple")
