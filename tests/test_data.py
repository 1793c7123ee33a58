"""Dataset readers on generated files in the exact formats, every bad-input case, and the real files."""

import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import LightningModule, Trainer

from robusttrain import data
from robusttrain.data import (
    CIFAR10DataModule,
    DatasetError,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    ResumableDataLoader,
    datamodules,
    download,
    load_arrays,
    random_crop_flip,
    read_cifar_bin,
    read_cifar_python,
    read_idx,
)

IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


# ----- writers for the genuine formats ---------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic 0x0000 0x08 ndim, one big-endian uint32 per dimension, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=60, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(IDX_STEMS, [rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10,
                                  rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10]))
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def cifar_records(n, seed=0):
    """CIFAR-10 binary: per record one label byte, then 3072 pixel bytes (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    pixels = rng.integers(0, 256, (n, 3072))
    return labels, pixels, np.concatenate([labels[:, None], pixels], 1).astype(np.uint8).tobytes()


def write_cifar_bin(folder: Path, n_train_per_batch=4, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(n_train_per_batch, seed=i)[2])
    (folder / "test_batch.bin").write_bytes(cifar_records(n_test, seed=9)[2])


def with_spec(monkeypatch, dataset, **changes):
    spec = data.DATASETS[dataset]
    monkeypatch.setitem(data.DATASETS, dataset, data.DatasetSpec(**{**spec.__dict__, **changes}))


# ----- IDX -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", ndim=3)
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", ndim=1)
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, arrays["train-images-idx3-ubyte"])
    assert np.array_equal(labels, arrays["train-labels-idx1-ubyte"])


def test_idx_bad_inputs_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28)))
    bad_crc = bytearray(gzip.compress(good))
    bad_crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    cases = {
        "truncated.gz": (gzip.compress(good)[:-10], "truncated or corrupt gzip"),
        "crc.gz": (bytes(bad_crc), "truncated or corrupt gzip"),
        "magic": (b"\x12\x34" + good[2:], "not an IDX file"),
        "dtype": (good[:2] + b"\x0d" + good[3:], "dtype code 0x0d"),
        "short": (good[:-5], "truncated or corrupt"),
        "long": (good + b"\x00", "declares shape"),
        "header": (good[:9], "truncated IDX header"),
        "labels": (idx_bytes(np.zeros(3)), "magic 0x00000801.*expected 0x00000803"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DatasetError, match=message) as err:
            read_idx(path, ndim=3)
        assert str(path) in str(err.value), name
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "absent")


def test_label_out_of_range_shape_and_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(60, 11))))
    with pytest.raises(DatasetError, match="label 11 out of range 0..9") as err:
        load_arrays("mnist", tmp_path)
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(err.value)

    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7))))
    with pytest.raises(DatasetError, match="holds 20 images but .* holds 7 labels"):
        load_arrays("mnist", tmp_path)

    write_idx_set(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((20, 32, 32)))))
    with pytest.raises(DatasetError, match="expected 28x28") as err:
        load_arrays("mnist", tmp_path)
    assert "t10k-images" in str(err.value)


def test_missing_files_say_every_place_and_how_to_get_them(tmp_path, monkeypatch):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        load_arrays("mnist", tmp_path)
    message = str(err.value)
    for folder in (tmp_path, tmp_path / "MNIST/raw", tmp_path / "mnist"):
        assert str(folder) in message
    assert "lacks train-labels-idx1-ubyte, t10k-images" in message  # the half-filled folder
    assert "download=true" in message and "data_dir" in message

    assert data.DATASETS["fashion_mnist"].extra_dirs == (Path("/usr/share/datasets/fashion-mnist"),)
    debian = tmp_path / "debian"  # stands in for Debian's folder, which may exist on this machine
    with_spec(monkeypatch, "fashion_mnist", extra_dirs=(debian,))
    with pytest.raises(DatasetError) as err:
        load_arrays("fashion_mnist", tmp_path)
    message = str(err.value)
    assert str(debian) in message and str(tmp_path / "FashionMNIST/raw") in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=true" in message


@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "MNIST/raw", "FashionMNIST/raw",
                                    "debian"])
def test_layouts_found(tmp_path, monkeypatch, layout):
    dataset = "fashion_mnist" if layout in ("FashionMNIST/raw", "debian") else "mnist"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if layout == "debian":
        folder = tmp_path / "usr-share-datasets-fashion-mnist"
        with_spec(monkeypatch, "fashion_mnist", extra_dirs=(folder,))
    else:
        folder = data_dir / layout if "/" in layout else data_dir
    written = write_idx_set(folder, gz=layout != "flat-raw")
    arrays = load_arrays(dataset, data_dir)
    assert arrays["train_x"].shape == (60, 1, 28, 28) and arrays["test_x"].shape == (20, 1, 28, 28)
    assert np.array_equal(arrays["test_y"], written["t10k-labels-idx1-ubyte"])


def test_default_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTTRAIN_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    write_idx_set(tmp_path)
    assert load_arrays("mnist")["train_y"].shape == (60,)
    monkeypatch.delenv("ROBUSTTRAIN_DATA_DIR")
    assert data.default_data_dir() == Path("data")


def test_official_size_files_must_have_the_official_content(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path)
    raw = idx_bytes(arrays["t10k-labels-idx1-ubyte"])
    # pretend this small label file is the official one: same length, same md5 -> accepted
    with_spec(monkeypatch, "mnist", content_md5={"t10k-labels-idx1-ubyte": (len(raw),
                                                                            hashlib.md5(raw).hexdigest())})
    assert load_arrays("mnist", tmp_path)["test_y"].shape == (20,)
    # asked for as Fashion-MNIST, the MNIST file is recognised and refused
    with_spec(monkeypatch, "fashion_mnist", extra_dirs=())
    with pytest.raises(DatasetError, match="is the official MNIST file, not Fashion-MNIST") as err:
        load_arrays("fashion_mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)
    # one label changed to another valid label: the structure is fine, the content md5 is not
    changed = arrays["t10k-labels-idx1-ubyte"].copy()
    changed[3] = (changed[3] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(changed)))
    with pytest.raises(DatasetError, match="content md5 .* differs from the official MNIST") as err:
        load_arrays("mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value) and "get it again" in str(err.value)


# ----- CIFAR-10 --------------------------------------------------------------------------------
def test_cifar_binary_roundtrip_and_errors(tmp_path):
    labels, pixels, raw = cifar_records(7)
    (tmp_path / "b.bin").write_bytes(raw)
    x, y = read_cifar_bin(tmp_path / "b.bin")
    assert x.shape == (7, 3, 32, 32) and np.array_equal(y, labels)
    assert np.array_equal(x.reshape(7, -1), pixels)  # channel-major, row-major: as stored
    assert np.array_equal(x[2, 1, 0, :], pixels[2, 1024:1056])  # green plane, first row
    for name, content, message in [("short.bin", raw[:-1], "whole number of 3073-byte"),
                                   ("empty.bin", b"", "whole number of 3073-byte"),
                                   ("label.bin", bytes([10]) + raw[1:], "label 10 out of range")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match=message) as err:
            read_cifar_bin(tmp_path / name)
        assert name in str(err.value)


def test_cifar_python_batches_are_read(tmp_path):
    labels, pixels, _ = cifar_records(5)
    batch = {b"data": pixels.astype(np.uint8), b"labels": labels.tolist(), b"batch_label": b"x",
             b"filenames": [b"a.png"] * 5}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
        x, y = read_cifar_python(tmp_path / "data_batch_1")
        assert x.shape == (5, 3, 32, 32) and np.array_equal(y, labels)
        assert np.array_equal(x.reshape(5, -1), pixels)


class _RunsCommand:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsCommand(f"touch '{marker}'"), b"labels": []})
    (tmp_path / "evil").write_bytes(payload)
    with pytest.raises(DatasetError, match=r"refusing to load (posix|os|nt)\.system") as err:
        read_cifar_python(tmp_path / "evil")
    assert str(tmp_path / "evil") in str(err.value) and "get the official files" in str(err.value)
    assert not marker.exists()
    pickle.loads(payload)  # control: the payload is live, the plain unpickler runs it
    assert marker.exists()

    # other ways in: a global that could reach anything, and a corrupt stream
    (tmp_path / "getattr").write_bytes(pickle.dumps({b"data": getattr}))
    with pytest.raises(DatasetError, match="refusing to load builtins.getattr"):
        read_cifar_python(tmp_path / "getattr")
    (tmp_path / "cut").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-20])
    with pytest.raises(DatasetError, match="corrupt pickle") as err:
        read_cifar_python(tmp_path / "cut")
    assert "cut" in str(err.value)
    (tmp_path / "shape").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                   b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        read_cifar_python(tmp_path / "shape")


def test_cifar_layouts_binary_and_python(tmp_path):
    write_cifar_bin(tmp_path / "a" / "cifar-10-batches-bin")
    arrays = load_arrays("cifar10", tmp_path / "a")
    assert arrays["train_x"].shape == (20, 3, 32, 32) and arrays["test_x"].shape == (3, 3, 32, 32)
    assert np.array_equal(arrays["train_y"][:4], cifar_records(4, seed=1)[0])
    write_cifar_bin(tmp_path / "flat")
    assert load_arrays("cifar10", tmp_path / "flat")["train_y"].shape == (20,)
    python = tmp_path / "b" / "cifar-10-batches-py"
    python.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        labels, pixels, _ = cifar_records(n)
        (python / name).write_bytes(pickle.dumps({b"data": pixels.astype(np.uint8),
                                                  b"labels": labels.tolist()}, protocol=2))
    assert load_arrays("cifar10", tmp_path / "b")["train_y"].shape == (20,)
    with pytest.raises(DatasetError, match="CIFAR-10 files not found") as err:
        load_arrays("cifar10", tmp_path / "c")
    assert str(tmp_path / "c" / "cifar-10-batches-py") in str(err.value)
    assert "download=true" in str(err.value)


# ----- download --------------------------------------------------------------------------------
class FakeOpener:
    """Serves bytes from memory in place of the network, recording the URLs asked for."""

    def __init__(self, files: dict[str, bytes], down: tuple[str, ...] = ()):
        self.files, self.down, self.urls = files, down, []

    def __call__(self, url):
        self.urls.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in self.files or any(url.startswith(d) for d in self.down):
            raise OSError(f"HTTP Error 404: {url}")
        return io.BytesIO(self.files[name])


@pytest.fixture
def mnist_payloads(tmp_path, monkeypatch):
    """Small gzipped IDX files standing in for the official ones (their md5 made the published)."""
    write_idx_set(tmp_path / "src")
    payloads = {s + ".gz": (tmp_path / "src" / (s + ".gz")).read_bytes() for s in IDX_STEMS}
    with_spec(monkeypatch, "mnist", md5={n: hashlib.md5(b).hexdigest() for n, b in payloads.items()})
    return payloads


def test_download_checks_md5_and_writes_atomically(tmp_path, mnist_payloads):
    opener = FakeOpener(mnist_payloads)
    folder = download("mnist", tmp_path / "data", opener=opener)
    assert folder == tmp_path / "data" / "MNIST" / "raw"
    assert len(opener.urls) == 4
    assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in opener.urls)
    assert sorted(p.name for p in folder.iterdir()) == sorted(mnist_payloads)  # no .part left
    assert load_arrays("mnist", tmp_path / "data")["train_x"].shape == (60, 1, 28, 28)
    # files present: nothing is fetched again
    again = FakeOpener({})
    assert download("mnist", tmp_path / "data", opener=again) == folder and again.urls == []


def test_download_falls_back_to_the_second_mirror(tmp_path, mnist_payloads):
    opener = FakeOpener(mnist_payloads, down=("https://ossci-datasets",))
    download("mnist", tmp_path / "data", opener=opener)
    assert [u.split("/")[2] for u in opener.urls[:2]] == ["ossci-datasets.s3.amazonaws.com",
                                                          "yann.lecun.com"]
    assert len(list((tmp_path / "data" / "MNIST" / "raw").iterdir())) == 4


def test_download_checksum_mismatch_leaves_no_file(tmp_path, mnist_payloads):
    bad = {**mnist_payloads, "t10k-labels-idx1-ubyte.gz": b"garbage"}
    target = tmp_path / "data"
    with pytest.raises(DatasetError, match="does not match the published") as err:
        download("mnist", target, opener=FakeOpener(bad))
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "yann.lecun.com" in message  # both tried
    names = [p.name for p in (target / "MNIST" / "raw").iterdir()]
    assert not any("t10k-labels" in n for n in names)  # neither the file nor a .part
    assert not any(n.endswith(".part") for n in names)


def test_download_through_urllib_from_file_urls(tmp_path, mnist_payloads, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, payload in mnist_payloads.items():
        (mirror / name).write_bytes(payload)
    with_spec(monkeypatch, "mnist", mirrors=(mirror.as_uri() + "/",))
    folder = download("mnist", tmp_path / "data")  # the default opener, urllib
    assert all((folder / n).read_bytes() == p for n, p in mnist_payloads.items())
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(DatasetError, match="does not match the published"):
        download("mnist", tmp_path / "other")
    assert not (tmp_path / "other" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").exists()


def test_download_cifar_extracts_only_the_batch_files(tmp_path, monkeypatch):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"cifar-10-batches-bin/{n}" for n in names] + ["../../escape.bin",
                                                                      "/tmp/absolute.bin"]:
            content = cifar_records(2)[2]
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("cifar-10-batches-bin/readme.html")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = buf.getvalue()
    with_spec(monkeypatch, "cifar10",
              md5={"cifar-10-binary.tar.gz": hashlib.md5(archive).hexdigest()})
    folder = download("cifar10", tmp_path / "d", opener=FakeOpener(
        {"cifar-10-binary.tar.gz": archive}))
    assert folder == tmp_path / "d" / "cifar-10-batches-bin"
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["cifar-10-batches-bin"]
    assert not (tmp_path / "escape.bin").exists()
    assert load_arrays("cifar10", tmp_path / "d")["train_y"].shape == (10,)
    with pytest.raises(DatasetError, match="does not match the published"):
        download("cifar10", tmp_path / "e", opener=FakeOpener({"cifar-10-binary.tar.gz": b"x"}))
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").rglob("*"))


# ----- the DataModule --------------------------------------------------------------------------
def small_module(tmp_path, **kw):
    write_idx_set(tmp_path, n_train=100, n_test=30)
    return ImageDataModule("mnist", data_dir=str(tmp_path), val_size=kw.pop("val_size", 20), **kw)


def pixel_keys(x: torch.Tensor) -> set:
    return {bytes(row.numpy().tobytes()) for row in x}


def test_split_sizes_disjoint_and_seeded(tmp_path):
    dm = small_module(tmp_path)
    dm.setup()
    assert (len(dm.train_y), len(dm.val_y), len(dm.test_y)) == (80, 20, 30)
    assert dm.train_x.dtype == torch.float32 and dm.train_y.dtype == torch.int64
    assert dm.train_x.shape[1:] == (1, 28, 28)
    train, val = pixel_keys(dm.train_x), pixel_keys(dm.val_x)
    assert len(train) == 80 and len(val) == 20 and not train & val  # disjoint, nothing repeated
    again = small_module(tmp_path)
    again.setup()
    other = small_module(tmp_path, split_seed=1)
    other.setup()
    assert torch.equal(again.val_x, dm.val_x) and torch.equal(again.train_y, dm.train_y)
    assert pixel_keys(other.val_x) != val and pixel_keys(other.val_x) | pixel_keys(
        other.train_x) == train | val  # another split of the same images
    sub = small_module(tmp_path, train_subset=10)
    sub.setup()
    assert torch.equal(sub.train_x, dm.train_x[:10]) and torch.equal(sub.val_x, dm.val_x)


def test_no_validation_split(tmp_path):
    dm = small_module(tmp_path, val_size=0)
    dm.setup()
    assert len(dm.train_y) == 100 and len(dm.val_y) == 0 and dm.val_x.shape == (0, 1, 28, 28)
    assert dm.val_dataloader() == []


def test_setup_reads_the_files_once(tmp_path, monkeypatch):
    dm = small_module(tmp_path)
    calls = []
    real = data.load_arrays
    monkeypatch.setattr(datamodules, "load_arrays", lambda *a: calls.append(a) or real(*a))
    dm.setup("fit")
    dm.setup("test")
    assert len(calls) == 1


def test_loaders_give_whole_batches_and_shuffle_by_epoch(tmp_path):
    dm = small_module(tmp_path, batch_size=32, eval_batch_size=25)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader)
    shapes = [x.shape for x, _ in loader]
    assert shapes == [(32, 1, 28, 28), (32, 1, 28, 28), (16, 1, 28, 28)]  # drop_last=False
    first = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(dm.train_y.tolist())  # a permutation
    assert not torch.equal(first, dm.train_y)  # shuffled
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in loader]))
    val = [(x.shape, y) for x, y in dm.val_dataloader()]
    assert [s for s, _ in val] == [(20, 1, 28, 28)] and torch.equal(val[0][1], dm.val_y)
    test = list(dm.test_dataloader())
    assert [len(y) for _, y in test] == [25, 5]
    assert torch.equal(torch.cat([x for x, _ in test]), dm.test_x)  # in order


def test_training_loader_shards_under_a_distributed_sampler(tmp_path):
    # what Lightning does under DDP: the custom sampler is wrapped in DistributedSamplerWrapper
    dm = small_module(tmp_path, batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()
    orders = {}
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank,
                                                shuffle=False)
            sampler.set_epoch(epoch)
            shard = torch.utils.data.DataLoader(loader.dataset, batch_size=16, sampler=sampler,
                                                collate_fn=loader.collate_fn)
            seen.append(torch.cat([y for _, y in shard]))
        assert sorted(torch.cat(seen).tolist()) == sorted(dm.train_y.tolist())  # a partition
        orders[epoch] = seen[0]
    assert not torch.equal(orders[0], orders[1])  # set_epoch reaches the inner sampler


def _labels(batches):
    return [y.tolist() for _, y in batches]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_loader_resumes_in_the_middle_of_an_epoch(tmp_path, num_workers):
    dm = small_module(tmp_path, batch_size=8, num_workers=num_workers)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(3)
    full = _labels(loader)
    assert len(full) == 10
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(4)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 4}

    fresh = dm.train_dataloader()  # a new process: nothing but the state
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)  # Lightning sets the epoch after loading the state
    assert _labels(seen) + _labels(fresh) == full
    assert fresh.state_dict() == {"epoch": 3, "batches": 10}
    assert _labels(fresh) == full  # the skip applies once

    other_epoch = dm.train_dataloader()  # a state of another epoch is not applied
    other_epoch.load_state_dict({"epoch": 2, "batches": 4})
    other_epoch.sampler.set_epoch(3)
    assert _labels(other_epoch) == full
    ended = dm.train_dataloader()  # an epoch that had ended yields nothing more
    ended.load_state_dict({"epoch": 3, "batches": 10})
    ended.sampler.set_epoch(3)
    assert _labels(ended) == []


def test_training_loader_resumes_each_rank_under_a_distributed_sampler(tmp_path):
    dm = small_module(tmp_path, batch_size=8)
    dm.setup()
    base = dm.train_dataloader()

    def shard(rank):
        sampler = DistributedSamplerWrapper(base.sampler, num_replicas=2, rank=rank, shuffle=False)
        sampler.set_epoch(1)
        return ResumableDataLoader(base.dataset, batch_size=8, sampler=sampler,
                                   collate_fn=base.collate_fn)

    for rank in (0, 1):
        full = _labels(shard(rank))
        loader = shard(rank)
        iterator = iter(loader)
        head = [next(iterator) for _ in range(2)]
        resumed = shard(rank)
        resumed.load_state_dict(loader.state_dict())
        assert loader.state_dict() == {"epoch": 1, "batches": 2}
        assert _labels(head) + _labels(resumed) == full


@pytest.mark.parametrize("state", [{}, {"epoch": 0}, {"epoch": 0, "batches": "x"},
                                   {"epoch": 0, "batches": -1}])
def test_training_loader_rejects_a_foreign_state(tmp_path, state):
    dm = small_module(tmp_path)
    dm.setup()
    with pytest.raises(ValueError, match="ResumableDataLoader state|batches yielded"):
        dm.train_dataloader().load_state_dict(state)


def test_augmentation_is_a_function_of_the_batch_position(tmp_path):
    dm = small_module(tmp_path, augment=True)
    dm.setup()
    x = dm.train_x[:16]

    def trainer_at(epoch, batch, rank=0):
        progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
        return SimpleNamespace(training=True, current_epoch=epoch, global_rank=rank,
                               fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                   batch_progress=progress)))

    def augmented(*position):
        dm.trainer = trainer_at(*position)
        return dm.on_after_batch_transfer((x, dm.train_y[:16]), 0)[0]

    assert torch.equal(augmented(2, 5), augmented(2, 5))
    for other in [(2, 6), (3, 5), (2, 5, 1)]:
        assert not torch.equal(augmented(2, 5), augmented(*other)), other


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        ImageDataModule("svhn")
    for kwargs, message in [({"batch_size": 0}, "batch_size must be an integer >= 1"),
                            ({"val_size": -1}, "val_size must be an integer >= 0"),
                            ({"train_subset": 0}, "train_subset must be null"),
                            ({"augment": "yes"}, "augment must be"),
                            ({"num_workers": 1.5}, "num_workers must be")]:
        with pytest.raises(ValueError, match=message):
            ImageDataModule("mnist", **kwargs)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), val_size=1000)
    write_idx_set(tmp_path)
    with pytest.raises(ValueError, match="lower val_size"):
        dm.setup()
    with pytest.raises(DatasetError, match="MNIST files not found"):
        ImageDataModule("mnist", data_dir=str(tmp_path / "nothing")).setup()


def test_subclasses_fix_the_dataset_and_describe_it_before_setup():
    assert (MNISTDataModule.input_shape, MNISTDataModule.num_classes) == ((1, 28, 28), 10)
    assert CIFAR10DataModule.input_shape == (3, 32, 32)
    assert FashionMNISTDataModule.class_names[9] == "Ankle boot"
    dm = CIFAR10DataModule(batch_size=7)
    assert dm.hparams.dataset == "cifar10" and dm.augment and dm.num_classes == 10
    rebuilt = ImageDataModule(**dict(dm.hparams))  # what a checkpoint's hyperparameters allow
    assert rebuilt.hparams == dm.hparams and rebuilt.input_shape == (3, 32, 32)
    assert not FashionMNISTDataModule().augment and MNISTDataModule(augment=True).augment


# ----- augmentation ----------------------------------------------------------------------------
def crops_of(image: torch.Tensor, padding: int, fill: torch.Tensor):
    """Every (dy, dx, flip) crop of one padded image, by slicing: the reference."""
    c, h, w = image.shape
    padded = fill.view(-1, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding : padding + h, padding : padding + w] = image
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop.flip(-1)


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_flip(x, padding=4, fill=fill.tolist(), generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(6):
        matches = [k for k, crop in crops_of(x[i], 4, fill) if torch.equal(crop, out[i])]
        assert len(matches) == 1, f"image {i}: {len(matches)} matching crops"


def test_random_crop_flip_draws_every_offset_and_flip():
    # 4000 images, 9 x 9 offsets x 2 flips = 162 equally likely outcomes: the chance that a given
    # one never appears is (161/162)^4000 < 2e-11, so a missing one (chance < 162 * 2e-11) is a bug.
    h = w = 8
    padding = 4
    # pixel (r, c) holds 1 + r * w + c, so any image pixel in a crop tells where it came from; an
    # 8x8 window on an 8x8 image padded by 4 always overlaps it by at least 4x4 pixels
    code = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
    out = random_crop_flip(code.expand(4000, 1, h, w), padding=padding,
                           generator=torch.Generator().manual_seed(1))
    seen = set()
    for image in out[:, 0]:
        r, c = image.nonzero()[0].tolist()
        src_r, src_c = divmod(int(image[r, c].item()) - 1, w)
        row = image[r][image[r] != 0]
        flip = len(row) > 1 and bool(row[0] > row[1])
        # unflipped: out[r, c] = padded[r + dy, c + dx]; flipped: padded[r + dy, w - 1 - c + dx]
        dx = src_c + padding - (w - 1 - c if flip else c)
        seen.add((src_r + padding - r, dx, flip))
    assert len(seen) == 162, f"only {len(seen)} of 162 (offset, flip) outcomes drawn"
    assert all(0 <= dy <= 2 * padding and 0 <= dx <= 2 * padding for dy, dx, _ in seen)


def test_augmentation_only_while_training(tmp_path):
    dm = small_module(tmp_path, augment=True)
    dm.setup()
    batch = (dm.train_x[:8], dm.train_y[:8])
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # validating / testing
    dm.trainer = SimpleNamespace(training=True)
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == batch[0].shape and torch.equal(y, batch[1])
    assert not torch.equal(x, batch[0])
    # the padding is black: the normalized value of pixel 0
    black = (0 - dm.spec.mean[0]) / dm.spec.std[0]
    assert torch.isclose(x, torch.tensor(black)).any()
    dm.augment = False
    assert dm.on_after_batch_transfer(batch, 0) is batch


class _Recorder(LightningModule):
    """Records the batches its steps receive."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch[0].clone())
        return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("val_size", [0, 6])
