import hashlib
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdci_ray.data import (
    DATASETS,
    DatasetError,
    DeviceBatches,
    Normalize,
    dataset_info,
    load_dataset,
    load_pool,
    random_crop_flip,
)
from kdci_ray.data import base as data_base
from kdci_ray.data.cifar import CIFAR10_CLASSES
from kdci_ray.registry import UnknownNameError

# sha256 of the decoded shared CIFAR-10 JPEG copy (../shared/data/README.md)
SHARED_CIFAR10_SHA = {
    "train": ("bf3aabd52be912dae02a0435296c4dab5289524b57f55cd162dc4796935a611b",
              "a29f2a5ffc141bb1c9e1af453e9a5ef8c316b2f675f8cea1d849d220d33a14fb"),
    "test": ("5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f",
             "a054c239a40ee7f2a5745e7e4bc11a51e9cb40c98134b602c1068e6a207487c6"),
}


# ---------------------------------------------------------------- writers of the real on-disk formats
def write_cifar_pickle(path: Path, data: np.ndarray, labels, label_key: bytes) -> None:
    """A batch file like the official ones: dict with bytes keys, (N, 3072) uint8 rows in CHW order."""
    batch = {b"batch_label": b"testing batch", label_key: list(map(int, labels)), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar10_pickle_tree(root: Path, per_batch: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        write_cifar_pickle(folder / name, data, rng.integers(0, 10, per_batch), b"labels")
        images[name] = data
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)
    return images


def _py2_str(b: bytes) -> bytes:
    """A Python 2 `str` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(n: int) -> bytes:
    return b"K" + bytes([n]) if n < 256 else (b"M" + struct.pack("<H", n) if n < 65536 else b"J" + struct.pack("<i", n))


def py2_cifar_batch(data: np.ndarray, labels, label_key: bytes = b"labels") -> bytes:
    """The opcode stream of an official CIFAR batch file (Python 2 cPickle, numpy.core globals, str payloads)."""
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
        + b"(" + _py2_int(1) + _py2_int(data.shape[0]) + _py2_int(3072) + b"\x86"
        + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0) + b"tb"
        + b"\x89" + _py2_str(data.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(label_key) + label_list
            + _py2_str(b"batch_label") + _py2_str(b"training batch 1 of 5") + b"u.")


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


# ---------------------------------------------------------------- CIFAR
def test_cifar10_pickle_layout(tmp_path):
    written = make_cifar10_pickle_tree(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test")  # the folder itself works too
    assert train.images.shape == (30, 32, 32, 3) and test.images.shape == (6, 32, 32, 3)
    # row i, channel c, pixel (y, x) of the official format lands at images[i, y, x, c]
    row = written["data_batch_2"][1]
    assert np.array_equal(train.images[7], row.reshape(3, 32, 32).transpose(1, 2, 0))
    img, label = train[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and 0 <= label < 10


def test_cifar10_official_python2_pickles(tmp_path):
    """Files as the official archive has them (written by Python 2), not only as Python 3 writes them."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(5)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4)
        (folder / name).write_bytes(py2_cifar_batch(data, labels))
        batches[name] = (data, labels)
    test = load_dataset("cifar10", tmp_path, "test")
    data, labels = batches["test_batch"]
    assert np.array_equal(test.images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert list(test.labels) == list(labels)


def test_download_only_when_no_copy_is_there(tmp_path, monkeypatch):
    from kdci_ray.data import cifar

    calls = []
    monkeypatch.setattr(cifar, "_download", lambda root, info: calls.append(root))
    write_png(tmp_path / "cifar10-jpeg" / "test" / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    for cls in CIFAR10_CLASSES:
        (tmp_path / "cifar10-jpeg" / "test" / cls).mkdir(parents=True, exist_ok=True)
    assert len(load_dataset("cifar10", tmp_path, "test", download=True)) == 1
    assert calls == []  # the ImageFolder copy the user pointed at is used, nothing is fetched


def test_cifar100_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 5)):
        write_cifar_pickle(folder / split, rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n), b"fine_labels")
    train = load_dataset("cifar100", tmp_path, "train")
    assert len(train) == 12 and train.labels.max() < 100 and train.info.num_classes == 100
    assert len(load_dataset("cifar100", tmp_path, "test")) == 5


