"""Datasets of the training command and the rank-independent global batch order.

Datasets (all returned whole, in memory, as normalised float32 ``(N, C, H, W)`` tensors):

* ``fashion-mnist``: the idx files installed by Debian's ``dataset-fashion-mnist`` package
  under ``/usr/share/datasets/fashion-mnist/`` (``train-images-idx3-ubyte.gz`` etc.; plain,
  un-gzipped files are accepted too). 60,000 train / 10,000 test images, 1x28x28, 10 classes.
  No download is ever attempted: compute nodes usually have no network.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split once 80/20
  by a fixed permutation (1,438 train / 359 test) that does not depend on ``seed``.
* ``synthetic``: Gaussian class clusters, 1x8x8, 10 classes; learnable (a linear model gets
  ~97 %) and fully determined by ``seed``. Train and test share the class means but draw their
  samples from distinct streams.
* ``python-stdlib``: next-character prediction on the running Python's own standard-library
  sources (:mod:`mlbfgs_hpc.text`): int64 token windows ``(N, 64)`` with the next character
  of every position as target ``(N, 64)``, 128 ASCII classes; split by file.

Data order: :class:`GlobalBatchSampler` defines, per epoch, a permutation that depends only on
(seed, epoch, dataset size) and cuts it into global batches; each rank takes a contiguous shard
of every global batch. Because the global order never depends on the number of ranks, a job
checkpointed at (epoch, batch) on 4 ranks continues with exactly the same samples on 2 or 8.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import text

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "digits", "synthetic", "python-stdlib")
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Fixed normalisation constants (mean/std of the pixel values scaled to [0, 1]) measured on
# the respective *training* data once; constants rather than per-run statistics so that train,
# test and every rank see the identical transform.
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242
DIGITS_MEAN = 0.3052603
DIGITS_STD = 0.3760492

# The digits split is part of the dataset's definition, not of a run: fixed seed.
_DIGITS_SPLIT_SEED = 20230725
_DIGITS_TEST_FRACTION_DENOMINATOR = 5  # 1/5 = 20 % test

_SYNTHETIC_CLASSES = 10
_SYNTHETIC_SHAPE = (1, 8, 8)
# Class means ~ N(0, 0.5^2) per pixel, unit isotropic noise: pairwise mean distance ~5.7
# noise standard deviations, so the task is learnable but not trivially separable.
_SYNTHETIC_MEAN_SCALE = 0.5
_SYNTHETIC_STREAM = {"means": 0, "train": 1, "test": 2}

# idx format (http://yann.lecun.com/exdb/mnist/): 2 zero bytes, a type code, the number of
# dimensions, then one big-endian uint32 per dimension. Only unsigned bytes occur in MNIST.
_IDX_UBYTE = 0x08


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """One split of a dataset, held in memory: images with labels, or token sequences with
    the next token of every position.

    Args:
        x: float32 images ``(N, C, H, W)``, already normalised; or int64 tokens ``(N, L)``.
        y: int64 targets in ``[0, num_classes)``: ``(N,)`` class labels for images, ``(N, L)``
            next tokens for token sequences.
        num_classes: number of classes (the vocabulary size for tokens), >= 1.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        images = self.x.dtype == torch.float32 and self.x.dim() == 4
        tokens = self.x.dtype == torch.int64 and self.x.dim() == 2
        if not (images or tokens):
            raise ValueError(f"x must be a float32 (N, C, H, W) or an int64 (N, L) tensor, "
                             f"got {self.x.dtype} with shape {tuple(self.x.shape)}")
        want = tuple(self.x.shape) if tokens else (self.x.shape[0],)
        if self.y.dtype != torch.int64 or tuple(self.y.shape) != want:
            raise ValueError(f"y must be an int64 tensor of shape {want}, got "
                             f"{self.y.dtype} with shape {tuple(self.y.shape)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")

    @property
    def is_sequence(self) -> bool:
        """Token sequences (one target per position) rather than labelled images."""
        return self.x.dim() == 2

    @property
    def targets_per_sample(self) -> int:
        """Targets (loss terms) per sample: 1 for an image, L for a sequence of L tokens."""
        return int(self.x.shape[1]) if self.is_sequence else 1

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input, as models expect it: (channels, height, width) of an image, or
        (L,) of a token sequence."""
        return tuple(int(v) for v in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> DatasetSplit:
        """This split with its tensors on ``device`` (itself when they already are there).

        The in-memory datasets are small (Fashion-MNIST: 188 MB of float32 inputs), so a GPU
        run moves each split once instead of copying every batch across PCIe.
        """
        device = torch.device(device)
        if self.x.device == device:
            return self
        return DatasetSplit(x=self.x.to(device), y=self.y.to(device),
                            num_classes=self.num_classes)


def load_dataset(
    name: str,
    *,
    split: Literal["train", "test"],
    root: str | None = None,
    synthetic_size: int = 2048,
    seed: int = 0,
) -> DatasetSplit:
    """Load one split of a dataset.

    Args:
        name: one of :data:`DATASET_NAMES`.
        split: ``"train"`` or ``"test"``.
        root: fashion-mnist: directory holding the idx files (default
            :data:`FASHION_MNIST_ROOT`, where the Debian package installs them);
            python-stdlib: directory of ``*.py`` files (default: this Python's stdlib).
        synthetic_size: synthetic only: number of samples of the requested split (>= 1).
        seed: synthetic only: seed (>= 0) of the class means and samples. The real datasets
            and the digits split are fixed and ignore it.

    Returns:
        The split, normalised, with freshly allocated tensors (callers may modify them).

    Raises:
        ValueError: bad ``name``, ``split``, ``synthetic_size`` or ``seed``.
        FileNotFoundError: a Fashion-MNIST file is missing (names the path and the package),
            or the python-stdlib directory holds no ``*.py`` file.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, root if root is not None else FASHION_MNIST_ROOT)
    if name == "digits":
        return _load_digits(split)
    if name == "python-stdlib":
        x, y = text.load_windows(split, root=root)
        return DatasetSplit(x=x, y=y, num_classes=text.VOCAB_SIZE)
    if not isinstance(synthetic_size, int) or synthetic_size < 1:
        raise ValueError(f"synthetic_size must be an integer >= 1, got {synthetic_size!r}")
    _check_seed(seed)
    return _make_synthetic(split, synthetic_size, seed)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _normalise(pixels01: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """Map float32 values in [0, 1] to ``(v - mean) / std`` as a new torch tensor."""
    x = torch.from_numpy(np.ascontiguousarray(pixels01, dtype=np.float32))
    return x.sub_(mean).div_(std)


# ----------------------------------------------------------------------------- Fashion-MNIST

def _resolve_idx(root: str, stem: str) -> str:
    """Path of ``stem`` in ``root``, preferring the gzipped file Debian installs."""
    for candidate in (os.path.join(root, stem + ".gz"), os.path.join(root, stem)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {os.path.join(root, stem + '.gz')} not found (nor the un-gzipped "
        f"{stem}). Install the Debian package '{FASHION_MNIST_PACKAGE}' "
        f"(apt-get install {FASHION_MNIST_PACKAGE}), which puts the files in "
        f"{FASHION_MNIST_ROOT}, or pass root= (mlbfgs-train --data-root) the directory that holds them."
    )


@functools.lru_cache(maxsize=8)
def _read_idx(path: str) -> np.ndarray:
    """Parse an idx file of unsigned bytes into a read-only uint8 array (cached per process)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack_from(">HBB", raw, 0)
    if zero != 0 or type_code != _IDX_UBYTE or ndim < 1:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
    header = 4 + 4 * ndim
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header promises {dims} = {expected} bytes of data, file "
                         f"holds {len(raw) - header}: truncated or corrupt")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    array.flags.writeable = False  # shared through the cache: nobody may modify it
    logger.debug("read %s: shape %s", path, dims)
    return array


def _load_fashion_mnist(split: str, root: str) -> DatasetSplit:
    image_stem, label_stem = _FASHION_FILES[split]
    images = _read_idx(_resolve_idx(root, image_stem))
    labels = _read_idx(_resolve_idx(root, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} files in {root} disagree: images "
                         f"{images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.reshape(images.shape[0], 1, *images.shape[1:]).astype(np.float32))
    # Scale to [0, 1] and normalise in place in float32: ~0.1 s for 60k images.
    x.div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    return DatasetSplit(x=x, y=y, num_classes=10)


# ----------------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn is an optional dependency (extra "data"), needed only for this.
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("the 'digits' dataset needs scikit-learn: "
                          "pip install 'mlbfgs-hpc[data]'") from exc
    bunch = load_digits()
    data = np.asarray(bunch.data, dtype=np.float32) / 16.0  # pixel values are 0..16
    target = np.asarray(bunch.target, dtype=np.int64)
    data.flags.writeable = False
    target.flags.writeable = False
    return data, target


def _load_digits(split: str) -> DatasetSplit:
    data, target = _digits_arrays()
    n = data.shape[0]
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(n)
    n_test = n // _DIGITS_TEST_FRACTION_DENOMINATOR
    chosen = perm[n_test:] if split == "train" else perm[:n_test]
    x = _normalise(data[chosen].reshape(-1, 1, 8, 8), DIGITS_MEAN, DIGITS_STD)
    y = torch.from_numpy(target[chosen].copy())
    return DatasetSplit(x=x, y=y, num_classes=10)


# -------------------------------------------------------------------------------- synthetic

def _synthetic_rng(seed: int, stream: str) -> np.random.Generator:
    # SeedSequence mixes (seed, stream) so neighbouring seeds give unrelated streams.
    return np.random.default_rng(np.random.SeedSequence([seed, _SYNTHETIC_STREAM[stream]]))


def _make_synthetic(split: str, size: int, seed: int) -> DatasetSplit:
    features = int(np.prod(_SYNTHETIC_SHAPE))
    means = _synthetic_rng(seed, "means").normal(
        0.0, _SYNTHETIC_MEAN_SCALE, size=(_SYNTHETIC_CLASSES, features))
    rng = _synthetic_rng(seed, split)
    # Balanced classes (sizes differ by at most one), in random order.
    labels = rng.permutation(np.arange(size) % _SYNTHETIC_CLASSES)
    samples = means[labels] + rng.standard_normal(size=(size, features))
    # Exact per-pixel marginal std is sqrt(1 + scale^2) and mean 0: a fixed normalisation.
    samples /= np.sqrt(1.0 + _SYNTHETIC_MEAN_SCALE ** 2)
    x = torch.from_numpy(samples.astype(np.float32).reshape(size, *_SYNTHETIC_SHAPE))
    y = torch.from_numpy(labels.astype(np.int64))
    return DatasetSplit(x=x, y=y, num_classes=_SYNTHETIC_CLASSES)


# ------------------------------------------------------------------------------ batch order

def shard_bounds(global_size: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open range ``[start, stop)`` of rank ``rank``'s contiguous shard of ``global_size``.

    The first ``global_size % world_size`` ranks get one element more than the others; ranks
    beyond ``global_size`` get an empty range (``start == stop``).

    Args:
        global_size: number of elements to split (>= 0).
        rank: this rank, in ``[0, world_size)``.
        world_size: number of ranks (>= 1).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not isinstance(global_size, int) or global_size < 0:
        raise ValueError(f"global_size must be an integer >= 0, got {global_size!r}")
    base, extra = divmod(global_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class GlobalBatchSampler:
    """Deterministic, rank-independent sequence of global batches, sharded over ranks.

    Epoch ``e`` uses the permutation ``torch.randperm(dataset_size)`` drawn from a
    ``torch.Generator`` seeded with a hash of ``(seed, e)``; global batch ``k`` is
    ``perm[k*B:(k+1)*B]``. Rank ``r`` of ``p`` takes the contiguous shard
    :func:`shard_bounds` of that batch. The global sequence depends only on (seed, epoch,
    global batch size, dataset size), never on ``world_size``, so a run resumed on a different
    number of ranks sees the same samples in the same order.

    Loss weighting: when ``B % p != 0`` shards differ in size by one (and with ``p > B`` some
    are empty), so averaging per-rank *mean* losses would weight samples unequally. The driver
    must use the per-rank *sum* scaled to the global batch,
    ``loss = cross_entropy(out, y, reduction="sum") * world_size / len(global batch)``, so that
    Horovod's averaging allreduce of the gradients yields exactly the gradient of the mean
    loss over the global batch. A rank with an empty shard contributes zero gradients (it
    must still take part in the allreduce). Note that BatchNorm in training mode cannot run on
    an empty (or, for 1x1 feature maps, a single-sample) shard.

    Args:
        dataset_size: number of samples N (>= 1).
        global_batch_size: samples per global batch B, over all ranks (>= 1; <= N when
            ``drop_last``).
        seed: data-order seed (>= 0).
        rank: this rank, in ``[0, world_size)``.
        world_size: number of ranks p (>= 1).
        drop_last: drop the last, incomplete global batch of every epoch (default True, so
            every step has the same batch size); otherwise it is kept, smaller.
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        global_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool = True,
    ) -> None:
        if not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be an integer >= 1, got {dataset_size!r}")
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ValueError(f"global_batch_size must be an integer >= 1, got {global_batch_size!r}")
        if drop_last and global_batch_size > dataset_size:
            raise ValueError(f"global_batch_size must be <= dataset_size ({dataset_size}) when "
                             f"drop_last=True (else an epoch has no batch), got {global_batch_size}")
        _check_seed(seed)
        # Validates rank and world_size with the same messages as the free function.
        shard_bounds(0, rank=rank, world_size=world_size)
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = bool(drop_last)
        # One-epoch cache: the driver asks for every batch of an epoch in turn, and a fresh
        # randperm of 60k per step would be wasted work.
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Number of global batches (= optimizer steps) per epoch."""
        if self.drop_last:
            return self.dataset_size // self.global_batch_size
        return -(-self.dataset_size // self.global_batch_size)

    def shard_bounds(self, global_size: int) -> tuple[int, int]:
        """This rank's half-open shard ``[start, stop)`` of a global batch of ``global_size``."""
        return shard_bounds(global_size, rank=self.rank, world_size=self.world_size)

    def epoch_seed(self, epoch: int) -> int:
        """Seed of the permutation of ``epoch``: a 63-bit hash of (seed, epoch)."""
        self._check_epoch(epoch)
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])

    def permutation(self, epoch: int) -> torch.Tensor:
        """The int64 permutation of the dataset for ``epoch`` (a fresh copy)."""
        return self._perm(epoch).clone()

    def global_indices(self, epoch: int, batch_index: int) -> torch.Tensor:
        """Dataset indices (int64) of global batch ``batch_index`` of ``epoch``, all ranks."""
        self._check_batch_index(batch_index)
        start = batch_index * self.global_batch_size
        return self._perm(epoch)[start:start + self.global_batch_size].clone()

    def local_indices(self, epoch: int, batch_index: int) -> torch.Tensor:
        """This rank's contiguous shard of :meth:`global_indices` (possibly empty)."""
        self._check_batch_index(batch_index)
        begin = batch_index * self.global_batch_size
        global_size = min(self.global_batch_size, self.dataset_size - begin)
        start, stop = self.shard_bounds(global_size)
        return self._perm(epoch)[begin + start:begin + stop].clone()

    def global_batch_len(self, batch_index: int) -> int:
        """Size of global batch ``batch_index`` (smaller only for a kept last batch)."""
        self._check_batch_index(batch_index)
        return min(self.global_batch_size, self.dataset_size - batch_index * self.global_batch_size)

    def iter_epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(batch_index, local_indices)`` for the batches of ``epoch`` from ``start_batch``.

        Args:
            epoch: epoch number (>= 0).
            start_batch: first batch to yield, in ``[0, batches_per_epoch]``; a resumed run
                passes the position saved in its checkpoint.
        """
        self._check_epoch(epoch)
        if not isinstance(start_batch, int) or not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be an integer in [0, {self.batches_per_epoch}], "
                             f"got {start_batch!r}")
        for batch_index in range(start_batch, self.batches_per_epoch):
            yield batch_index, self.local_indices(epoch, batch_index)

    def _perm(self, epoch: int) -> torch.Tensor:
        self._check_epoch(epoch)
        if self._cached_epoch != epoch or self._cached_perm is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(self.epoch_seed(epoch))
            self._cached_perm = torch.randperm(self.dataset_size, generator=generator)
            self._cached_epoch = epoch
        return self._cached_perm

    @staticmethod
    def _check_epoch(epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")

    def _check_batch_index(self, batch_index: int) -> None:
        if (not isinstance(batch_index, int) or isinstance(batch_index, bool)
                or not 0 <= batch_index < self.batches_per_epoch):
            raise ValueError(f"batch_index must be an integer in [0, {self.batches_per_epoch}), "
                             f"got {batch_index!r}")
