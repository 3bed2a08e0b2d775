"""Data set readers on small files written in the real formats, and once on the shared data."""

import gzip
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from agrel_sim.augmentation import Augmentation, augment
from agrel_sim.datasets import EMBEDDED_TRAIN_SIZES, LOADERS, SHAPES, Dataset, DatasetError, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train=30, n_test=10, gz=True, **overrides) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in files.items():
        data = overrides.get(name, idx_bytes(array))
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return raw


def test_a_data_set_of_ones_own_is_made_from_arrays_of_whole_pixel_values():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(30, 1, 2, 3)), rng.integers(0, 4, size=30)
    frozen = images.astype(float)
    frozen.flags.writeable = False  # read-only arrays are copied
    for given in (images, frozen, torch.tensor(images), images.tolist()):
        data = Dataset.from_arrays("mine", given, labels, images[20:], torch.tensor(labels[20:]))
        assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
        assert data.train_images.tolist() == np.asarray(given).astype(np.uint8).tolist() and data.test_labels.tolist() == labels[20:].tolist()
        assert (data.n_classes, data.image_shape, data.scale) == (int(labels.max()) + 1, (1, 2, 3), 1 / 255)
    assert Dataset.from_arrays("mine", images, labels, images, labels, scale=1 / 510, n_classes=7).n_classes == 7
    # n_classes counts the labels of both parts, and is at least 2.
    with pytest.warns(UserWarning, match=r"data set 'mine': 2 of the 4 classes taken from the largest label have no training image \(2, 3\)"):
        assert Dataset.from_arrays("mine", images, labels % 2, images, labels).n_classes == int(labels.max()) + 1
    with pytest.warns(UserWarning, match=r"data set 'mine': 1 of the 2 classes taken from the largest label has no training image \(1\); classes are numbered from 0"):
        assert Dataset.from_arrays("mine", images, 0 * labels, images, 0 * labels).n_classes == 2
    with pytest.warns(UserWarning, match=r"1 of the 4 classes taken from the largest label has no training image \(0\)"):
        Dataset.from_arrays("mine", images, labels % 3 + 1, images, labels % 3 + 1)  # numbered from 1
    # Other layouts and kinds of array are taken as the same pixels, held C-contiguous.
    fortran = Dataset.from_arrays("mine", np.asfortranarray(images), labels, images, labels)
    assert fortran.train_images.is_contiguous() and fortran.train_images.tolist() == images.tolist()
    tensor = torch.tensor(images, dtype=torch.bfloat16, requires_grad=True)
    assert Dataset.from_arrays("mine", tensor, labels, torch.tensor(images).to_sparse(), labels).test_images.tolist() == images.tolist()
    # Binary images (0 and 1, or booleans) are rates only with scale 1: the default would make them at most 1/255.
    binary = images > 127
    with pytest.raises(DatasetError, match=r"data set 'mine': the pixel values are all 0 or 1, which the default scale 1/255 turns into rates of at most 0\.0039; give scale=1"):
        Dataset.from_arrays("mine", binary, labels, binary.astype(float), labels)
    assert Dataset.from_arrays("mine", binary, labels, binary, labels, scale=1).train_images.tolist() == binary.astype(int).tolist()

    for part, bad, message in [
        ("train_images", images + 0.5, r"train_images: pixel values must be whole numbers in 0\.\.255 .*found \d+\.5; for rates r in \[0, 1\], give np\.round\(r \* 255\)"),
        ("train_images", images + 1, r"train_images: pixel values must be whole numbers in 0\.\.255 .*found 256"),
        ("test_images", np.where(images > 250, np.nan, images), r"test_images: pixel values must be whole numbers .*found nan"),
        ("test_images", images - 1, r"test_images: pixel values must be whole numbers .*found -1"),
        ("train_images", images.astype(str), r"train_images: expected pixel values, whole numbers in 0\.\.255, got an array of <U"),
        ("test_labels", labels.astype(float), r"test_labels: expected integer class indices, got an array of float64"),
        ("train_labels", labels[:-1], r"30 train images and 29 train labels"),
        ("train_images", images[:, 0, 0, 0], r"train_images: expected images, \(images, C, H, W\) or \(images, features\), got an array of shape \(30,\); one feature per image is \(images, 1\)"),
        ("train_images", [[1, 2], [3]] * 15, r"train_images: not an array \(ValueError: .*\); give a numpy or torch array"),
        ("train_images", np.ma.masked_less(images, 3), r"train_images: a masked array, whose masked values would be taken as they are; give array\.filled\(value\) instead"),
        ("test_labels", np.int64(1), r"test_labels: expected one class index per image, an array of shape \(images,\), got shape \(\)"),
        ("test_labels", np.full(30, 2**63, dtype=np.uint64), r"test_labels: a label of 9223372036854775808, beyond any class"),
    ]:
        arrays = {**dict(train_images=images, train_labels=labels, test_images=images, test_labels=labels), part: bad}
        with pytest.raises(DatasetError, match=rf"data set 'mine': .*{message}"):
            Dataset.from_arrays("mine", **arrays)
    with pytest.raises(DatasetError, match=r"train_labels outside 0\.\.2 \(found 0\.\.3\)"):
        Dataset.from_arrays("mine", images, labels, images, labels, n_classes=3)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_mnist_reader(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    data = load_dataset("mnist", tmp_path)
    assert data.train_images.shape == (30, 1, 28, 28) and data.train_images.dtype == torch.uint8
    written = np.random.default_rng(0).integers(0, 256, (30, 28, 28))  # as write_mnist draws them
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(written.astype(np.uint8))), "rows, columns in file order"
    assert data.test_images.shape == (10, 1, 28, 28)
    assert data.train_labels.tolist() == [i % 10 for i in range(30)]
    assert data.n_classes == 10 and data.scale == 1 / 255


