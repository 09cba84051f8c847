"""
Tests for data.py: MNIST and CIFAR-10 loading (the real MNIST when this checkout has it,
else tiny fake files in the official formats), image folders, checksums, downloads, batches
and image grids. Run with: python -m pytest -q test_data.py

None of them touches the network: an autouse fixture points every download URL at a
file:// path that does not exist, and the download tests serve files from tmp_path.
"""

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError

REPO = Path(__file__).resolve().parent
# the real MNIST, for the tests that need it (here and in test_train.py, test_generate.py): the
# folder $ACDIT_MNIST_DIR names, else the path below; the four files, .gz or not
MNIST_DIR = Path(os.environ.get('ACDIT_MNIST_DIR') or REPO.parent / 'shared' / 'data' / 'mnist')
ALL_MNIST = [n for pair in data.MNIST_FILES.values() for n in pair]
have_real_mnist = all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + '.gz')).exists() for n in ALL_MNIST)
NO_MNIST = f'real MNIST not found in {MNIST_DIR}: set ACDIT_MNIST_DIR to a folder with its four files to run this'
needs_real_mnist = pytest.mark.skipif(not have_real_mnist, reason=NO_MNIST)


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Make any download attempt fail at once, locally, instead of reaching the internet."""
    nowhere = (tmp_path / 'no-such-mirror').as_uri()
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [nowhere + '/'])
    monkeypatch.setattr(data, 'CIFAR10_URLS', [nowhere + '/cifar-10-python.tar.gz'])


# -----------------------------------------------------------------------------
# helpers that write tiny datasets in the official formats

def idx_bytes(array):
    """Encode a uint8 array in the idx format, the way the MNIST files are written."""
    header = struct.pack('>I', 0x0800 | array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(directory, monkeypatch, gz=True, n={'train': 5, 'test': 3}):
    """Write a tiny MNIST (random 28x28 digits) into directory and make data.py expect
    its checksums. Returns {split: (images, labels)} as numpy arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (images_name, labels_name) in data.MNIST_FILES.items():
        images = rng.integers(0, 256, (n[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n[split],), dtype=np.uint8)
        for name, array in ((images_name, images), (labels_name, labels)):
            raw = idx_bytes(array)
            monkeypatch.setitem(data.CHECKSUMS, name, ('sha256', hashlib.sha256(raw).hexdigest()))
            if gz:
                (directory / (name + '.gz')).write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
        arrays[split] = (images, labels)
    return arrays


def cifar_batch(rng, n):
    return {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b'labels': [int(v) for v in rng.integers(0, 10, n)],
            b'batch_label': b'fake'}


def write_fake_cifar(path, batches, extra_members=()):
    """Write a cifar-10-python.tar.gz with the given {name: pickled dict} batches, in the
    order given, in the official cifar-10-batches-py/ folder."""
    with tarfile.open(path, 'w:gz') as tar:
        for name, obj in list(batches.items()) + list(extra_members):
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# MNIST: the real files

def test_the_real_mnist_is_where_ACDIT_MNIST_DIR_says(tmp_path):
    """A fresh clone runs the tests on its own MNIST copy: ACDIT_MNIST_DIR names it, and without it
    a skip says how to enable them."""
    for name in ALL_MNIST:
        (tmp_path / (name + '.gz')).touch()
    code = ('import importlib, os, test_data as t; print(t.MNIST_DIR, t.have_real_mnist); '
            'os.environ["ACDIT_MNIST_DIR"] = "nowhere"; importlib.reload(t); print(t.have_real_mnist, t.NO_MNIST)')
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ACDIT_MNIST_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f'{tmp_path} True', 'False real MNIST not found in nowhere: set ACDIT_MNIST_DIR '
                                                         'to a folder with its four files to run this']


@needs_real_mnist
def test_real_mnist_loads():
    images, labels = data.load_dataset('mnist', str(MNIST_DIR), 'train')
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).min() > 5000  # every digit is well represented
    assert images.min() == 0 and images.max() == 255
    assert labels[0] == 5  # the well-known first training digit
    images, labels = data.load_dataset('mnist', str(MNIST_DIR), 'test')
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert labels[0] == 7  # the well-known first test digit