def test_cifar_pickle_malformed_and_hostile(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_pickle(folder / "train", np.zeros((3, 100), np.uint8), [0, 1, 2], b"fine_labels")
    with pytest.raises(DatasetError, match=r"shape \(3, 100\)"):
        load_dataset("cifar100", tmp_path, "train")

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("cifar100", tmp_path, "train")
    assert not (tmp_path / "pwned").exists()
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="malformed CIFAR batch file"):
        load_dataset("cifar100", tmp_path, "test")


def test_cifar10_imagefolder_layout_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    expected = {}
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            for j in range(2):
                rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                write_png(tmp_path / "cifar10-jpeg" / split / cls / f"{j:04d}.png", rgb)
                expected[(split, label, j)] = rgb
    ds = load_dataset("cifar10", tmp_path, "train")
    assert ds.images.shape == (20, 32, 32, 3)
    assert list(ds.labels) == [c for c in range(10) for _ in range(2)]  # official class order, sorted files
    assert np.array_equal(ds.images[5], expected[("train", 2, 1)])  # PNG is lossless
    # second load comes from the .npy cache: decoding must not run again
    monkeypatch.setattr(data_base, "decode_files", lambda *a, **k: pytest.fail("decoded twice"))
    again = load_dataset("cifar10", tmp_path, "train")
    assert np.array_equal(again.images, ds.images)


def _build_cached(args):
    """(In a child process) cached_arrays with a build that leaves a mark and takes a while."""
    import os

    cache, source, marks = args
    os.environ["KDCI_RAY_CACHE"] = cache

    def build():
        (Path(marks) / str(os.getpid())).touch()
        time.sleep(1.0)
        return np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(3)

    x, y = data_base.cached_arrays({"name": "t", "split": "s"}, [Path(source)], build)
    return x.tolist(), y.tolist()


def test_processes_filling_one_cache_entry_build_it_once(tmp_path):
    """Ray workers of one node load the same split at once: one decodes, the others wait and read its arrays."""
    import multiprocessing

    source, marks = tmp_path / "source.bin", tmp_path / "marks"
    source.write_bytes(b"data")
    marks.mkdir()
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_cached, [(str(tmp_path / "cache"), str(source), str(marks))] * 3)
    assert len(list(marks.iterdir())) == 1
    assert results == [(np.arange(12).reshape(3, 4).tolist(), [0, 1, 2])] * 3


def test_digits_load_from_the_cache_after_the_first_time(tmp_path, monkeypatch):
    """The first load caches the split; later loads (every Ray worker of a digits run) read the arrays and
    neither import scikit-learn nor split again."""
    from kdci_ray.data import digits as digits_module

    monkeypatch.setenv("KDCI_RAY_CACHE", str(tmp_path))
    first = load_dataset("digits", None, "test")
    monkeypatch.setattr(digits_module, "digits_arrays", lambda: pytest.fail("loaded through scikit-learn again"))
    again = load_dataset("digits", None, "test")
    assert len(first) == 450 and np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert len([p for p in (tmp_path / "arrays").glob("digits-test-*") if p.is_dir()]) == 1  # one entry (and its lock)


def test_an_empty_class_folder_is_warned_about(tmp_path):
    for label, cls in enumerate(CIFAR10_CLASSES):
        (tmp_path / "cifar10-jpeg" / "test" / cls).mkdir(parents=True)
        if cls not in ("cat", "dog"):
            write_png(tmp_path / "cifar10-jpeg" / "test" / cls / "0.png", np.full((32, 32, 3), label, np.uint8))
    with pytest.warns(UserWarning, match=r"2 class folder\(s\) in .*test hold no images \(cat, dog\)"):
        ds = load_dataset("cifar10", tmp_path, "test")
    assert len(ds) == 8 and 3 not in ds.labels and 5 not in ds.labels