def test_data_folder_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("AGREL_SIM_DATA", str(tmp_path))
    assert len(load_dataset("mnist").train_labels) == 30
    write_mnist(tmp_path / "other", n_train=20)
    for folders, n_train in (("other:.", 20), (".:other", 30)):  # searched in turn: the first that holds the data set
        monkeypatch.setenv("AGREL_SIM_DATA", ":".join(str(tmp_path / folder) for folder in folders.split(":")))
        assert len(load_dataset("mnist").train_labels) == n_train, folders


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("train-images-idx3-ubyte", lambda b: b[:1000], r"truncated: header gives shape \(30, 28, 28\)"),
        ("train-labels-idx1-ubyte", lambda b: (0x0803).to_bytes(4, "big") + b[4:], r"wrong magic number 00000803 \(expected 00000801, unsigned bytes in 1 dimensions\)"),
        ("train-labels-idx1-ubyte", lambda b: b"", r"holds nothing once unpacked: obtain it again"),
        ("t10k-images-idx3-ubyte", lambda b: b[:4] + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"),
         r"truncated: header gives shape \(2147483648, 2147483648, 4\) \(18446744073709551616 bytes\), the file holds 0"),
        ("t10k-images-idx3-ubyte", lambda b: b + b"\0" * 28, r"longer than its header says"),
        ("t10k-labels-idx1-ubyte", lambda b: b[:8] + bytes([12] * 10), r"labels outside 0\.\.9"),
        ("train-labels-idx1-ubyte", lambda b: b[:8] + bytes([10] * 30), r"labels outside 0\.\.9 \(found 10\.\.10\)"),
        ("train-images-idx3-ubyte", lambda b: idx_bytes(np.zeros((31, 28, 28))), r"31 images of \(28, 28\) pixels with 30 labels; expected 28×28 images, one label each"),
        ("train-images-idx3-ubyte", lambda b: idx_bytes(np.zeros((30, 27, 27))), r"30 images of \(27, 27\) pixels with 30 labels; expected 28×28 images, one label each"),
    ],
)
def test_damaged_mnist_files_are_named(tmp_path, name, damage, message):
    n = 30 if name.startswith("train") else 10
    rng = np.random.default_rng(0)
    good = idx_bytes(rng.integers(0, 256, (n, 28, 28)) if "images" in name else np.arange(n) % 10)
    write_mnist(tmp_path, **{name: damage(good)})
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("mnist", tmp_path)
    assert name in str(error.value) and "MNIST/raw" in str(error.value)