@needs_real_mnist
def test_real_mnist_decompressed_copy_is_identical(tmp_path):
    for name in ALL_MNIST:
        src = MNIST_DIR / (name + '.gz')
        if not src.exists():
            pytest.skip(f'{src} not present as .gz')
        (tmp_path / name).write_bytes(gzip.decompress(src.read_bytes()))
    for split in ('train', 'test'):
        a = data.load_dataset('mnist', str(MNIST_DIR), split)
        b = data.load_dataset('mnist', str(tmp_path), split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_real_mnist
def test_real_mnist_prints_what_it_loaded(capsys):
    data.load_dataset('mnist', str(MNIST_DIR), 'train')
    assert f'loaded mnist train: 60000 images 28x28x1 from {MNIST_DIR}{os.sep}\n' in capsys.readouterr().out


# -----------------------------------------------------------------------------
# MNIST: tiny fake files

@pytest.mark.parametrize('gz', [True, False])
def test_fake_mnist_loads(tmp_path, monkeypatch, capsys, gz):
    arrays = write_fake_mnist(tmp_path, monkeypatch, gz=gz)
    for split, (want_images, want_labels) in arrays.items():
        images, labels = data.load_dataset('mnist', str(tmp_path), split)
        assert images.shape == (len(want_images), 1, 28, 28) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64
        assert np.array_equal(images[:, 0].numpy(), want_images)
        assert np.array_equal(labels.numpy(), want_labels)
    assert f'loaded mnist test: 3 images 28x28x1 from {tmp_path}' in capsys.readouterr().out


def test_mnist_mixed_raw_and_gz(tmp_path, monkeypatch):
    """Some files decompressed, some not: each is found in whichever form it is."""
    arrays = write_fake_mnist(tmp_path, monkeypatch, gz=True)
    name = 'train-images-idx3-ubyte'
    (tmp_path / name).write_bytes(gzip.decompress((tmp_path / (name + '.gz')).read_bytes()))
    (tmp_path / (name + '.gz')).unlink()
    images, _ = data.load_dataset('mnist', str(tmp_path), 'train')
    assert np.array_equal(images[:, 0].numpy(), arrays['train'][0])


def test_mnist_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    monkeypatch.setitem(data.CHECKSUMS, 'train-labels-idx1-ubyte', ('sha256', '0' * 64))
    with pytest.raises(DataError) as e:
        data.load_dataset('mnist', str(tmp_path), 'train')
    msg = str(e.value)
    assert 'train-labels-idx1-ubyte.gz' in msg and '0' * 64 in msg and 'Delete it' in msg
    actual = hashlib.sha256(gzip.decompress((tmp_path / 'train-labels-idx1-ubyte.gz').read_bytes())).hexdigest()
    assert actual in msg
    assert (tmp_path / 'train-labels-idx1-ubyte.gz').exists()  # reported, not silently deleted or replaced


def test_mnist_corrupted_raw_file_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    path = tmp_path / 't10k-images-idx3-ubyte'
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # one flipped pixel: still a perfectly parseable idx file
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match='t10k-images-idx3-ubyte is corrupt'):
        data.load_dataset('mnist', str(tmp_path), 'test')


def test_mnist_bad_gzip_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(b'this is not gzip data')
    with pytest.raises(DataError, match='t10k-labels-idx1-ubyte.gz is not a valid gzip file'):
        data.load_dataset('mnist', str(tmp_path), 'test')