def test_cifar10_imagefolder_wrong_classes(tmp_path):
    write_png(tmp_path / "train" / "not_a_class" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DatasetError, match="do not match the 10 cifar10 classes"):
        load_dataset("cifar10", tmp_path, "train")


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", tmp_path, "train")
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download" in msg and "cifar10-jpeg.tar.gz" in msg
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="no data root"):
        load_dataset("cifar10", None, "train")
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_dataset("cifar10", tmp_path, "validation")
    with pytest.raises(UnknownNameError, match="known datasets"):
        load_dataset("mnist", tmp_path)


@pytest.mark.slow(seconds=32)
def test_shared_cifar10_copy_checksums(cifar10_archive):
    """The archive itself is a valid root: unpacked once into the cache, decoded, checked, cached."""
    for split, (x_sha, y_sha) in SHARED_CIFAR10_SHA.items():
        ds = load_dataset("cifar10", cifar10_archive, split)
        assert hashlib.sha256(ds.images.tobytes()).hexdigest() == x_sha
        assert hashlib.sha256(ds.labels.astype(np.uint8).tobytes()).hexdigest() == y_sha
    # The second load reads the decoded arrays (a cache hit rewrites nothing); not timed: a busy machine is slow either way.
    cached = {p: p.stat().st_mtime_ns for p in (data_base.cache_root() / "arrays").glob("*/x.npy")}
    assert cached
    load_dataset("cifar10", cifar10_archive, "train")
    assert {p: p.stat().st_mtime_ns for p in cached} == cached, "second load must come from the decoded-array cache"