def test_corrupt_gzip_is_reported(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: cannot read .*damaged"):
        load_dataset("mnist", tmp_path)
    inside = bytearray((raw / "train-images-idx3-ubyte.gz").read_bytes())
    inside[10] = 0xFF  # a valid gzip header over a damaged deflate stream (zlib.error, not OSError)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(30) % 10)))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(bytes(inside))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: cannot read .*damaged"):
        load_dataset("mnist", tmp_path)


def test_a_file_compressed_twice_or_empty_is_named_so(tmp_path):
    raw = write_mnist(tmp_path)
    twice = gzip.compress((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(twice)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: gzip-compressed twice: unpack it once and keep it under this name"):
        load_dataset("mnist", tmp_path)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: an empty file: obtain it again"):
        load_dataset("mnist", tmp_path)


def test_a_file_named_for_the_wrong_compression_is_named_so(tmp_path):
    raw = write_mnist(tmp_path / "gzipped", gz=True)
    (raw / "t10k-labels-idx1-ubyte.gz").rename(raw / "t10k-labels-idx1-ubyte")  # compressed, but named as unpacked
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: gzip-compressed, though its name does not end in \.gz: name it t10k-labels-idx1-ubyte\.gz, or unpack it"):
        load_dataset("mnist", tmp_path / "gzipped")
    raw = write_mnist(tmp_path / "plain", gz=False)
    (raw / "train-images-idx3-ubyte").rename(raw / "train-images-idx3-ubyte.gz")  # unpacked on download, its name kept
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: an IDX file that is not gzip-compressed, though its name ends in \.gz: remove the \.gz from its name"):
        load_dataset("mnist", tmp_path / "plain")


def test_a_data_folder_under_the_home_folder_may_be_given_with_a_tilde(tmp_path, monkeypatch):
    write_mnist(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_dataset("mnist", "~/data").train_labels) == 30
    monkeypatch.setenv("AGREL_SIM_DATA", "~/data")
    assert len(load_dataset("mnist").train_labels) == 30


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_a_data_file_without_read_permission_is_not_called_damaged(tmp_path, monkeypatch, dataset):
    if dataset == "mnist":
        write_mnist(tmp_path, gz=False)
    else:
        write_cifar(tmp_path, "cifar-10-batches-py", {**{f"data_batch_{i}": 4 for i in range(1, 6)}, "test_batch": 3}, b"labels", 10)

    def no_permission(path, *args, **kwargs):  # what open() raises for a file of mode 000, except for root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("agrel_sim.datasets.open", no_permission, raising=False)
    with pytest.raises(DatasetError, match=r"(ubyte|data_batch_1): no permission to read this file; check its permissions$"):
        load_dataset(dataset, tmp_path)


def test_a_data_folder_that_cannot_be_searched_is_named(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    is_file = Path.is_file

    def no_permission(path):  # what Path.is_file raises below a folder of mode 000, except for root
        if path.parent.name == "raw":
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", no_permission)
    with pytest.raises(DatasetError, match=r"MNIST/raw: no permission to look into this folder; check its permissions$"):
        load_dataset("mnist", tmp_path)

    # A folder above the one searched that cannot be searched is the one named.
    locked = tmp_path / "locked"
    write_mnist(locked)
    stat = Path.stat

    def below_locked(path, *args, **kwargs):  # what a folder of mode 000 makes of the paths below it, except for root
        if locked in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", below_locked)
    monkeypatch.setattr(Path, "is_file", lambda path: below_locked(path) and False)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(locked))}: no permission to look into this folder; check its permissions$"):
        load_dataset("mnist", locked)


def tiny_parts(**changes) -> dict:
    pixels = torch.randint(0, 256, (6, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    parts = dict(name="tiny", train_images=pixels, train_labels=torch.tensor([0, 1, 2, 0, 1, 2]), test_images=pixels[:3], test_labels=torch.tensor([0, 1, 2]), scale=1 / 255, n_classes=3)
    return {**parts, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(scale=1.0), r"scale: pixel values up to \d+ times scale 1 exceed 1; expected rates in \[0, 1\]"),
    (dict(train_images=torch.full((6, 1, 2, 2), 100, dtype=torch.uint8), test_images=torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), scale=1 / 200),
     r"scale: pixel values up to 255 times scale 0\.005 exceed 1"),  # the test images too, by a little
    (dict(scale=0.0), r"scale: expected a finite number > 0"),
    (dict(scale=float("nan")), r"scale: expected a finite number > 0"),
    (dict(n_classes=1), r"n_classes: expected an integer >= 2, got 1"),
    (dict(train_images=torch.rand(6, 1, 2, 2)), r"train_images: expected a uint8 tensor of pixel values.*got a torch\.float32 tensor"),
    (dict(test_labels=torch.tensor([0.0, 1.0, 2.0])), r"test_labels: expected a 1-d tensor of integer class indices, got a torch\.float32"),
    (dict(train_labels=torch.tensor([0, 1, 2, 0, 1])), r"6 train images and 5 train labels; expected as many labels as images"),
    (dict(test_images=torch.zeros(0, 1, 2, 2, dtype=torch.uint8), test_labels=torch.zeros(0, dtype=torch.long)), r"0 test images and 0 test labels; expected as many labels as images, and at least one"),
    (dict(test_labels=torch.tensor([0, 1, 3])), r"test_labels outside 0\.\.2 \(found 0\.\.3\)"),
    (dict(test_images=torch.zeros(3, 1, 3, 3, dtype=torch.uint8)), r"test images of shape \[1, 3, 3\], training images of shape \[1, 2, 2\]; expected one shape"),
])
def test_a_data_set_made_in_code_is_checked_before_any_training(changes, message):
    with pytest.raises(DatasetError, match=r"data set 'tiny': " + message):
        Dataset(**tiny_parts(**changes))
    Dataset(**tiny_parts())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
def test_labels_of_any_integer_dtype_are_held_as_int64(dtype):
    data = Dataset(**tiny_parts(train_labels=torch.tensor([0, 1, 2, 0, 1, 2], dtype=dtype), test_labels=torch.tensor([0, 1, 2], dtype=dtype)))
    assert data.train_labels.dtype == data.test_labels.dtype == torch.int64
    assert data.train_labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DatasetError, match=r"test_labels outside 0\.\.2 \(found 0\.\.3\)"):
        Dataset(**tiny_parts(test_labels=torch.tensor([0, 1, 3], dtype=dtype)))