def test_mnist_bad_magic_number(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    # a labels-style header (1-d) in the images file, with a checksum that matches it,
    # so it is the parser that must notice
    bad = idx_bytes(np.zeros(3 * 28 * 28, dtype=np.uint8))
    (tmp_path / 't10k-images-idx3-ubyte').write_bytes(bad)
    monkeypatch.setitem(data.CHECKSUMS, 't10k-images-idx3-ubyte', ('sha256', hashlib.sha256(bad).hexdigest()))
    with pytest.raises(DataError, match=r't10k-images-idx3-ubyte: not an idx file.*0x801.*expected 0x803'):
        data.load_dataset('mnist', str(tmp_path), 'test')


def test_parse_idx_checks_size():
    raw = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data.parse_idx(raw, 'x', 3).shape == (2, 28, 28)
    with pytest.raises(DataError, match=r'x: header says 2x28x28 = 1568 values but the file has 1567'):
        data.parse_idx(raw[:-1], 'x', 3)
    with pytest.raises(DataError, match='magic number missing'):
        data.parse_idx(b'\x00\x00', 'x', 3)
    with pytest.raises(DataError, match='not an idx file'):  # right magic, header cut short
        data.parse_idx(raw[:8], 'x', 3)


def test_mnist_image_label_count_mismatch(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    labels = idx_bytes(np.zeros(4, dtype=np.uint8))  # 4 labels for 3 test images
    (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(labels)
    monkeypatch.setitem(data.CHECKSUMS, 't10k-labels-idx1-ubyte', ('sha256', hashlib.sha256(labels).hexdigest()))
    with pytest.raises(DataError, match='has 3 images but t10k-labels-idx1-ubyte has 4 labels'):
        data.load_dataset('mnist', str(tmp_path), 'test')


# -----------------------------------------------------------------------------
# downloads (served from tmp_path through file:// URLs, never the network)

def test_download_failure_names_file_and_directory(tmp_path):
    data_dir = tmp_path / 'data' / 'mnist'
    with pytest.raises(DataError) as e:
        data.load_dataset('mnist', str(data_dir), 'train')
    msg = str(e.value)
    assert 'could not download train-images-idx3-ubyte.gz' in msg
    assert f'in the directory {data_dir}' in msg and 'train-labels-idx1-ubyte.gz' in msg
    assert '--data_dir' in msg  # ...and how to point at files that are elsewhere
    # the directories it made for the download are gone again, the ones that existed stay
    assert list(tmp_path.iterdir()) == []
    data_dir.mkdir(parents=True)
    with pytest.raises(DataError):
        data.load_dataset('mnist', str(data_dir), 'train')
    assert data_dir.is_dir() and list(data_dir.iterdir()) == []  # no half-downloaded leftovers


def test_download_function_raising(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError('network is unreachable')
    monkeypatch.setattr(data, 'download', offline)
    with pytest.raises(DataError) as e:
        data.load_dataset('cifar10', str(tmp_path), 'train')
    msg = str(e.value)
    assert 'network is unreachable' in msg and 'cifar-10-python.tar.gz' in msg and str(tmp_path) in msg
    assert '--data_dir' in msg
    assert list(tmp_path.iterdir()) == []
    # nested directories that did not exist are all removed again
    with pytest.raises(DataError):
        data.load_dataset('cifar10', str(tmp_path / 'a' / 'b' / 'cifar10'), 'train')
    assert list(tmp_path.iterdir()) == []


def test_every_mirror_is_tried(tmp_path, monkeypatch):
    tried = []

    def offline(url, path):
        tried.append(url)
        raise OSError(f'down: {url}')
    monkeypatch.setattr(data, 'download', offline)
    monkeypatch.setattr(data, 'MNIST_MIRRORS', ['https://a.invalid/', 'https://b.invalid/'])
    with pytest.raises(DataError) as e:
        data.load_dataset('mnist', str(tmp_path / 'data'), 'test')
    assert tried == ['https://a.invalid/t10k-images-idx3-ubyte.gz', 'https://b.invalid/t10k-images-idx3-ubyte.gz']
    assert 'down: https://a.invalid/' in str(e.value) and 'down: https://b.invalid/' in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_goes_to_a_temp_file_in_the_destination_directory(tmp_path, monkeypatch):
    """The download is written beside its destination under another name and only renamed
    into place once verified, so an interrupted download never leaves a partial file."""
    write_fake_mnist(tmp_path / 'mirror', monkeypatch)
    data_dir = tmp_path / 'data'
    seen = []

    def fake_download(url, path):
        name = url.rsplit('/', 1)[-1]
        seen.append((Path(path), (data_dir / name).exists()))
        Path(path).write_bytes((tmp_path / 'mirror' / name).read_bytes())
    monkeypatch.setattr(data, 'download', fake_download)
    data.load_dataset('mnist', str(data_dir), 'test')
    assert len(seen) == 2
    for tmp, dest_existed in seen:
        assert tmp.parent == data_dir and not tmp.name.endswith('.gz') and not dest_existed
    assert sorted(p.name for p in data_dir.iterdir()) == ['t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']


def test_download_from_second_mirror(tmp_path, monkeypatch, capsys):
    """The first mirror is down, the second serves the files: they are fetched, checked
    and kept, so the next load reads them from disk without downloading."""
    arrays = write_fake_mnist(tmp_path / 'mirror', monkeypatch)
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [(tmp_path / 'down').as_uri() + '/',
                                                (tmp_path / 'mirror').as_uri() + '/'])
    data_dir = tmp_path / 'data'
    images, labels = data.load_dataset('mnist', str(data_dir), 'test')
    assert np.array_equal(labels.numpy(), arrays['test'][1])
    assert sorted(p.name for p in data_dir.iterdir()) == ['t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    assert 'downloading' in capsys.readouterr().out
    data.load_dataset('mnist', str(data_dir), 'test')
    assert 'downloading' not in capsys.readouterr().out


def test_download_with_wrong_checksum_is_not_kept(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / 'mirror', monkeypatch)
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [(tmp_path / 'mirror').as_uri() + '/'])
    monkeypatch.setitem(data.CHECKSUMS, 't10k-images-idx3-ubyte', ('sha256', 'f' * 64))
    data_dir = tmp_path / 'data'
    with pytest.raises(DataError, match='could not download t10k-images-idx3-ubyte.gz.*corrupt'):
        data.load_dataset('mnist', str(data_dir), 'test')
    assert not data_dir.exists()  # nothing kept, not even the directory made for it


# -----------------------------------------------------------------------------
# CIFAR-10: a tiny archive in the official layout

@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    batches = {f'data_batch_{i}': cifar_batch(rng, 2) for i in range(1, 6)}
    batches['test_batch'] = cifar_batch(rng, 3)
    # one pixel with a distinct value per channel: row 1, column 2 of the first image
    first = batches['data_batch_1'][b'data'][0]
    first[:] = 0
    first[0 * 1024 + 1 * 32 + 2] = 11  # red
    first[1 * 1024 + 1 * 32 + 2] = 22  # green
    first[2 * 1024 + 1 * 32 + 2] = 33  # blue
    # shuffled member order and unrelated members, as a real archive may have
    order = ['test_batch', 'data_batch_3', 'data_batch_1', 'data_batch_5', 'data_batch_2', 'data_batch_4']
    path = tmp_path / 'cifar-10-python.tar.gz'
    write_fake_cifar(path, {k: batches[k] for k in order},
                     extra_members=[('batches.meta', {b'label_names': [b'airplane'] * 10})])
    monkeypatch.setitem(data.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', md5(path)))
    return tmp_path, batches


def test_fake_cifar_loads(fake_cifar, capsys):
    data_dir, batches = fake_cifar
    images, labels = data.load_dataset('cifar10', str(data_dir), 'train')
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images[0, :, 1, 2].tolist() == [11, 22, 33]  # channel-major rows: R, G, B planes
    assert images[0].sum() == 66  # ...and nothing else set (a wrong reshape would move them)
    names = [f'data_batch_{i}' for i in range(1, 6)]  # in numeric order, not archive order
    assert labels.tolist() == [label for n in names for label in batches[n][b'labels']]
    want = np.concatenate([batches[n][b'data'] for n in names]).reshape(10, 3, 32, 32)
    assert np.array_equal(images.numpy(), want)
    images, labels = data.load_dataset('cifar10', str(data_dir), 'test')
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == batches['test_batch'][b'labels']
    assert 'loaded cifar10 test: 3 images 32x32x3' in capsys.readouterr().out


def test_cifar_wrong_md5_is_rejected(fake_cifar, monkeypatch):
    data_dir, _ = fake_cifar
    actual = md5(data_dir / 'cifar-10-python.tar.gz')
    monkeypatch.setitem(data.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', 'a' * 32))
    with pytest.raises(DataError) as e:
        data.load_dataset('cifar10', str(data_dir), 'train')
    assert 'cifar-10-python.tar.gz is corrupt' in str(e.value) and actual in str(e.value) and 'a' * 32 in str(e.value)


class MakesDirectory:
    """Unpickling this calls os.mkdir(path): a harmless stand-in for a malicious pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_cifar_is_not_unpickled_before_its_md5_passed(tmp_path):
    marker = tmp_path / 'pickle-ran'
    payload = MakesDirectory(str(marker))
    pickle.loads(pickle.dumps(payload))  # the payload does run when unpickled...
    assert marker.is_dir()
    marker.rmdir()
    write_fake_cifar(tmp_path / 'cifar-10-python.tar.gz', {'test_batch': payload})
    with pytest.raises(DataError, match='cifar-10-python.tar.gz is corrupt'):  # the real md5 is expected
        data.load_dataset('cifar10', str(tmp_path), 'test')
    assert not marker.exists()  # ...but not from an archive that failed its md5


def test_cifar_download(fake_cifar, monkeypatch, capsys):
    """The archive is fetched from the second URL when the first fails, checked and kept."""
    mirror, batches = fake_cifar
    monkeypatch.setattr(data, 'CIFAR10_URLS', [(mirror / 'down.tar.gz').as_uri(),
                                               (mirror / 'cifar-10-python.tar.gz').as_uri()])
    data_dir = mirror / 'data'
    images, labels = data.load_dataset('cifar10', str(data_dir), 'test')
    assert labels.tolist() == batches['test_batch'][b'labels']
    assert [p.name for p in data_dir.iterdir()] == ['cifar-10-python.tar.gz']
    assert 'downloading' in capsys.readouterr().out
    monkeypatch.setitem(data.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', 'a' * 32))
    with pytest.raises(DataError, match='could not download cifar-10-python.tar.gz.*corrupt'):
        data.load_dataset('cifar10', str(mirror / 'other'), 'test')
    assert not (mirror / 'other').exists()


def test_cifar_missing_member(tmp_path, monkeypatch):
    path = tmp_path / 'cifar-10-python.tar.gz'
    write_fake_cifar(path, {'data_batch_1': cifar_batch(np.random.default_rng(0), 2)})
    monkeypatch.setitem(data.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', md5(path)))
    with pytest.raises(DataError, match='lacks cifar-10-batches-py/test_batch'):
        data.load_dataset('cifar10', str(tmp_path), 'test')


def test_cifar_batch_of_the_wrong_shape(tmp_path, monkeypatch):
    path = tmp_path / 'cifar-10-python.tar.gz'
    batch = cifar_batch(np.random.default_rng(0), 2)
    batch[b'labels'].append(0)  # 3 labels for 2 images
    write_fake_cifar(path, {'test_batch': batch})
    monkeypatch.setitem(data.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', md5(path)))
    with pytest.raises(DataError, match=r'test_batch has data of shape \(2, 3072\) and 3 labels'):
        data.load_dataset('cifar10', str(tmp_path), 'test')


def test_unknown_dataset_and_split(tmp_path):
    # load_dataset trusts its caller (train.py's choices check the name): an assert, not a message
    with pytest.raises(AssertionError):
        data.load_dataset('imagenet', str(tmp_path), 'train')
    with pytest.raises(AssertionError):
        data.load_dataset('mnist', str(tmp_path), 'val')
    assert list(tmp_path.iterdir()) == []  # rejected before any download


def test_dataset_shapes(tmp_path, monkeypatch, fake_cifar):
    assert data.DATASETS == ('mnist', 'cifar10', 'moving_mnist', 'folder')
    assert tuple(data.DATASET_SHAPES) == data.DATASETS[:3]  # a folder's shape comes from its images
    write_fake_mnist(tmp_path / 'mnist', monkeypatch)
    for name, data_dir in (('mnist', tmp_path / 'mnist'), ('cifar10', fake_cifar[0])):
        size, channels = data.DATASET_SHAPES[name]
        assert data.load_dataset(name, str(data_dir), 'test')[0].shape[1:] == (channels, size, size)


# -----------------------------------------------------------------------------
# your own images: data_dir/train/<class>/* (and test/<class>/*)

def write_folder(root, classes, n=3, size=(8, 8), mode='L', ext='.png'):
    """root/<class>/img<i><ext>: uniform images whose value encodes (class, i), so that every
    pixel says where it came from. Returns {class: [values]}."""
    values = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        values[name] = [40 * c + 10 * i + 5 for i in range(n)]
        for i, v in enumerate(values[name]):
            Image.new(mode, size, v if mode == 'L' else (v, 255 - v, v // 2)).save(root / name / f'img{i}{ext}')
    return values


@pytest.mark.parametrize('name', ['cifar10', 'mnist'])
def test_a_dataset_pointed_at_class_folders_says_to_use_folder(tmp_path, monkeypatch, name):
    """Images in class folders read as --dataset=cifar10 (or mnist): one line pointing at folder, and
    no download into the image folder."""
    write_folder(tmp_path / 'train', ['cat', 'dog'])
    monkeypatch.setattr(data, 'download', lambda url, path: pytest.fail('downloaded'))
    with pytest.raises(DataError, match='--dataset=folder'):
        data.load_dataset(name, str(tmp_path), 'train')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['train']


def test_folder_labels_are_the_sorted_class_names(tmp_path, capsys):
    want = write_folder(tmp_path / 'train', ['cat', 'ant', 'bee'])
    want_test = write_folder(tmp_path / 'test', ['bee', 'ant'], n=1)  # a test split may lack classes
    (tmp_path / 'train' / '.cache').mkdir()
    (tmp_path / 'test' / '.cache').mkdir()                          # hidden folders are no classes
    images, labels = data.load_dataset('folder', str(tmp_path), 'train')
    assert images.dtype == torch.uint8 and images.shape == (9, 1, 8, 8)  # gray PNGs: one channel
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]            # ant, bee, cat
    assert images[:, 0, 0, 0].tolist() == want['ant'] + want['bee'] + want['cat']
    assert (images == images[:, :, :1, :1]).all()                    # lossless PNGs, pixel for pixel
    assert 'loaded folder train: 9 images 8x8x1' in capsys.readouterr().out
    images, labels = data.load_dataset('folder', str(tmp_path), 'test')
    assert labels.tolist() == [0, 1] and images[:, 0, 0, 0].tolist() == [want_test['ant'][0], want_test['bee'][0]]


def test_class_names_are_digits_cifar10s_or_the_sorted_folders(tmp_path):
    write_folder(tmp_path / 'train', ['cat', 'ant', 'bee'])
    assert data.class_names('folder', str(tmp_path)) == ['ant', 'bee', 'cat']   # labels 0, 1, 2 above
    assert data.class_names('mnist', 'anywhere') == data.class_names('moving_mnist', '') == list('0123456789')
    assert data.class_names('cifar10', '') == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                               'horse', 'ship', 'truck']   # the order of the archive's labels


def test_folder_colour_and_channels(tmp_path):
    write_folder(tmp_path / 'train', ['a'], mode='RGB')
    write_folder(tmp_path / 'train', ['b'], mode='L')
    (tmp_path / 'test').mkdir()                                      # all of train/ trains
    images, _ = data.load_dataset('folder', str(tmp_path), 'train')
    assert images.shape == (6, 3, 8, 8)                              # one colour image: all RGB
    assert images[0, :, 0, 0].tolist() == [5, 250, 2]
    assert images[3, :, 0, 0].tolist() == [5, 5, 5]                  # gray as RGB: three equal values
    gray, _ = data.load_dataset('folder', str(tmp_path), 'train', channels=1)
    assert gray.shape == (6, 1, 8, 8) and gray[3, 0, 0, 0] == 5
    # ITU-R 601 luma, which Pillow's RGB -> L uses: L = (299 R + 587 G + 114 B) / 1000
    assert abs(int(gray[0, 0, 0, 0]) - (299 * 5 + 587 * 250 + 114 * 2) / 1000) <= 1


def test_folder_without_test_holds_out_a_seeded_share(tmp_path):
    write_folder(tmp_path / 'train', ['a', 'b'], n=10)
    (train, ty), (test, sy) = (data.load_dataset('folder', str(tmp_path), s) for s in ('train', 'test'))
    assert len(test) == round(data.FOLDER_TEST_SHARE * 20) == 2 and len(train) == 18
    seen = sorted(train[:, 0, 0, 0].tolist() + test[:, 0, 0, 0].tolist())
    assert seen == sorted(v + 40 * c for c in range(2) for v in range(5, 100, 10))  # disjoint, all used
    again, _ = data.load_dataset('folder', str(tmp_path), 'test')
    assert torch.equal(again, test)                                  # the same share every time


def test_folder_img_size_crops_the_centre_and_resizes(tmp_path):
    write_folder(tmp_path / 'train', ['a', 'b'], n=1, size=(12, 8))  # landscape
    img = Image.new('L', (12, 8), 0)
    img.paste(200, (2, 0, 10, 8))                                    # the central 8x8 square is 200
    img.save(tmp_path / 'train' / 'a' / 'img0.png')
    (tmp_path / 'test').mkdir()                                      # all of train/ trains
    images, _ = data.load_dataset('folder', str(tmp_path), 'train', img_size=8)
    assert images.shape == (2, 1, 8, 8) and (images[0] == 200).all()  # the central square, exactly
    images, _ = data.load_dataset('folder', str(tmp_path), 'train', img_size=4)
    assert images.shape == (2, 1, 4, 4) and (images[1] == 45).all()   # resized: uniform stays uniform


@pytest.mark.parametrize('case, message', [
    ('no train', 'no class folders'),
    ('empty train', 'no class folders'),
    ('one class', 'one class folder (a)'),
    ('empty class', 'no images'),
    ('unreadable', 'cannot read'),
    ('mixed sizes', '--img_size'),
    ('not square', '--img_size'),
    ('test class not in train', 'train/ lacks: c'),
])
def test_bad_folders_are_one_line_errors(tmp_path, case, message):
    if case != 'no train':
        (tmp_path / 'train').mkdir()
    if case not in ('no train', 'empty train'):
        write_folder(tmp_path / 'train', ['a'] if case == 'one class' else ['a', 'b'],
                     size=(8, 6) if case == 'not square' else (8, 8))
    if case == 'empty class':
        (tmp_path / 'train' / 'c').mkdir()
    if case == 'unreadable':
        (tmp_path / 'train' / 'b' / 'notes.txt').write_text('not an image')
    if case == 'mixed sizes':
        Image.new('L', (9, 9)).save(tmp_path / 'train' / 'b' / 'big.png')
    if case == 'test class not in train':
        write_folder(tmp_path / 'test', ['a', 'c'], n=1)
    before = sorted(tmp_path.rglob('*'))
    with pytest.raises(DataError) as e:
        data.load_dataset('folder', str(tmp_path), 'test' if case == 'test class not in train' else 'train')
    assert message in str(e.value) and '\n' not in str(e.value)
    if case == 'unreadable':
        assert str(tmp_path / 'train' / 'b' / 'notes.txt') in str(e.value)   # the file is named
    assert sorted(tmp_path.rglob('*')) == before                             # nothing written


def test_moving_mnist_is_made_from_the_mnist_digits_halved(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path, monkeypatch)
    digits, labels = data.load_dataset('moving_mnist', str(tmp_path), 'test')
    images, want_labels = arrays['test']
    assert digits.dtype == torch.uint8 and digits.shape == (3, 1, 14, 14)
    assert torch.equal(labels, torch.from_numpy(want_labels.astype(np.int64)))
    # pixel (r, c) of a halved digit is the mean of its 2x2 square in the original, rounded
    mean = images.reshape(3, 14, 2, 14, 2).astype(np.float64).mean((2, 4))
    assert np.abs(digits[:, 0].numpy() - mean).max() <= 0.5
    videos, y = data.moving_mnist_batch(digits, labels, 5, torch.Generator().manual_seed(0))
    size, channels = data.DATASET_SHAPES['moving_mnist']
    assert videos.shape == (5, data.VIDEO_FRAMES['moving_mnist'], channels, size, size)
    assert videos.dtype == torch.float32 and videos.min() >= -1 and videos.max() <= 1


def bouncing_path(start, velocity, frames, room):
    """A position bouncing between 0 and room, one frame at a time, from the definition."""
    path, p, v = [], start, velocity
    for _ in range(frames):
        path.append(p)
        p += v
        if p < 0:
            p, v = -p, -v
        if p > room:
            p, v = 2 * room - p, -v
    return path


def test_moving_mnist_digits_move_at_constant_velocity_and_bounce():
    # 14x14 white squares: a frame's digit is where its bright pixels begin
    digits = torch.full((200, 1, 14, 14), 255, dtype=torch.uint8)
    videos = data.moving_mnist(digits, torch.Generator().manual_seed(0), frames=20)
    assert videos.shape == (200, 20, 1, 32, 32)
    assert (videos.flatten(2).float().sum(-1) == 255 * 14 * 14).all()  # the whole digit, every frame
    bright = videos[:, :, 0] > 0
    top = bright.any(-1).float().argmax(-1)                         # (B, T) first bright row
    left = bright.any(-2).float().argmax(-1)
    speeds = set()
    for b in range(200):
        for axis in (top[b].tolist(), left[b].tolist()):
            fits = [v for v in range(-3, 4) if v and bouncing_path(axis[0], v, 20, 18) == axis]
            assert fits, f"video {b}: {axis} is no constant-velocity bouncing path"
            speeds.add(abs(fits[0]))
    assert speeds == {1, 2, 3}
    again = data.moving_mnist(digits, torch.Generator().manual_seed(0), frames=20)
    assert torch.equal(videos, again)  # seeded: reproducible
    assert not torch.equal(videos, data.moving_mnist(digits, torch.Generator().manual_seed(1), frames=20))


# -----------------------------------------------------------------------------
# batches

def test_pixel_conversion_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = data.to_float(pixels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(data.to_uint8(x), pixels)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


def test_get_batch_pairs_images_with_labels():
    # image i is filled with the value 20 * i and has label i, so pairing can be checked
    labels = torch.arange(10)
    images = (labels * 20).to(torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    x, y = data.get_batch(images, labels, 32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 4, 4) and x.dtype == torch.float32 and y.shape == (32,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(data.to_uint8(x), (y * 20).to(torch.uint8).view(32, 1, 1, 1).expand(32, 1, 4, 4))
    x2, y2 = data.get_batch(images, labels, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed, same batch
    _, y3 = data.get_batch(images, labels, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(y, y3)


def test_get_batch_hflip():
    images = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    images[..., 0] = 255  # a bright left column
    labels = torch.zeros(4, dtype=torch.int64)
    x, _ = data.get_batch(images, labels, 200, torch.Generator().manual_seed(0), hflip=True)
    left, right = (x[..., 0] == 1).all(dim=(1, 2)), (x[..., -1] == 1).all(dim=(1, 2))
    assert torch.all(left ^ right)  # every image is either as-is or exactly mirrored
    assert 60 < right.sum() < 140  # about half are mirrored
    x, _ = data.get_batch(images, labels, 200, torch.Generator().manual_seed(0), hflip=False)
    assert (x[..., 0] == 1).all()


# -----------------------------------------------------------------------------
# image grids

def test_save_grid(tmp_path):
    from PIL import Image
    x = torch.linspace(-1, 1, 5 * 3 * 4 * 6).view(5, 3, 4, 6)
    data.save_grid(x, tmp_path / 'rgb.png', nrow=3)
    with Image.open(tmp_path / 'rgb.png') as im:
        assert im.size == (3 * 6, 2 * 4) and im.mode == 'RGB'
        assert im.getpixel((6, 0)) == tuple(data.to_uint8(x[1, :, 0, 0]).tolist())  # 2nd image, top-left
    data.save_grid(torch.zeros(4, 1, 7, 7, dtype=torch.uint8), tmp_path / 'gray.png')
    with Image.open(tmp_path / 'gray.png') as im:
        assert im.size == (14, 14) and im.mode == 'L'


def test_the_log_is_a_csv_file_and_its_plot_a_png_drawn_at_evals(tmp_path):
    """write_log adds the last row to log.csv (a new file when asked, else at its end) and after an eval
    draws loss.png: a gray training curve, blue and red test curves, black axes."""
    from PIL import Image
    out, rows = tmp_path / 'out', []
    for it in range(10, 101, 10):
        rows.append(dict(iter=it, loss=1 / it, lr=1e-3, ms_per_step=12.5, elapsed_s=it / 10))
        if it in (50, 100):
            rows[-1].update(test_loss=0.2 * 50 / it, ema_test_loss=0.3 * 50 / it)
        data.write_log(str(out), rows, new=len(rows) == 1)
        assert (out / 'loss.png').exists() == (it >= 50)              # first drawn at the first eval
    lines = (out / 'log.csv').read_text().splitlines()
    assert lines[0] == 'iter,loss,lr,ms_per_step,test_loss,ema_test_loss,elapsed_s' and len(lines) == 11
    assert lines[1] == '10,0.1,0.001,12.5,,,1' and lines[5] == '50,0.02,0.001,12.5,0.2,0.3,5'
    data.write_log(str(out), rows[:1], new=False)                    # a resumed run appends
    data.write_log(str(tmp_path / 'new'), rows[:1], new=False)       # ...or starts the file if there is none
    assert (out / 'log.csv').read_text().splitlines() == lines + [lines[1]]
    assert (tmp_path / 'new' / 'log.csv').read_text().splitlines() == lines[:2]
    data.write_log(str(out), rows[:1], new=True)                     # a new run starts it anew
    assert (out / 'log.csv').read_text().splitlines() == lines[:2]
    with Image.open(out / 'loss.png') as im:
        assert im.format == 'PNG' and im.size == (640, 400)
        colours = {c for _, c in im.getcolors(640 * 400)}
    assert {(170, 170, 170), (31, 119, 180), (214, 39, 40), (0, 0, 0)} <= colours  # the 3 curves, the axes


def test_grid_array_layout():
    # image i is filled with the value i + 1 in channel 0 and 100 + i in channel 1
    images = torch.zeros(6, 2, 3, 4, dtype=torch.uint8)
    for i in range(6):
        images[i, 0], images[i, 1] = i + 1, 100 + i
    images[0, 0, 1, 2] = 77  # one marked pixel: row 1, column 2 of the first image
    grid = data.grid_array(images, 3)
    assert isinstance(grid, np.ndarray) and grid.dtype == np.uint8 and grid.shape == (2 * 3, 3 * 4, 2)
    for i in range(6):
        r, c = divmod(i, 3)  # left to right, then top to bottom
        cell = grid[r * 3:(r + 1) * 3, c * 4:(c + 1) * 4]
        assert (cell[..., 1] == 100 + i).all()
        assert (cell[..., 0] == i + 1).sum() == (11 if i == 0 else 12)
    assert grid[1, 2, 0] == 77
    assert np.array_equal(data.grid_array(data.to_float(images), 3), grid)  # floats are converted


def test_grid_with_a_partial_last_row(tmp_path):
    """A batch that is not a multiple of nrow: the last row is padded with black."""
    from PIL import Image
    images = torch.full((5, 3, 4, 6), 200, dtype=torch.uint8)
    grid = data.grid_array(images, 3)
    assert grid.shape == (2 * 4, 3 * 6, 3)
    assert (grid[:4] == 200).all() and (grid[4:, :2 * 6] == 200).all()  # 3 + 2 images
    assert (grid[4:, 2 * 6:] == 0).all()  # the missing 6th image is black
    assert data.grid_array(images[:2], 4).shape == (4, 4 * 6, 3)  # fewer images than one row
    assert (data.grid_array(images[:2], 4)[:, 2 * 6:] == 0).all()
    data.save_grid(images, tmp_path / 'partial.png', nrow=3)
    with Image.open(tmp_path / 'partial.png') as im:
        assert im.size == (3 * 6, 2 * 4) and im.mode == 'RGB'
        assert im.getpixel((0, 4)) == (200, 200, 200) and im.getpixel((2 * 6, 4)) == (0, 0, 0)
    data.save_grid(images[:, :1], tmp_path / 'gray.png')  # default nrow: ceil(sqrt(5)) = 3
    with Image.open(tmp_path / 'gray.png') as im:
        assert im.size == (3 * 6, 2 * 4) and im.mode == 'L'
        assert im.getpixel((0, 4)) == 200 and im.getpixel((3 * 6 - 1, 2 * 4 - 1)) == 0


# -----------------------------------------------------------------------------
# the module itself

def test_import_is_light_and_self_contained():
    """data.py imports no other script of the repo, and Pillow only when saving a grid."""
    code = ('import sys, data; '
            'print(sorted(m for m in ("PIL", "train", "generate", "acdit", "evaluate") if m in sys.modules))')
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]' and r.stderr == ''