def test_trainer_augments_training_batches_only(tmp_path, val_size):
    write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=val_size, batch_size=7,
                           eval_batch_size=100)
    model = _Recorder()
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    seen = torch.cat(model.train_batches)
    assert seen.shape == (20 - val_size, 3, 32, 32)
    # an image comes out unchanged with probability 1/162 (offset (4, 4), no flip): of 20, more
    # than 4 unchanged has probability C(20, 5) / 162^5 < 2e-7, while without augmentation all are
    unchanged = len(pixel_keys(seen) & pixel_keys(dm.train_x))
    assert unchanged <= 4, f"{unchanged} of {len(seen)} training images were not augmented"
    if val_size:
        assert torch.equal(torch.cat(model.val_batches), dm.val_x)  # validation untouched
    else:
        assert model.val_batches == []


# ----- the real files --------------------------------------------------------------------------
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_real_mnist(mnist_dir, real_arrays):
    arrays = real_arrays("mnist")
    assert arrays["train_x"].shape == (60000, 1, 28, 28)
    assert arrays["test_x"].shape == (10000, 1, 28, 28)
    assert np.bincount(arrays["train_y"], minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert arrays["test_y"].shape == (10000,) and arrays["train_x"].dtype == np.uint8
    for name, md5 in data.DATASETS["mnist"].md5.items():
        assert hashlib.md5((mnist_dir / "MNIST" / "raw" / name).read_bytes()).hexdigest() == md5


def test_real_mnist_flipped_label_and_mixup_are_caught(mnist_dir, tmp_path):
    source = mnist_dir / "MNIST" / "raw"
    labels = bytearray(gzip.decompress((source / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # still a valid label: only the md5 can tell
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for stem in IDX_STEMS:
        (folder / (stem + ".gz")).symlink_to(source / (stem + ".gz"))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(DatasetError, match="content md5 .* differs") as err:
        load_arrays("mnist", tmp_path)
    assert str(folder / "t10k-labels-idx1-ubyte") in str(err.value)
    # the real MNIST files, flat in data_dir, asked for as Fashion-MNIST
    shutil.copy(source / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    for stem in IDX_STEMS[:3]:
        (tmp_path / (stem + ".gz")).symlink_to(source / (stem + ".gz"))
    with pytest.raises(DatasetError, match="official MNIST file, not Fashion-MNIST"):
        load_arrays("fashion_mnist", tmp_path)


def test_real_cifar10(cifar10_dir, real_arrays):
    arrays = real_arrays("cifar10")
    assert arrays["train_x"].shape == (50000, 3, 32, 32)
    assert arrays["test_x"].shape == (10000, 3, 32, 32)
    assert np.bincount(arrays["train_y"]).tolist() == [5000] * 10
    assert np.bincount(arrays["test_y"]).tolist() == [1000] * 10


def test_real_fashion_mnist(fashion_dir, real_arrays):
    arrays = real_arrays("fashion_mnist")
    assert arrays["train_x"].shape == (60000, 1, 28, 28)
    assert arrays["test_x"].shape == (10000, 1, 28, 28)
    assert np.bincount(arrays["train_y"]).tolist() == [6000] * 10
    assert np.bincount(arrays["test_y"]).tolist() == [1000] * 10


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_normalization_constants_match_the_real_training_files(dataset, real_arrays):
    # the constants are the training pixels' per-channel mean and (population) std rounded to
    # 4 digits, so each recomputed value is within 0.5e-4 of it (+ float64 summation error)
    x = real_arrays(dataset)["train_x"]
    spec = data.DATASETS[dataset]
    for channel in range(x.shape[1]):
        pixels = x[:, channel].astype(np.float64) / 255
        assert abs(pixels.mean() - spec.mean[channel]) <= 0.5e-4 + 1e-9
        assert abs(pixels.std() - spec.std[channel]) <= 0.5e-4 + 1e-9


def test_real_training_data_is_normalized(fashion_dir):
    # val_size=0 keeps all 60,000 training images, so the normalized mean and std differ from 0
    # and 1 only through the 4-digit rounding of the constants: |mean| <= 0.5e-4 / std_c and
    # |std - 1| <= 0.5e-4 / std_c (std_c = 0.3530, bound 1.42e-4), plus float32 summation error
    # (torch's cascade sum over 4.7e7 values: ~1e-6 relative); tolerance 1.42e-4 + 1e-5.
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=0)
    dm.setup()
    tolerance = 0.5e-4 / data.DATASETS["fashion_mnist"].std[0] + 1e-5
    assert abs(dm.train_x.mean().item()) <= tolerance
    assert abs(dm.train_x.std().item() - 1) <= tolerance
    assert dm.train_x.shape == (60000, 1, 28, 28) and dm.test_x.shape == (10000, 1, 28, 28)