def test_a_held_out_set_without_images_is_named(tmp_path):
    write_mnist(tmp_path, n_test=0)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: holds no images"):
        load_dataset("mnist", tmp_path)


def test_missing_data_lists_the_paths_searched(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)MNIST not found\. Searched:.*MNIST/raw.*Put the four MNIST IDX files"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match=r"(?s)CIFAR100 not found.*cifar-100-python.*cifar-100-python\.tar\.gz"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match=r"dataset: unknown data set 'svhn'"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(DatasetError, match=r"dataset: unknown data set \['mnist'\]"):
        load_dataset(["mnist"], tmp_path)


def write_cifar(root: Path, folder: str, files: dict[str, int], label_key: bytes, n_classes: int, str_keys=False, protocol=None) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(np.arange(n) % n_classes)}
        if str_keys:
            batch = {key.decode(): value for key, value in batch.items()}
        (path / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


@pytest.mark.parametrize("str_keys, protocol", [(False, None), (True, None), (False, 2), (False, 5)], ids=["bytes_keys", "str_keys", "protocol2", "protocol5"])
def test_cifar10_reader(tmp_path, str_keys, protocol):
    write_cifar(tmp_path, "cifar-10-batches-py", {**{f"data_batch_{i}": 4 for i in range(1, 6)}, "test_batch": 3}, b"labels", 10, str_keys, protocol)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    pixels = raw["data" if str_keys else b"data"]
    # Row-major R, G, B planes of 32×32.
    assert torch.equal(data.train_images[0, 1], torch.from_numpy(pixels[0, 1024:2048].reshape(32, 32)))


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = write_cifar(tmp_path, "cifar-100-python", {"train": 7, "test": 5}, b"fine_labels", 100)
    data = load_dataset("cifar100", tmp_path)
    assert data.n_classes == 100 and data.train_labels.tolist() == list(range(7))
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [99, 100]}))
    with pytest.raises(DatasetError, match=r"test: labels outside 0\.\.99 \(found 99\.\.100\)"):
        load_dataset("cifar100", tmp_path)


