"""Tests of the model zoo (``mlbfgs_hpc.models``) and datasets/batch order (``mlbfgs_hpc.data``)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlbfgs_hpc.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_PACKAGE,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    DatasetSplit,
    GlobalBatchSampler,
    load_dataset,
    shard_bounds,
)
from mlbfgs_hpc import text
from mlbfgs_hpc.blocks import build_blocks
from mlbfgs_hpc.models import MODEL_NAMES, SEQUENCE_MODELS, build_model, count_parameters

IMAGE_MODELS = [name for name in MODEL_NAMES if name not in SEQUENCE_MODELS]

FASHION_PRESENT = os.path.isfile(os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz"))
needs_fashion = pytest.mark.skipif(
    not FASHION_PRESENT,
    reason=f"Debian package {FASHION_MNIST_PACKAGE} not installed ({FASHION_MNIST_ROOT} missing)",
)


# ------------------------------------------------------------------------------- datasets

def _check_split(split: DatasetSplit, n: int, in_shape: tuple[int, int, int], classes: int) -> None:
    assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
    assert tuple(split.x.shape) == (n, *in_shape) and tuple(split.y.shape) == (n,)
    assert split.in_shape == in_shape and len(split) == n
    assert split.num_classes == classes
    assert int(split.y.min()) == 0 and int(split.y.max()) == classes - 1
    assert torch.isfinite(split.x).all()


@needs_fashion
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_and_normalisation(split: str, n: int) -> None:
    data = load_dataset("fashion-mnist", split=split)
    _check_split(data, n, (1, 28, 28), 10)
    assert torch.bincount(data.y).tolist() == [n // 10] * 10
    # The fixed constants were measured on the training split: it comes out standardised.
    if split == "train":
        assert abs(float(data.x.mean())) < 1e-3 and abs(float(data.x.std()) - 1.0) < 1e-3
    pixel_zero = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert float(data.x.min()) == pytest.approx(pixel_zero, abs=1e-5)


@needs_fashion
def test_fashion_mnist_returns_fresh_tensors() -> None:
    first = load_dataset("fashion-mnist", split="test")
    first.x.zero_()  # must not corrupt the per-process cache
    second = load_dataset("fashion-mnist", split="test")
    assert float(second.x.abs().sum()) > 0


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_parser_on_written_files(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9, 9, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress=compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    data = load_dataset("fashion-mnist", split="test", root=str(tmp_path))
    assert tuple(data.x.shape) == (7, 1, 28, 28)
    assert data.y.tolist() == labels.tolist()
    expected = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(data.x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fashion_mnist_missing_file_names_path_and_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", split="train", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert FASHION_MNIST_PACKAGE in message


def test_fashion_mnist_truncated_file_is_rejected(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    header = struct.pack(">HBB3I", 0, 0x08, 3, *images.shape)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + images.tobytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist", split="test", root=str(tmp_path))


def test_digits_split_is_fixed_and_complete() -> None:
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    _check_split(train, 1438, (1, 8, 8), 10)
    _check_split(test, 359, (1, 8, 8), 10)
    # `seed` does not move the split; repeated loads are identical.
    again = load_dataset("digits", split="test", seed=123)
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    # Together the two splits are exactly the 1,797 scikit-learn digits (as a multiset).
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert sorted((train.y.tolist() + test.y.tolist())) == sorted(bunch.target.tolist())
    assert abs(float(train.x.mean())) < 0.05 and abs(float(train.x.std()) - 1.0) < 0.05


def test_synthetic_is_deterministic_and_learnable() -> None:
    train = load_dataset("synthetic", split="train", synthetic_size=1000, seed=7)
    test = load_dataset("synthetic", split="test", synthetic_size=500, seed=7)
    _check_split(train, 1000, (1, 8, 8), 10)
    _check_split(test, 500, (1, 8, 8), 10)
    assert torch.bincount(train.y).tolist() == [100] * 10
    again = load_dataset("synthetic", split="train", synthetic_size=1000, seed=7)
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    other = load_dataset("synthetic", split="train", synthetic_size=1000, seed=8)
    assert not torch.equal(other.x, train.x)
    # Train and test are distinct draws...
    assert not torch.equal(test.x, train.x[:500])
    # ...around shared class means: nearest-class-mean from train classifies test well.
    flat_train, flat_test = train.x.flatten(1), test.x.flatten(1)
    means = torch.stack([flat_train[train.y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(flat_test, means).argmin(1)
    assert float((predicted == test.y).float().mean()) > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar10", "split": "train"}, "name must be one of"),
        ({"name": "digits", "split": "val"}, "split must be one of"),
        ({"name": "synthetic", "split": "train", "synthetic_size": 0}, "synthetic_size"),
        ({"name": "synthetic", "split": "train", "seed": -1}, "seed"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- batch order

def _sampler(world_size: int = 1, rank: int = 0, **overrides: object) -> GlobalBatchSampler:
    kwargs: dict[str, object] = dict(dataset_size=103, global_batch_size=10, seed=5,
                                     rank=rank, world_size=world_size)
    kwargs.update(overrides)
    return GlobalBatchSampler(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_local_shards_tile_the_global_batch(world_size: int) -> None:
    samplers = [_sampler(world_size, r) for r in range(world_size)]
    reference = _sampler()
    for epoch in (0, 3):
        for k in range(reference.batches_per_epoch):
            shards = [s.local_indices(epoch, k) for s in samplers]
            # Concatenation in rank order is the global batch: disjoint, complete, ordered.
            assert torch.equal(torch.cat(shards), reference.global_indices(epoch, k))
            sizes = [len(shard) for shard in shards]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 10


def test_global_order_is_independent_of_world_size() -> None:
    for world_size in (2, 3, 7):
        for rank in range(world_size):
            sampler = _sampler(world_size, rank)
            assert torch.equal(sampler.permutation(2), _sampler().permutation(2))
            assert torch.equal(sampler.global_indices(2, 4), _sampler().global_indices(2, 4))


def test_more_ranks_than_batch_gives_empty_shards() -> None:
    world_size = 13  # > global batch 10
    shards = [_sampler(world_size, r).local_indices(0, 0) for r in range(world_size)]
    assert [len(s) for s in shards] == [1] * 10 + [0] * 3
    assert shards[-1].dtype == torch.int64
    assert torch.equal(torch.cat(shards), _sampler().global_indices(0, 0))


def test_epoch_order_is_a_seeded_permutation() -> None:
    sampler = _sampler()
    assert sampler.batches_per_epoch == 10  # 103 // 10, last partial batch dropped
    perm = sampler.permutation(0)
    assert sorted(perm.tolist()) == list(range(103))
    batches = torch.cat([sampler.global_indices(0, k) for k in range(10)])
    assert torch.equal(batches, perm[:100])
    # Deterministic by seed, different across seeds and epochs.
    assert torch.equal(_sampler().permutation(0), perm)
    assert not torch.equal(_sampler(seed=6).permutation(0), perm)
    assert not torch.equal(sampler.permutation(1), perm)
    # Going back to an earlier epoch (e.g. after a restart) reproduces it.
    assert torch.equal(sampler.permutation(0), perm)


def test_keep_last_partial_batch() -> None:
    samplers = [_sampler(2, r, drop_last=False) for r in range(2)]
    assert samplers[0].batches_per_epoch == 11
    assert samplers[0].global_batch_len(10) == 3
    last = [s.local_indices(1, 10) for s in samplers]
    assert [len(s) for s in last] == [2, 1]
    covered = torch.cat([s.local_indices(1, k) for k in range(11) for s in samplers])
    assert sorted(covered.tolist()) == list(range(103))


def test_returned_indices_do_not_alias_the_cache() -> None:
    sampler = _sampler()
    sampler.global_indices(0, 0).fill_(-1)
    sampler.local_indices(0, 1).fill_(-1)
    assert int(sampler.permutation(0).min()) == 0


def test_iter_epoch_resumes_mid_epoch() -> None:
    sampler = _sampler(3, 1)
    full = list(sampler.iter_epoch(4))
    resumed = list(sampler.iter_epoch(4, start_batch=6))
    assert [k for k, _ in full] == list(range(10))
    assert [k for k, _ in resumed] == list(range(6, 10))
    for (k_full, idx_full), (k_res, idx_res) in zip(full[6:], resumed):
        assert k_full == k_res and torch.equal(idx_full, idx_res)


def test_shard_bounds_function() -> None:
    assert [shard_bounds(10, rank=r, world_size=4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(2, rank=4, world_size=5) == (2, 2)
    assert _sampler(4, 2).shard_bounds(10) == (6, 8)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": 104}, "global_batch_size"),
        ({"seed": -3}, "seed"),
        ({"world_size": 0}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
    ],
)
def test_sampler_rejects_bad_arguments(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sampler(**overrides)  # type: ignore[arg-type]


def test_sampler_rejects_bad_positions() -> None:
    sampler = _sampler()
    with pytest.raises(ValueError, match="batch_index"):
        sampler.local_indices(0, 10)
    with pytest.raises(ValueError, match="epoch"):
        sampler.global_indices(-1, 0)
    with pytest.raises(ValueError, match="start_batch"):
        list(sampler.iter_epoch(0, start_batch=11))


# --------------------------------------------------------------------------------- models

_SMALL_OPTIONS: dict[str, dict[str, object]] = {
    "linear": {},
    "mlp": {},
    "cnn": {},
    "resnet18": {"width": 4},
    "transformer": {"width": 16, "depth": 2},
}


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 16, 16)])
def test_model_forward_backward(name: str, in_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_shape=in_shape, num_classes=7, **_SMALL_OPTIONS[name])
    x = torch.randn(5, *in_shape)
    y = torch.randint(0, 7, (5,))
    logits = model(x)
    assert logits.shape == (5, 7) and logits.dtype == torch.float32
    F.cross_entropy(logits, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_init_is_deterministic_given_the_seed(name: str) -> None:
    in_shape = (16,) if name in SEQUENCE_MODELS else (1, 8, 8)

    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = build_model(name, in_shape=in_shape, num_classes=10, **_SMALL_OPTIONS[name])
        return [p.detach().clone() for p in model.parameters()]

    first, second, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_parameter_counts() -> None:
    # The CIFAR ResNet-18 of the mL-BFGS paper: 11,173,962 parameters (no forward: keep it fast).
    resnet = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10)
    assert count_parameters(resnet) == 11_173_962
    linear = build_model("linear", in_shape=(1, 28, 28), num_classes=10)
    assert count_parameters(linear) == 784 * 10 + 10 and len(build_blocks(linear)) == 1
    mlp = build_model("mlp", in_shape=(1, 28, 28), num_classes=10)
    assert count_parameters(mlp) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    custom = build_model("mlp", in_shape=(1, 8, 8), num_classes=3, hidden_sizes=(5,))
    assert count_parameters(custom) == 64 * 5 + 5 + 5 * 3 + 3
    cnn = build_model("cnn", in_shape=(1, 28, 28), num_classes=10)
    assert count_parameters(cnn) == 421_642
    lm = build_model("transformer", in_shape=(64,), num_classes=128)
    assert count_parameters(lm) == 220_672 and len(build_blocks(lm)) == 28


def test_transformer_is_causal_and_predicts_every_position() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", in_shape=(12,), num_classes=20, **_SMALL_OPTIONS[
        "transformer"]).eval()
    x = torch.randint(0, 20, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 20) and logits.dtype == torch.float32
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    after = model(changed)
    # Positions before 7 cannot see token 7; position 7 and later do.
    torch.testing.assert_close(after[:, :7], logits[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 7:], logits[:, 7:])
    # Shorter inputs than the context work (positions are cut).
    assert model(x[:, :5]).shape == (3, 5, 20)
    F.cross_entropy(model.train()(x).flatten(0, 1), x.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_transformer_rejects_image_shapes() -> None:
    with pytest.raises(ValueError, match="context_length"):
        build_model("transformer", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="divisible"):
        build_model("transformer", in_shape=(8,), num_classes=10, width=10, heads=4)


# ------------------------------------------------------------------------ python-stdlib text

def test_python_stdlib_windows_are_next_characters() -> None:
    train = load_dataset("python-stdlib", split="train")
    test = load_dataset("python-stdlib", split="test")
    for split in (train, test):
        assert split.is_sequence and split.x.dtype == torch.int64
        assert split.in_shape == (text.DEFAULT_CONTEXT,) and split.num_classes == 128
        assert split.targets_per_sample == text.DEFAULT_CONTEXT
        assert int(split.x.min()) >= 0 and int(split.x.max()) < 128
        # y is x shifted by one character, across window boundaries too.
        assert torch.equal(split.y[:, :-1], split.x[:, 1:])
        assert torch.equal(split.y[:-1, -1], split.x[1:, 0])
    # Real text, a few MB of it: roughly 9:1 by file.
    assert len(train) > 40_000 and 0.05 < len(test) / len(train) < 0.25
    again = load_dataset("python-stdlib", split="train")
    assert torch.equal(again.x, train.x) and again.x is not train.x


def test_python_stdlib_splits_by_file(tmp_path: Path) -> None:
    names = [f"mod{i:02d}.py" for i in range(40)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"# {name}\n" + f"x_{i} = {i}\n" * 30)
    (tmp_path / "notes.txt").write_text("not python")
    test_files = [n for n in names if text.is_test_file(n)]
    assert 0 < len(test_files) < len(names)
    x_train, _ = text.load_windows("train", root=str(tmp_path), context=8)
    x_test, _ = text.load_windows("test", root=str(tmp_path), context=8)
    decode = (lambda x: bytes(x.reshape(-1).tolist()).decode())
    train_text, test_text = decode(x_train), decode(x_test)
    for name in names:   # every file's header lands on exactly one side
        assert (f"# {name}" in test_text) == (name in test_files)
        assert (f"# {name}" in train_text) == (name not in test_files)
    assert "not python" not in train_text + test_text


def test_python_stdlib_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("python-stdlib", split="train", root=str(tmp_path))
    (tmp_path / "a.py").write_text("x")
    with pytest.raises(ValueError, match="context"):
        text.load_windows("train", root=str(tmp_path), context=0)


def test_cnn_optional_pool_bounds_the_classifier() -> None:
    model = build_model("cnn", in_shape=(1, 28, 28), num_classes=10, pool_size=2)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.classifier[1].in_features == 64 * 2 * 2


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="linear.*mlp.*cnn.*resnet18.*transformer"):
        build_model("vgg16", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", in_shape=(1, 8, 8), num_classes=10, width=8)
    with pytest.raises(ValueError, match="in_shape"):
        build_model("mlp", in_shape=(1, 8), num_classes=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        build_model("linear", in_shape=(1, 8, 8), num_classes=0)
    with pytest.raises(ValueError, match="in_shape"):
        build_model("cnn", in_shape=(1, 3, 3), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", in_shape=(3, 8, 8), num_classes=0)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", in_shape=(3, 8, 8), num_classes=10, width=0)