# ---------------------------------------------------------------- Tiny-ImageNet / ImageNet
def make_tiny_imagenet(root: Path) -> list[str]:
    rng = np.random.default_rng(3)
    base = root / "tiny-imagenet-200"
    wnids = [f"n{1000 + i:08d}" for i in range(200)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order != class order
    for w in wnids[:200]:
        for j in range(1 if w != wnids[3] else 2):
            write_png(base / "train" / w / "images" / f"{w}_{j}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rows = []
    for j, w in enumerate([wnids[5], wnids[0], wnids[199]]):
        write_png(base / "val" / "images" / f"val_{j}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        rows.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    gray = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L")
    (base / "test" / "images").mkdir(parents=True)
    gray.save(base / "test" / "images" / "test_0.JPEG", format="PNG")
    return wnids


def test_tiny_imagenet_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    train = load_dataset("tiny-imagenet", tmp_path, "train")
    assert train.images.shape == (201, 64, 64, 3) and train.labels[3] == 3 and train.labels[4] == 3
    val = load_dataset("tiny-imagenet", tmp_path / "tiny-imagenet-200", "val")
    assert list(val.labels) == [5, 0, 199]
    test = load_dataset("tiny-imagenet", tmp_path, "test")
    assert not test.labeled and test.images.shape == (1, 64, 64, 3)  # grayscale converted to RGB
    assert test[0][1] == -1


def test_tiny_imagenet_labels_follow_annotation_edits(tmp_path):
    make_tiny_imagenet(tmp_path)
    assert list(load_dataset("tiny-imagenet", tmp_path, "val").labels) == [5, 0, 199]
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("n00001005", "n00001007"))
    assert list(load_dataset("tiny-imagenet", tmp_path, "val").labels) == [7, 0, 199]  # not the stale cache


def test_tiny_imagenet_missing_parts(tmp_path):
    with pytest.raises(DatasetError, match="wnids.txt"):
        load_dataset("tiny-imagenet", tmp_path, "train")
    make_tiny_imagenet(tmp_path)
    missing = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    missing.unlink()  # listed in val_annotations.txt, gone from disk
    with pytest.raises(DatasetError, match="val_1.JPEG is listed by the dataset but missing"):
        load_dataset("tiny-imagenet", tmp_path, "val")
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG n00001005\n")  # spaces, not tabs
    with pytest.raises(DatasetError, match=r"val_annotations.txt:1 is not"):
        load_dataset("tiny-imagenet", tmp_path, "val")
    ann.unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        load_dataset("tiny-imagenet", tmp_path, "val")


def test_corrupt_image_names_the_file(tmp_path):
    write_png(tmp_path / "train" / "n01" / "a.png", np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "train" / "n01" / "b.png").write_bytes(b"not an image")
    ds = load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(DatasetError, match="cannot read image .*b.png"):
        ds[1]


@pytest.mark.parametrize("builtin_filter", [True, False], ids=["tarfile-data-filter", "manual-check"])
def test_archive_roots_are_unpacked_safely(tmp_path, monkeypatch, builtin_filter):
    if not builtin_filter:  # Python < 3.10.12 has no tarfile.data_filter: our own checks must hold
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = tmp_path / "digits.tar.gz"
    src = tmp_path / "src" / "cifar10-jpeg" / "test"
    for cls in CIFAR10_CLASSES:
        write_png(src / cls / "0.png", np.full((32, 32, 3), 7, np.uint8))
    with tarfile.open(good, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    assert len(load_dataset("cifar10", good, "test")) == 10
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, __import__("io").BytesIO(b"bad"))
    with pytest.raises(DatasetError, match="could not unpack"):
        load_dataset("cifar10", evil, "test")
    assert not (tmp_path / "escaped.txt").exists()
    assert not any(p.name.count(".tmp") for p in (data_base.cache_root() / "unpacked").iterdir())


def test_imagenet_imagefolder_streams_files(tmp_path):
    rng = np.random.default_rng(4)
    for cls in ("n02", "n01"):
        for j in range(2):
            write_png(tmp_path / "val" / cls / f"{j}.JPEG", rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ds = load_dataset("imagenet", tmp_path, "val")
    assert len(ds) == 4 and ds.info.num_classes == 2 and ds.info.classes == ("n01", "n02")
    img, label = ds[2]
    assert img.shape == (3, 224, 224) and img.dtype == torch.uint8 and label == 1
    with pytest.raises(DatasetError, match="image-net.org"):
        load_dataset("imagenet", tmp_path, "train")


# ---------------------------------------------------------------- digits, pools, batches
def test_digits_split_is_fixed_and_stratified():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.images.shape[1:] == (8, 8, 1) and train.images.max() == 255
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46
    assert np.array_equal(load_dataset("digits", split="test").images, test.images)
    assert hashlib.sha256(test.labels.tobytes()).hexdigest() == hashlib.sha256(
        load_dataset("digits", split="test").labels.tobytes()).hexdigest()


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_declares_normalisation(name):
    info = dataset_info(name)
    assert len(info.mean) == len(info.std) == info.channels and all(s > 0 for s in info.std)
    assert info.image_size > 0 and info.how_to_get
    # Labelled datasets have classes; the unlabelled wild sources (imagefolder, digits-wild) declare 0.
    assert info.num_classes > 1 or (info.num_classes == 0 and name in ("imagefolder", "digits-wild"))


def test_unlabeled_pool_resizes_and_streams(tmp_path):
    make_tiny_imagenet(tmp_path)
    pool = load_pool("tiny-imagenet", tmp_path, "val", image_size=32)
    assert pool[0].shape == (3, 32, 32) and pool[0].dtype == torch.uint8
    batches = list(pool.iter_batches(2))
    assert [b.shape[0] for b in batches] == [2, 1]
    shard = list(pool.iter_batches(2, start=1, stop=3))
    assert torch.equal(torch.cat(shard), torch.cat(batches)[1:3])
    gray = load_pool("digits", split="test", image_size=32, channels=3)
    assert gray[0].shape == (3, 32, 32)
    to_gray = load_pool("tiny-imagenet", tmp_path, "val", image_size=8, channels=1)
    assert to_gray[0].shape == (1, 8, 8)


def test_device_batches_cover_dataset_and_shuffle_reproducibly():
    ds = load_dataset("digits", split="test")
    seen = torch.cat([y for _, y in DeviceBatches(ds, 64, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == sorted(ds.labels.tolist())
    first = [next(iter(DeviceBatches(ds, 64, shuffle=True, seed=s)))[1] for s in (1, 1, 2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert not torch.equal(first[0], torch.as_tensor(ds.labels[:64]))  # shuffled, not file order
    assert len(DeviceBatches(ds, 64, drop_last=True)) == 450 // 64


def test_random_crop_flip_is_a_per_sample_crop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    out = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        candidates = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not torch.equal(out, x)


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.1, 0.3))
    manual = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.1, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), manual)