def test_damaged_cifar_files_are_named(tmp_path):
    folder = write_cifar(tmp_path, "cifar-10-batches-py", {**{f"data_batch_{i}": 4 for i in range(1, 6)}, "test_batch": 3}, b"labels", 10)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match=r"data_batch_3: unreadable pickle"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"data_batch_3: wrong array size: data of shape \(4, 100\)"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.int64), b"labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"data_batch_3: pixel data of type int64; expected uint8"):
        load_dataset("cifar10", tmp_path)
    for ragged in ({b"data": [[1, 2], [3]], b"labels": [0, 0]}, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [[0], [1, 2], [0], [0]]}):
        (folder / "data_batch_3").write_bytes(pickle.dumps(ragged))
        with pytest.raises(DatasetError, match=r"data_batch_3: 'data' and 'labels' are not arrays \(.*\); the file is damaged"):
            load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"\xff": 1, b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}))
    assert len(load_dataset("cifar10", tmp_path).train_labels) == 20, "a key that is not text beside the two read is no damage"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match=r"data_batch_3: expected a dict with 'data' and 'labels'"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps(Augmentation()))
    with pytest.raises(DatasetError, match=r"data_batch_3: unreadable pickle \(UnpicklingError: it calls agrel_sim\.augmentation\.Augmentation, which is not part of a data set"):
        load_dataset("cifar10", tmp_path)
    for labels, found in (
        (np.arange(4) + 0.5, r"float64 of shape \(4,\)"),  # would be truncated to integers
        (np.zeros((4, 1), np.int64), r"int64 of shape \(4, 1\)"),
        (3, r"int64 of shape \(\)"),
        (["a", "b", "c", "d"], r"<U1 of shape \(4,\)"),
    ):
        (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": labels}))
        with pytest.raises(DatasetError, match=r"data_batch_3: labels must be a list of integers, found " + found):
            load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}))
    with pytest.raises(DatasetError, match=r"data_batch_3: labels outside 0\.\.9 \(found 0\.\.10\)"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"test_batch: wrong array size: data of shape \(0, 3072\).*N > 0"):
        load_dataset("cifar10", tmp_path)


