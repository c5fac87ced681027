"""Dataset loaders: digits, CIFAR-10 python format (small files written here), synthetic,
augmentation and the batch iterator."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from deepzero_kernels import data as D


def write_cifar(root, n=4, seed=0, bytes_keys=True):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
        batch = {key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key("labels"): [int(v) for v in rng.integers(0, 10, n)],
                 key("batch_label"): name}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)
    return root


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_loads_small_files(tmp_path, bytes_keys):
    root = write_cifar(str(tmp_path / "cifar-10-batches-py"), bytes_keys=bytes_keys)
    for where in (root, str(tmp_path)):  # the batches dir or its parent
        ds = D.cifar10(where)
        assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8
        assert ds.x_test.shape == (4, 3, 32, 32) and ds.y_train.shape == (20,)
        assert ds.num_classes == 10 and ds.in_channels == 3 and ds.image_size == 32
    # Row layout of the python format: 1024 red, 1024 green, 1024 blue values, row-major.
    with open(os.path.join(root, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    raw = raw[b"data"] if bytes_keys else raw["data"]
    assert ds.x_train[0, 1, 2, 3] == raw[0, 1024 + 2 * 32 + 3]
    x = ds.prepare(ds.x_test, train=False)
    mean = torch.tensor(D.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.x_test.float() / 255 - mean) / std)


def test_cifar10_missing_file_names_it_and_the_url(tmp_path):
    root = write_cifar(str(tmp_path))
    os.remove(os.path.join(root, "data_batch_3"))
    with pytest.raises(FileNotFoundError) as e:
        D.cifar10(root)
    assert "data_batch_3" in str(e.value) and D.CIFAR10_URL in str(e.value)
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        D.cifar10(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("content", [b"not a pickle", b"\x80\x04\x95"])
def test_cifar10_corrupt_file(tmp_path, content):
    root = write_cifar(str(tmp_path))
    with open(os.path.join(root, "test_batch"), "wb") as f:
        f.write(content)
    with pytest.raises(D.DatasetError, match="test_batch.*corrupt"):
        D.cifar10(root)


def test_cifar10_wrong_contents(tmp_path):
    root = write_cifar(str(tmp_path))
    with open(os.path.join(root, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(D.DatasetError, match="data_batch_2.*3072"):
        D.cifar10(root)
    with open(os.path.join(root, "data_batch_2"), "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(D.DatasetError, match="dict"):
        D.cifar10(root)
    with open(os.path.join(root, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DatasetError, match="labels"):
        D.cifar10(root)


def test_cifar10_expect_full_counts(tmp_path):
    with pytest.raises(D.DatasetError, match="expected 10000"):
        D.cifar10(write_cifar(str(tmp_path)), expect_full=True)


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str`` opcodes, as the cPickle that wrote the
    official CIFAR-10 files did (Python 3 would route bytes through ``_codecs.encode``)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)
    dispatch[bytes] = _save_py2_str


def test_cifar10_loads_python2_format_batches(tmp_path):
    """The official files: protocol 2, bytes keys, arrays rebuilt by numpy.core.multiarray."""
    root = write_cifar(str(tmp_path))
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 9],
                                       b"data": data, b"filenames": [b"a.png", b"b.png", b"c.png"]})
    raw = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # NumPy 1.x name
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "data_batch_1").write_bytes(raw)
    ds = D.cifar10(root)
    assert torch.equal(ds.x_train[:3], torch.from_numpy(data).reshape(3, 3, 32, 32))
    assert ds.y_train[:3].tolist() == [3, 1, 9]
    # Protocol 5 (Python 3.14's default) with a NumPy scalar label list also loads.
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({"data": data, "labels": [np.int64(v) for v in (0, 5, 7)]}, f, protocol=5)
    assert D.cifar10(root).y_train[3:6].tolist() == [0, 5, 7]


class _Payload:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested"])
def test_cifar10_crafted_pickle_runs_no_code(tmp_path, how):
    root = write_cifar(str(tmp_path))
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    if how == "nested":  # hidden inside an otherwise valid batch
        batch[b"filenames"] = [b"a.png", payload]
    else:
        batch = payload
    with open(os.path.join(root, "data_batch_1"), "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(D.DatasetError) as e:
        D.cifar10(root)
    msg = str(e.value)
    assert "data_batch_1" in msg and "refusing" in msg
    assert ("system" in msg) if how == "os.system" else ("builtins.exec" in msg)
    assert not marker.exists()


# ----------------------------------------------------------------------------- augmentation
def test_random_crop_flip_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = D.random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(16):
        windows = [xp[b, :, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)
    # Reproducible from the generator state; not the identity for all samples.
    again = D.random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.equal(out, x)


def test_prepare_augments_only_in_training(tmp_path):
    ds = D.cifar10(write_cifar(str(tmp_path)))
    x = ds.x_train[:4]
    assert torch.equal(ds.prepare(x, train=False), ds.prepare(x, train=False))
    with pytest.raises(ValueError, match="Generator"):
        ds.prepare(x, train=True)
    a = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(1))
    b = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)


# ----------------------------------------------------------------------------- digits, synthetic
def test_digits_split_is_fixed_stratified_and_normalised():
    ds = D.digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.num_classes == 10
    counts = torch.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert torch.equal(D.digits().x_test, ds.x_test)  # fixed split


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 5, 7), (20,)])
def test_synthetic_any_shape(shape):
    ds = D.synthetic(shape, num_classes=4, n_train=30, n_test=10, seed=3)
    assert ds.x_train.shape == (30, *shape) and ds.x_test.shape == (10, *shape)
    assert int(ds.y_train.max()) < 4 and ds.y_train.dtype == torch.int64
    assert torch.equal(D.synthetic(shape, num_classes=4, n_train=30, n_test=10, seed=3).x_train, ds.x_train)
    with pytest.raises(ValueError):
        D.synthetic((0, 3))


def test_batches_cover_everything_reproducibly():
    g = torch.Generator().manual_seed(5)
    got = list(D.batches(10, 4, g))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(torch.cat(got).tolist()) == list(range(10))
    again = list(D.batches(10, 4, torch.Generator().manual_seed(5)))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert [len(b) for b in D.batches(10, 4, g, drop_last=True)] == [4, 4]
    assert torch.equal(torch.cat(list(D.batches(5, 2, shuffle=False))), torch.arange(5))
    with pytest.raises(ValueError):
        list(D.batches(5, 0))


def test_load_dataset_dispatch():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("mnist")
    with pytest.raises(ValueError, match="data directory"):
        D.load_dataset("cifar10")
    assert D.load_dataset("synthetic", synthetic_shape=(2, 4, 4), synthetic_n=(8, 4)).x_train.shape == (8, 2, 4, 4)


def _image_folder(root, sizes=None, rgb=False, test_classes=("cat", "dog")):
    """root/train/{cat,dog}/*.png (3 each) and root/test/<test_classes>/*.png (2 each), 6x5 images."""
    from PIL import Image
    g = np.random.default_rng(0)
    for split, n, classes in (("train", 3, ("cat", "dog")), ("test", 2, test_classes)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                w, h = (sizes or {}).get((split, c, i), (6, 5))
                a = g.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
                Image.fromarray(a).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def test_image_folder_dataset(tmp_path):
    from deepzero_kernels import data as D
    root = _image_folder(tmp_path / "pets")
    ds = D.load_dataset(root)
    assert ds.x_train.shape == (6, 1, 5, 6) and ds.x_test.shape == (4, 1, 5, 6) and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.info["classes"] == ["cat", "dog"]
    from PIL import Image
    first = np.asarray(Image.open(os.path.join(root, "train", "cat", "0.png")), dtype=np.float32) / 255
    assert torch.allclose(ds.x_train[0, 0], torch.from_numpy(first))
    rgb = D.load_dataset(_image_folder(tmp_path / "rgb", rgb=True))
    assert rgb.x_train.shape == (6, 3, 5, 6) and 0 <= float(rgb.x_train.min()) and float(rgb.x_train.max()) <= 1


@pytest.mark.parametrize("problem,match", [
    ("size", "all images of a folder dataset must have one size"),
    ("classes", "class folders of train/"),
    ("corrupt", "cannot read image"),
    ("empty", "holds no images"),
])
def test_image_folder_problems_are_clear(tmp_path, problem, match):
    from deepzero_kernels import data as D
    if problem == "size":
        root = _image_folder(tmp_path / "d", sizes={("train", "dog", 1): (7, 5)})
    elif problem == "classes":
        root = _image_folder(tmp_path / "d", test_classes=("cat", "eel"))
    else:
        root = _image_folder(tmp_path / "d")
        if problem == "corrupt":
            (tmp_path / "d" / "test" / "dog" / "1.png").write_bytes(b"not a png")
        else:
            for f in (tmp_path / "d" / "test").rglob("*.png"):
                f.unlink()
    with pytest.raises(D.DatasetError, match=match):
        D.load_dataset(root)


def test_trainer_on_an_image_folder(tmp_path, capsys):
    from deepzero_kernels import train
    root = _image_folder(tmp_path / "pets")
    argv = ["--dataset", root, "--model", "cnn", "--width", "2", "--depth", "1", "--batch-size", "4", "--epochs", "1",
            "--sparsity", "0", "--no-progress", "--threads", "1"]
    assert train.main(argv) == 0
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", str(tmp_path), "--epochs", "1"])  # a folder without train/ and test/
    assert e.value.code == 2 and "must hold train/ and test/" in capsys.readouterr().err