class Planted:
    """A pickle that would write a file when read by an unrestricted unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_planted_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar(tmp_path, "cifar-10-batches-py", {**{f"data_batch_{i}": 4 for i in range(1, 6)}, "test_batch": 3}, b"labels", 10)
    marker = tmp_path / "ran.txt"
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Planted(marker), b"labels": [0] * 4}))
    pickle.loads((folder / "data_batch_2").read_bytes())
    assert marker.read_text() == "ran", "the planted pickle runs code when read by pickle itself"
    marker.unlink()
    with pytest.raises(DatasetError, match=r"data_batch_2: unreadable pickle \(UnpicklingError: it calls pathlib[\w.]*\.Path\.write_text"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_a_partial_mnist_folder_names_the_missing_file(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"MNIST/raw holds 3 of the 4 files; missing there: t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz\n"):
        load_dataset("mnist", tmp_path)
    for file in write_mnist(tmp_path / "elsewhere", n_train=31).iterdir():  # a whole set where the data folder itself is searched, after MNIST/raw
        file.rename(tmp_path / file.name)
    with pytest.raises(DatasetError, match=r"MNIST/raw holds 3 of the 4 files"):
        load_dataset("mnist", tmp_path)
    shutil.rmtree(raw)
    assert len(load_dataset("mnist", tmp_path).train_labels) == 31, "the data folder itself is searched"


def test_what_is_in_place_of_a_data_file_is_named(tmp_path):
    raw = write_mnist(tmp_path, gz=False)
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte").mkdir()
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte").symlink_to(tmp_path / "nothing")
    with pytest.raises(DatasetError, match=(
        r"MNIST/raw holds 2 of the 4 files; missing there: train-images-idx3-ubyte or train-images-idx3-ubyte\.gz, t10k-images-idx3-ubyte or t10k-images-idx3-ubyte\.gz\n"
        r".*/train-images-idx3-ubyte: a folder, not a file\n.*/t10k-images-idx3-ubyte: a link to nothing, not a file\n"
    )):
        load_dataset("mnist", tmp_path)


def test_a_stray_file_or_folder_named_like_a_data_file_does_not_stop_the_search(tmp_path, monkeypatch):
    (tmp_path / "first" / "train").mkdir(parents=True)  # CIFAR-100's names, looked for in the data folder itself too
    (tmp_path / "first" / "test").write_text("notes")
    write_cifar(tmp_path / "second", "cifar-100-python", {"train": 7, "test": 5}, b"fine_labels", 100)
    monkeypatch.setenv("AGREL_SIM_DATA", f"{tmp_path / 'first'}:{tmp_path / 'second'}")
    assert len(load_dataset("cifar100").train_labels) == 7
    monkeypatch.setenv("AGREL_SIM_DATA", str(tmp_path / "first"))
    with pytest.raises(DatasetError, match=(
        r"(?s)CIFAR100 not found\. Searched:\n  .*first/cifar-100-python\n  .*first\nfor: train, test\n"
        r".*first holds 1 of the 2 files; missing there: train\n.*first/train: a folder, not a file\nUnpack"
    )):
        load_dataset("cifar100")


def test_what_stands_where_a_data_folder_should_be_is_named(tmp_path):
    (tmp_path / "cifar-10-batches-py").symlink_to(tmp_path / "nothing")
    with pytest.raises(DatasetError, match=r"CIFAR10 not found\. Searched:\n  (\S+)/cifar-10-batches-py \(\1/cifar-10-batches-py: a link to nothing, not a folder\)\n"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "notes").write_text("not a data folder")
    with pytest.raises(DatasetError, match=r"MNIST not found\. Searched:\n  (\S+)/MNIST/raw \(\1: a file, not a folder\)\n"):
        load_dataset("mnist", tmp_path / "notes")


def test_a_data_folder_that_cannot_be_looked_into_is_named(tmp_path):
    too_long = tmp_path / ("x" * 300)
    with pytest.raises(DatasetError, match=r"x: cannot look for this path \(File name too long\); check the data folder's path"):
        load_dataset("mnist", too_long)


def test_the_fingerprint_tells_copies_of_a_data_set_apart(tmp_path):
    write_mnist(tmp_path / "a")
    write_mnist(tmp_path / "b", gz=False)
    write_mnist(tmp_path / "c", n_train=31)
    a, b, c = (load_dataset("mnist", tmp_path / name).fingerprint() for name in "abc")
    assert a == b, "the same images and labels, gzipped or not"
    assert a["sha256"] != c["sha256"] and (a["train"], c["train"]) == (30, 31)
    assert a == {"name": "mnist", "train": 30, "test": 10, "image_shape": [1, 28, 28], "n_classes": 10, "sha256": a["sha256"]}
    for part in ("train_labels", "test_labels", "train_images", "test_images"):
        changed = load_dataset("mnist", tmp_path / "a")
        getattr(changed, part).view(-1)[0] += 1
        assert changed.fingerprint()["sha256"] != a["sha256"], f"one value of {part} changed"


def test_every_data_set_has_the_images_and_classes_that_experiments_are_checked_against(tmp_path):
    write_mnist(tmp_path)
    write_cifar(tmp_path, "cifar-10-batches-py", {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 2}, b"labels", 10)
    write_cifar(tmp_path, "cifar-100-python", {"train": 2, "test": 2}, b"fine_labels", 100)
    assert set(SHAPES) == set(LOADERS)
    for name, (image_shape, n_classes) in SHAPES.items():
        data = load_dataset(name, tmp_path)
        assert (data.image_shape, data.n_classes) == (image_shape, n_classes), name


def test_embedded_data_sets():
    assert {name: len(load_dataset(name).train_labels) for name in EMBEDDED_TRAIN_SIZES} == EMBEDDED_TRAIN_SIZES, "as experiments are checked against"
    digits = load_dataset("digits")
    assert digits.train_images.shape == (1437, 1, 8, 8) and int(digits.train_images.max()) == 16
    mnist5k = load_dataset("mnist5k")
    assert mnist5k.train_images.shape == (4000, 1, 28, 28) and len(mnist5k.test_labels) == 1000
    assert set(mnist5k.train_labels.tolist()) == set(range(10))


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="the shared MNIST files are not beside this checkout")
def test_reads_the_shared_mnist():
    data = load_dataset("mnist", SHARED_DATA)
    assert data.train_images.shape == (50000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels).min() > 4000


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-train-jpeg.npz").is_file(), reason="the shared CIFAR-10 bundle is not beside this checkout")
def test_reads_the_shared_cifar10_in_the_standard_layout(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, SHARED_DATA.parent / "tools" / "cifar10_layout.py", tmp_path], check=True, capture_output=True)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_images.shape == (40000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_labels).min() > 3000


def test_augmentation_is_random_per_image_and_keeps_shapes():
    images = torch.zeros(64, 1, 28, 28)
    images[:, :, 10:18, 4:12] = 1.0  # a square left of centre
    out = augment(images, Augmentation(zoom=0.2, shift=0.1, flip=True), torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert len({tuple(o.flatten().round(decimals=3).tolist()) for o in out}) == 64, "each image its own transform"
    centre_x = (out[:, 0].sum(1) * torch.arange(28)).sum(1) / out[:, 0].sum((1, 2))
    assert (centre_x > 14).any() and (centre_x < 14).any(), "some images are reflected"


def test_augment_names_a_wrong_batch_or_settings():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"settings: expected an object of class Augmentation, got NoneType None"):
        augment(torch.zeros(2, 1, 8, 8), None, generator)
    with pytest.raises(ValueError, match=r"images: augment expects a batch of images \(B, C, H, W\), got shape \(2, 8, 8\)"):
        augment(torch.zeros(2, 8, 8), Augmentation(), generator)
    with pytest.raises(ValueError, match=r"images: augment expects a batch of images \(B, C, H, W\), got ndarray"):
        augment(np.zeros((2, 1, 8, 8)), Augmentation(), generator)


def test_half_the_images_are_reflected_left_to_right():
    images = torch.zeros(4000, 1, 8, 8)
    images[:, :, :3, :3] = 1.0  # a block in the top left corner
    for flip, share in ((True, 0.5), (False, 0.0)):
        out = augment(images, Augmentation(zoom=0.0, shift=0.0, flip=flip), torch.Generator().manual_seed(0))
        reflected = out[:, 0, :, 5:].sum((1, 2)) > out[:, 0, :, :3].sum((1, 2))
        assert reflected.float().mean().item() == pytest.approx(share, abs=0.03)  # 4 sigma: 0.5 ± 0.032
        assert torch.all(out[:, 0, :3].sum((1, 2)) > out[:, 0, 3:].sum((1, 2))), "never upside down"


@pytest.mark.parametrize("zoom", [0.0, 0.5])
def test_shift_moves_each_image_by_up_to_the_set_fraction_in_both_directions(zoom):
    images = torch.zeros(256, 1, 28, 28)
    images[:, :, 11:17, 11:17] = 1.0  # a square in the centre, well inside the border at any zoom and shift
    out = augment(images, Augmentation(zoom=zoom, shift=0.2, flip=False), torch.Generator().manual_seed(0))
    mass = out[:, 0].sum((1, 2))
    centre_y = (out[:, 0].sum(2) * torch.arange(28)).sum(1) / mass - 13.5
    centre_x = (out[:, 0].sum(1) * torch.arange(28)).sum(1) / mass - 13.5
    for centre in (centre_x, centre_y):
        assert centre.abs().max() <= 0.2 * 28 + 0.5, "no further than the set fraction"
        assert centre.max() > 0.15 * 28 and centre.min() < -0.15 * 28, "both ways, nearly as far"
    assert abs(torch.corrcoef(torch.stack([centre_x, centre_y]))[0, 1].item()) < 0.25, "the two shifts drawn apart (4 sigma of r for 256 images)"


def test_zoom_scales_each_image_by_up_to_the_set_fraction_both_ways():
    zoom = 0.2
    images = torch.zeros(256, 1, 64, 64)
    images[:, :, 24:40, 24:40] = 1.0  # a square in the centre, inside the border at any zoom
    out = augment(images, Augmentation(zoom=zoom, shift=0.0, flip=False), torch.Generator().manual_seed(0))
    area = out[:, 0].sum((1, 2)) / images[:, 0].sum((1, 2))  # the square's area scales with the zoom squared
    assert area.min() >= (1 - zoom) ** 2 - 0.01 and area.max() <= (1 + zoom) ** 2 + 0.01, "no more than the set zoom"
    assert area.max() > (1 + 0.8 * zoom) ** 2 and area.min() < (1 - 0.8 * zoom) ** 2, "enlarged and shrunk, nearly as far"


def test_augmentation_asks_for_scaled_images():
    with pytest.raises(TypeError, match="images: augment expects a floating-point batch .* got torch.uint8"):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), Augmentation(), torch.Generator())


def test_identity_augmentation_changes_nothing():
    images = torch.rand(5, 3, 32, 32)
    out = augment(images, Augmentation(zoom=0.0, shift=0.0, flip=False), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_pixels_from_outside_the_image_repeat_its_border():
    # An even image stays even under any zoom and shift, as Keras' fill_mode="nearest" keeps it;
    # zero padding would darken its edges.
    images = torch.full((64, 3, 16, 16), 0.7)
    out = augment(images, Augmentation(zoom=0.5, shift=0.3, flip=True), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_cifar_keeps_each_image_with_its_label_and_scales_255_to_1(tmp_path):
    # Each label stays with its image across the five batch files; a pixel of 255 is a rate of 1.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for number in range(1, 6):  # image j of batch i: every pixel 40 i + j, label 2 (i - 1) + j
        data = np.stack([np.full(3072, 40 * number + j, np.uint8) for j in (0, 1)])
        (folder / f"data_batch_{number}").write_bytes(pickle.dumps({b"data": data, b"labels": [2 * (number - 1), 2 * (number - 1) + 1]}))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.full((2, 3072), 255, np.uint8), b"labels": [0, 1]}))
    data = load_dataset("cifar10", tmp_path)
    assert data.train_labels.tolist() == list(range(10))
    assert data.train_images[:, 0, 0, 0].tolist() == [40 * number + j for number in range(1, 6) for j in (0, 1)]
    assert data.scale == 1 / 255
    rates = data.batch(data.test_images, torch.arange(2), torch.float64)
    assert rates.max().item() == 1.0, "the brightest 8-bit pixel is a rate of 1"
