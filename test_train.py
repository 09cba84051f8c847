"""
Tests for train.py: config parsing, dataset loading, checkpoint I/O and device choice,
then the training loop end to end with a tiny model (checkpoints, samples, exact resume,
NaN stop, Ctrl-C, and 2-process DDP on the CPU). Run with: python -m pytest -q test_train.py

None of them touches the network: an autouse fixture points every download URL at a
file:// path that does not exist, and the download tests serve files from tmp_path.
"""

import gzip
import hashlib
import io
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from train import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parent
MNIST_DIR = REPO.parent / 'shared' / 'data' / 'mnist'  # the real dataset, when this checkout has it
ALL_MNIST = [n for pair in train.MNIST_FILES.values() for n in pair]


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Make any download attempt fail at once, locally, instead of reaching the internet."""
    nowhere = (tmp_path / 'no-such-mirror').as_uri()
    monkeypatch.setattr(train, 'MNIST_MIRRORS', [nowhere + '/'])
    monkeypatch.setattr(train, 'CIFAR10_URLS', [nowhere + '/cifar-10-python.tar.gz'])


# -----------------------------------------------------------------------------
# helpers that write tiny datasets in the official formats

def idx_bytes(array):
    """Encode a uint8 array in the idx format, the way the MNIST files are written."""
    header = struct.pack('>I', 0x0800 | array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(directory, monkeypatch, gz=True, n={'train': 5, 'test': 3}):
    """Write a tiny MNIST (random 28x28 digits) into directory and make train.py expect
    its checksums. Returns {split: (images, labels)} as numpy arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (images_name, labels_name) in train.MNIST_FILES.items():
        images = rng.integers(0, 256, (n[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n[split],), dtype=np.uint8)
        for name, array in ((images_name, images), (labels_name, labels)):
            data = idx_bytes(array)
            monkeypatch.setitem(train.CHECKSUMS, name, ('sha256', hashlib.sha256(data).hexdigest()))
            if gz:
                (directory / (name + '.gz')).write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
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
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# MNIST: the real files

have_real_mnist = all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + '.gz')).exists() for n in ALL_MNIST)
needs_real_mnist = pytest.mark.skipif(not have_real_mnist, reason=f'real MNIST not found in {MNIST_DIR}')


@needs_real_mnist
def test_real_mnist_loads():
    images, labels = train.load_dataset('mnist', str(MNIST_DIR), 'train')
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).min() > 5000  # every digit is well represented
    assert images.min() == 0 and images.max() == 255
    assert labels[0] == 5  # the well-known first training digit
    images, labels = train.load_dataset('mnist', str(MNIST_DIR), 'test')
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
        a = train.load_dataset('mnist', str(MNIST_DIR), split)
        b = train.load_dataset('mnist', str(tmp_path), split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -----------------------------------------------------------------------------
# MNIST: tiny fake files

@pytest.mark.parametrize('gz', [True, False])
def test_fake_mnist_loads(tmp_path, monkeypatch, capsys, gz):
    arrays = write_fake_mnist(tmp_path, monkeypatch, gz=gz)
    for split, (want_images, want_labels) in arrays.items():
        images, labels = train.load_dataset('mnist', str(tmp_path), split)
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
    images, _ = train.load_dataset('mnist', str(tmp_path), 'train')
    assert np.array_equal(images[:, 0].numpy(), arrays['train'][0])


def test_mnist_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    monkeypatch.setitem(train.CHECKSUMS, 'train-labels-idx1-ubyte', ('sha256', '0' * 64))
    with pytest.raises(DataError) as e:
        train.load_dataset('mnist', str(tmp_path), 'train')
    msg = str(e.value)
    assert 'train-labels-idx1-ubyte.gz' in msg and '0' * 64 in msg and 'Delete it' in msg
    actual = hashlib.sha256(gzip.decompress((tmp_path / 'train-labels-idx1-ubyte.gz').read_bytes())).hexdigest()
    assert actual in msg
    assert (tmp_path / 'train-labels-idx1-ubyte.gz').exists()  # reported, not silently deleted or replaced


def test_mnist_corrupted_raw_file_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    path = tmp_path / 't10k-images-idx3-ubyte'
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one flipped pixel: still a perfectly parseable idx file
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match='t10k-images-idx3-ubyte is corrupt'):
        train.load_dataset('mnist', str(tmp_path), 'test')


def test_mnist_bad_gzip_is_rejected(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(b'this is not gzip data')
    with pytest.raises(DataError, match='t10k-labels-idx1-ubyte.gz is not a valid gzip file'):
        train.load_dataset('mnist', str(tmp_path), 'test')


def test_mnist_bad_magic_number(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    # a labels-style header (1-d) in the images file, with a checksum that matches it,
    # so it is the parser that must notice
    bad = idx_bytes(np.zeros(3 * 28 * 28, dtype=np.uint8))
    (tmp_path / 't10k-images-idx3-ubyte').write_bytes(bad)
    monkeypatch.setitem(train.CHECKSUMS, 't10k-images-idx3-ubyte', ('sha256', hashlib.sha256(bad).hexdigest()))
    with pytest.raises(DataError, match=r't10k-images-idx3-ubyte: not an idx file.*0x801.*expected 0x803'):
        train.load_dataset('mnist', str(tmp_path), 'test')


def test_parse_idx_checks_size():
    data = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    assert train.parse_idx(data, 'x', 3).shape == (2, 28, 28)
    with pytest.raises(DataError, match=r'x: header says 2x28x28 = 1568 values but the file has 1567'):
        train.parse_idx(data[:-1], 'x', 3)
    with pytest.raises(DataError, match='magic number missing'):
        train.parse_idx(b'\x00\x00', 'x', 3)


def test_mnist_image_label_count_mismatch(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    labels = idx_bytes(np.zeros(4, dtype=np.uint8))  # 4 labels for 3 test images
    (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(labels)
    monkeypatch.setitem(train.CHECKSUMS, 't10k-labels-idx1-ubyte', ('sha256', hashlib.sha256(labels).hexdigest()))
    with pytest.raises(DataError, match='has 3 images but t10k-labels-idx1-ubyte has 4 labels'):
        train.load_dataset('mnist', str(tmp_path), 'test')


# -----------------------------------------------------------------------------
# downloads (served from tmp_path through file:// URLs, never the network)

def test_download_failure_names_file_and_directory(tmp_path):
    data_dir = tmp_path / 'data' / 'mnist'
    with pytest.raises(DataError) as e:
        train.load_dataset('mnist', str(data_dir), 'train')
    msg = str(e.value)
    assert 'could not download train-images-idx3-ubyte.gz' in msg
    assert f'in the directory {data_dir}' in msg and 'train-labels-idx1-ubyte.gz' in msg
    # the directories it made for the download are gone again, the ones that existed stay
    assert list(tmp_path.iterdir()) == []
    data_dir.mkdir(parents=True)
    with pytest.raises(DataError):
        train.load_dataset('mnist', str(data_dir), 'train')
    assert data_dir.is_dir() and list(data_dir.iterdir()) == []  # no half-downloaded leftovers


def test_download_function_raising(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError('network is unreachable')
    monkeypatch.setattr(train, 'download', offline)
    with pytest.raises(DataError) as e:
        train.load_dataset('cifar10', str(tmp_path), 'train')
    msg = str(e.value)
    assert 'network is unreachable' in msg and 'cifar-10-python.tar.gz' in msg and str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []


def test_download_from_second_mirror(tmp_path, monkeypatch, capsys):
    """The first mirror is down, the second serves the files: they are fetched, checked
    and kept, so the next load reads them from disk without downloading."""
    arrays = write_fake_mnist(tmp_path / 'mirror', monkeypatch)
    monkeypatch.setattr(train, 'MNIST_MIRRORS', [(tmp_path / 'down').as_uri() + '/',
                                                 (tmp_path / 'mirror').as_uri() + '/'])
    data_dir = tmp_path / 'data'
    images, labels = train.load_dataset('mnist', str(data_dir), 'test')
    assert np.array_equal(labels.numpy(), arrays['test'][1])
    assert sorted(p.name for p in data_dir.iterdir()) == ['t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    assert 'downloading' in capsys.readouterr().out
    train.load_dataset('mnist', str(data_dir), 'test')
    assert 'downloading' not in capsys.readouterr().out


def test_download_with_wrong_checksum_is_not_kept(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / 'mirror', monkeypatch)
    monkeypatch.setattr(train, 'MNIST_MIRRORS', [(tmp_path / 'mirror').as_uri() + '/'])
    monkeypatch.setitem(train.CHECKSUMS, 't10k-images-idx3-ubyte', ('sha256', 'f' * 64))
    data_dir = tmp_path / 'data'
    with pytest.raises(DataError, match='could not download t10k-images-idx3-ubyte.gz.*corrupt'):
        train.load_dataset('mnist', str(data_dir), 'test')
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
    monkeypatch.setitem(train.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', md5(path)))
    return tmp_path, batches


def test_fake_cifar_loads(fake_cifar, capsys):
    data_dir, batches = fake_cifar
    images, labels = train.load_dataset('cifar10', str(data_dir), 'train')
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images[0, :, 1, 2].tolist() == [11, 22, 33]  # channel-major rows: R, G, B planes
    assert images[0].sum() == 66  # ...and nothing else set (a wrong reshape would move them)
    names = [f'data_batch_{i}' for i in range(1, 6)]  # in numeric order, not archive order
    assert labels.tolist() == [label for n in names for label in batches[n][b'labels']]
    want = np.concatenate([batches[n][b'data'] for n in names]).reshape(10, 3, 32, 32)
    assert np.array_equal(images.numpy(), want)
    images, labels = train.load_dataset('cifar10', str(data_dir), 'test')
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == batches['test_batch'][b'labels']
    assert 'loaded cifar10 test: 3 images 32x32x3' in capsys.readouterr().out


def test_cifar_wrong_md5_is_rejected(fake_cifar, monkeypatch):
    data_dir, _ = fake_cifar
    actual = md5(data_dir / 'cifar-10-python.tar.gz')
    monkeypatch.setitem(train.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', 'a' * 32))
    with pytest.raises(DataError) as e:
        train.load_dataset('cifar10', str(data_dir), 'train')
    assert 'cifar-10-python.tar.gz is corrupt' in str(e.value) and actual in str(e.value) and 'a' * 32 in str(e.value)


def test_cifar_missing_member(tmp_path, monkeypatch):
    path = tmp_path / 'cifar-10-python.tar.gz'
    write_fake_cifar(path, {'data_batch_1': cifar_batch(np.random.default_rng(0), 2)})
    monkeypatch.setitem(train.CHECKSUMS, 'cifar-10-python.tar.gz', ('md5', md5(path)))
    with pytest.raises(DataError, match='lacks cifar-10-batches-py/test_batch'):
        train.load_dataset('cifar10', str(tmp_path), 'test')


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match='imagenet'):
        train.load_dataset('imagenet', str(tmp_path), 'train')
    with pytest.raises(ValueError, match='val'):
        train.load_dataset('mnist', str(tmp_path), 'val')


# -----------------------------------------------------------------------------
# batches

def test_pixel_conversion_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = train.to_float(pixels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(train.to_uint8(x), pixels)
    assert train.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


def test_get_batch_pairs_images_with_labels():
    # image i is filled with the value 20 * i and has label i, so pairing can be checked
    labels = torch.arange(10)
    images = (labels * 20).to(torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    x, y = train.get_batch(images, labels, 32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 4, 4) and x.dtype == torch.float32 and y.shape == (32,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(train.to_uint8(x), (y * 20).to(torch.uint8).view(32, 1, 1, 1).expand(32, 1, 4, 4))
    x2, y2 = train.get_batch(images, labels, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed, same batch
    _, y3 = train.get_batch(images, labels, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(y, y3)


def test_get_batch_hflip():
    images = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    images[..., 0] = 255  # a bright left column
    labels = torch.zeros(4, dtype=torch.int64)
    x, _ = train.get_batch(images, labels, 200, torch.Generator().manual_seed(0), hflip=True)
    left, right = (x[..., 0] == 1).all(dim=(1, 2)), (x[..., -1] == 1).all(dim=(1, 2))
    assert torch.all(left ^ right)  # every image is either as-is or exactly mirrored
    assert 60 < right.sum() < 140  # about half are mirrored
    x, _ = train.get_batch(images, labels, 200, torch.Generator().manual_seed(0), hflip=False)
    assert (x[..., 0] == 1).all()


def test_save_grid(tmp_path):
    from PIL import Image
    x = torch.linspace(-1, 1, 5 * 3 * 4 * 6).view(5, 3, 4, 6)
    train.save_grid(x, tmp_path / 'rgb.png', nrow=3)
    with Image.open(tmp_path / 'rgb.png') as im:
        assert im.size == (3 * 6, 2 * 4) and im.mode == 'RGB'
        assert im.getpixel((6, 0)) == tuple(train.to_uint8(x[1, :, 0, 0]).tolist())  # 2nd image, top-left
    train.save_grid(torch.zeros(4, 1, 7, 7, dtype=torch.uint8), tmp_path / 'gray.png')
    with Image.open(tmp_path / 'gray.png') as im:
        assert im.size == (14, 14) and im.mode == 'L'


# -----------------------------------------------------------------------------
# learning rate schedule

def test_get_lr_warmup_stable_decay():
    lr = lambda it: train.get_lr(it, max_iters=1000, learning_rate=1.0, warmup_iters=100,
                                 decay_frac=0.2, min_lr_frac=0.1)
    assert 0 < lr(0) < lr(50) < lr(99) < 1.0  # warmup
    assert lr(100) == lr(500) == lr(800) == 1.0  # stable until the last 20%
    assert 1.0 > lr(850) > lr(950) > 0.1  # linear decay
    assert lr(850) == pytest.approx(1.0 - 0.9 * 50 / 200)
    assert lr(1000) == pytest.approx(0.1) and lr(5000) == pytest.approx(0.1)  # floor
    assert train.get_lr(5, 10, 1.0, 0, 0.0, 0.0) == 1.0  # no warmup, no decay


# -----------------------------------------------------------------------------
# configuration

def test_parse_config_overrides():
    d = train.DEFAULTS
    before = dict(d)
    c = train.parse_config(['--batch_size=48', '--learning_rate=1', '--compile=true', '--dataset=cifar10',
                            '--out_dir=out-x', '--dtype="float32"', '--ema_decay=0.99'], d)
    assert c['batch_size'] == 48 != d['batch_size']
    assert c['learning_rate'] == 1.0 and isinstance(c['learning_rate'], float)  # int is fine for a float
    assert c['compile'] is True and c['dataset'] == 'cifar10' and c['out_dir'] == 'out-x'
    assert c['dtype'] == 'float32' and c['ema_decay'] == 0.99
    assert c['depth'] == d['depth']  # untouched keys keep their default
    assert train.parse_config(['--compile=False'], d)['compile'] is False
    assert train.parse_config(['--out_dir=123'], d)['out_dir'] == '123'  # a string key keeps a string
    assert train.DEFAULTS == before  # the defaults are not modified


@pytest.mark.parametrize('arg, fragment', [
    ('--batch_size=3.5', "batch_size=3.5 from '--batch_size=3.5' has type float, expected int"),
    ('--batch_size=big', "batch_size='big'"),
    ('--compile=1', 'expected bool (True/False/true/false)'),
    ('--depth=True', 'expected int'),
    ('--learning_rate=fast', 'expected float'),
])
def test_parse_config_type_mismatch(arg, fragment):
    with pytest.raises(ConfigError) as e:
        train.parse_config([arg], train.DEFAULTS)
    assert fragment in str(e.value)
    assert 'valid keys: ' in str(e.value) and 'batch_size' in str(e.value) and 'attn_backend' in str(e.value)


def test_parse_config_unknown_key():
    with pytest.raises(ConfigError) as e:
        train.parse_config(['--batch_sise=32'], train.DEFAULTS)
    msg = str(e.value)
    assert "unknown config key 'batch_sise'" in msg and 'did you mean batch_size' in msg
    assert 'valid keys: attn_backend, batch_size' in msg


def test_parse_config_other_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="is not one of 'mnist', 'cifar10'"):
        train.parse_config(['--dataset=imagenet'], train.DEFAULTS)
    with pytest.raises(ConfigError, match='expected --key=value'):
        train.parse_config(['--batch_size', '32'], train.DEFAULTS)
    with pytest.raises(ConfigError, match='unexpected argument'):
        train.parse_config(['batch_size=32'], train.DEFAULTS)
    with pytest.raises(ConfigError, match='not found'):
        train.parse_config([str(tmp_path / 'missing.py')], train.DEFAULTS)


def test_parse_config_file(tmp_path):
    path = tmp_path / 'my_config.py'
    path.write_text("import math\n"
                    "batch_size = 2 * batch_size  # files see the config so far\n"
                    "depth = 6\n"
                    "learning_rate = 1  # an int for a float key\n"
                    "_private = 'ignored'\n")
    c = train.parse_config([str(path), '--depth=8'], train.DEFAULTS)
    assert c['batch_size'] == 2 * train.DEFAULTS['batch_size'] and c['learning_rate'] == 1.0
    assert c['depth'] == 8  # later arguments win
    assert train.parse_config(['--depth=8', str(path)], train.DEFAULTS)['depth'] == 6

    path.write_text('detph = 6\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'detph' from config file .*did you mean depth"):
        train.parse_config([str(path)], train.DEFAULTS)
    path.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match='compile'):
        train.parse_config([str(path)], train.DEFAULTS)
    path.write_text('depth = = 3\n')
    with pytest.raises(ConfigError, match='line 1'):
        train.parse_config([str(path)], train.DEFAULTS)


@pytest.mark.parametrize('name', sorted(p.name for p in (REPO / 'config').glob('*.py')))
def test_shipped_config_files_parse(name):
    c = train.parse_config([str(REPO / 'config' / name)], train.DEFAULTS)
    assert c['dataset'] in ('mnist', 'cifar10')
    assert c['width'] % c['n_heads'] == 0
    size = {'mnist': 28, 'cifar10': 32}[c['dataset']]
    assert size % c['patch_size'] == 0
    tokens_per_side = size // c['patch_size']
    assert tokens_per_side % c['block_h'] == 0 and tokens_per_side % c['block_w'] == 0


def run_train_py(*args):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_bad_key_is_a_one_line_error():
    r = run_train_py('--bogus=1')
    assert r.returncode == 2
    assert r.stdout == ''
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'bogus'")
    assert 'Traceback' not in r.stderr


def test_cli_help():
    r = run_train_py('--help')
    assert r.returncode == 0
    assert f"--batch_size={train.DEFAULTS['batch_size']}" in r.stdout and '--dataset=' in r.stdout and 'model shape:' in r.stdout
    assert all(f'--{k}=' in r.stdout for k in train.DEFAULTS)


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(REPO)!r}); import train'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == ''
    assert list(tmp_path.iterdir()) == []  # no out/ or data/ created


# -----------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip(tmp_path):
    obj = {'model': {'w': torch.randn(3, 4), 'b': torch.arange(3)}, 'iter_num': 7,
           'config': dict(train.DEFAULTS), 'best_loss': 0.25, 'rng': torch.Generator().manual_seed(3).get_state()}
    path = tmp_path / 'run' / 'ckpt.pt'  # the directory does not exist yet
    train.save_checkpoint(str(path), obj)
    train.save_checkpoint(str(path), obj)  # overwriting is fine too
    assert os.listdir(path.parent) == ['ckpt.pt']  # no temp files left behind
    back = train.load_checkpoint(str(path))
    assert torch.equal(back['model']['w'], obj['model']['w']) and torch.equal(back['model']['b'], obj['model']['b'])
    assert back['iter_num'] == 7 and back['config'] == train.DEFAULTS and back['best_loss'] == 0.25
    assert torch.equal(back['rng'], obj['rng'])


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    train.save_checkpoint(str(path), {'iter_num': 1})
    with pytest.raises(Exception):
        train.save_checkpoint(str(path), {'iter_num': 2, 'oops': lambda: None})  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ['ckpt.pt']
    assert train.load_checkpoint(str(path))['iter_num'] == 1


def test_truncated_or_missing_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    train.save_checkpoint(str(path), {'w': torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f'could not read checkpoint {path}.*truncated or corrupt'):
        train.load_checkpoint(str(path))
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='could not read checkpoint'):
        train.load_checkpoint(str(path))
    path.write_bytes(b'')
    with pytest.raises(CheckpointError, match='could not read checkpoint'):
        train.load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=f'no checkpoint at {tmp_path / "other.pt"}'):
        train.load_checkpoint(str(tmp_path / 'other.pt'))


class NotATensor:  # a custom class: torch's safe loader (weights_only=True) refuses it
    pass


def test_checkpoint_with_unsafe_object(tmp_path):
    path = tmp_path / 'ckpt.pt'
    train.save_checkpoint(str(path), {'thing': NotATensor()})
    with pytest.raises(CheckpointError, match='holds an object that torch.load.weights_only=True. refuses'):
        train.load_checkpoint(str(path))


def test_check_compatible():
    ckpt = dict(train.DEFAULTS, depth=4, width=128)
    train.check_compatible(ckpt, dict(ckpt, learning_rate=1.0, max_iters=10))  # training keys may change
    with pytest.raises(CheckpointError) as e:
        train.check_compatible(ckpt, dict(ckpt, depth=6, width=256), path='out/ckpt.pt')
    msg = str(e.value)
    assert 'out/ckpt.pt' in msg
    assert 'checkpoint has depth=4, this run asks depth=6' in msg
    assert 'checkpoint has width=128, this run asks width=256' in msg
    assert 'patch_size' not in msg  # only the keys that differ
    assert '--depth=4 --width=128' in msg and 'init_from=scratch' in msg
    with pytest.raises(CheckpointError, match="checkpoint has dataset='mnist', this run asks dataset='cifar10'"):
        train.check_compatible(ckpt, dict(ckpt, dataset='cifar10'), keys=['dataset'])


# -----------------------------------------------------------------------------
# device

def test_pick_device():
    assert train.pick_device('cpu') == torch.device('cpu')
    assert train.pick_device('auto').type in ('cpu', 'cuda', 'mps')
    with pytest.raises(ConfigError, match='unknown device'):
        train.pick_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda' is not available"):
            train.pick_device('cuda')
        assert train.pick_device('auto') != torch.device('cuda')


def test_autocast_context_is_float32_on_cpu():
    with train.autocast_context(torch.device('cpu'), 'bfloat16'):
        y = torch.randn(2, 3) @ torch.randn(3, 2)
    assert y.dtype == torch.float32


def test_main_help_and_bad_config(capsys):
    train.main(['-h'])
    assert '--width=128' in capsys.readouterr().out
    with pytest.raises(ConfigError):
        train.main(['--width=wide'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_main_bad_device_touches_nothing(tmp_path):
    with pytest.raises(ConfigError, match="device='cuda'"):
        train.main(['--device=cuda', f'--out_dir={tmp_path / "out"}', f'--data_dir={tmp_path / "data"}'])
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# the training loop: train.main() end to end with a tiny model on the real MNIST
#
# 4x4 tokens of 7x7 pixels in 4 blocks (rows), one layer of width 16: a step takes a
# few milliseconds on a CPU. Most runs call train.main in-process; a subprocess is used
# only where the exit status, stderr or a real signal is what is tested.

TINY = ['--dataset=mnist', f'--data_dir={MNIST_DIR}', '--device=cpu', '--dtype=float32',
        '--patch_size=7', '--block_h=1', '--block_w=4', '--depth=1', '--width=16', '--n_heads=2',
        '--batch_size=8', '--eval_iters=1', '--sample_steps=2', '--log_interval=1',
        '--learning_rate=1e-3', '--warmup_iters=2', '--decay_frac=0.0', '--compile=False']
PROGRESS = re.compile(r'^iter (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| (\d+) ms/it \| (\d+) img/s \| '
                      r'elapsed \S+ \| eta \S+$', re.M)
_mnist_cache = {}


@pytest.fixture
def cached_mnist(monkeypatch):
    """train.load_dataset reading the real MNIST once per test session (it takes ~0.5 s)."""
    if not have_real_mnist:
        pytest.skip(f'real MNIST not found in {MNIST_DIR}')
    real = train.load_dataset

    def load(name, data_dir, split):
        key = (name, str(data_dir), split)
        if key not in _mnist_cache:
            _mnist_cache[key] = real(name, data_dir, split)
        return _mnist_cache[key]
    monkeypatch.setattr(train, 'load_dataset', load)


def losses(out):
    """{iter: printed training loss} from the progress lines of a run."""
    return {int(m.group(1)): m.group(3) for m in PROGRESS.finditer(out)}


def run_tiny(*args, timeout=120, **kw):
    """train.py in a subprocess, unbuffered, with the tiny model."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'train.py', *TINY, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def assert_one_line_error(r, code, *fragments):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def assert_same_state(a, b, path='ckpt'):
    """Recursively equal checkpoints: tensors bit for bit, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f'{path}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f'{path}[{i}]')
    else:
        assert a == b, (path, a, b)


@needs_real_mnist
def test_train_writes_checkpoint_samples_and_progress(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / 'out'
    train.main(TINY + [f'--out_dir={out}', '--max_iters=3', '--eval_interval=2', '--sample_interval=2'])
    text = capsys.readouterr().out
    ckpt = train.load_checkpoint(str(out / 'ckpt.pt'))
    assert {'model', 'ema', 'optimizer', 'config', 'model_config', 'iter_num', 'rng'} <= ckpt.keys()
    assert ckpt['iter_num'] == 3 and ckpt['world_size'] == 1
    assert ckpt['config']['depth'] == 1 and ckpt['model_config']['patch_size'] == 7
    assert ckpt['model'].keys() == ckpt['ema'].keys()
    assert not all(torch.equal(ckpt['model'][k], ckpt['ema'][k]) for k in ckpt['model'])  # EMA lags
    # a grid per sample_interval and at the end: one row of 28x28 digits per class,
    # n_per_class (10) digits per row
    assert sorted(p.name for p in out.glob('*.png')) == ['samples_000002.png', 'samples_000003.png']
    with Image.open(out / 'samples_000003.png') as im:
        assert im.mode == 'L' and im.size == (10 * 28, 10 * 28)
        assert len(np.unique(np.asarray(im))) > 2  # not a blank image
    lines = PROGRESS.findall(text)
    assert [(int(m[0]), int(m[1])) for m in lines] == [(1, 3), (2, 3), (3, 3)]
    for _, _, loss, lr, ms, img in lines:
        assert 0 < float(loss) < 10 and 0 < float(lr) <= 1e-3 and int(img) > 0
    assert float(lines[0][3]) < float(lines[2][3]) == 1e-3  # warmup, then flat
    assert 'eval @ 2: test loss' in text and 'eval @ 3: test loss' in text
    assert f'saved {out / "ckpt.pt"} (iter 3)' in text and 'done: 3 iters' in text
    assert [p.name for p in out.iterdir() if p.name.startswith('.')] == []  # no temp files left


@pytest.mark.usefixtures('cached_mnist')
def test_resume_is_exact(tmp_path, capsys):
    """k steps + resume to 2k == 2k steps in one go, bit for bit (CPU, float32). Only
    run B evaluates and samples at step k, so this also checks that evaluation and
    sampling do not disturb the training random streams."""
    common = TINY + ['--eval_interval=100', '--sample_interval=100']
    a, b = tmp_path / 'a', tmp_path / 'b'
    train.main(common + [f'--out_dir={a}', '--max_iters=6'])
    out_a = capsys.readouterr().out
    train.main(common + [f'--out_dir={b}', '--max_iters=3'])
    out_b1 = capsys.readouterr().out
    # as if saved where AdamW is not fused (MPS): the resumed run still uses this device's choice
    ckpt = torch.load(b / 'ckpt.pt', weights_only=False)
    assert ckpt['optimizer']['param_groups'][0]['fused'] is True  # CPU: fused
    ckpt['optimizer']['param_groups'][0]['fused'] = None
    torch.save(ckpt, b / 'ckpt.pt')
    train.main(common + [f'--out_dir={b}', '--max_iters=6', '--init_from=resume'])
    out_b2 = capsys.readouterr().out
    assert 'eval @ 3' in out_b1 and (b / 'samples_000003.png').exists() and 'eval @ 3' not in out_a
    assert f'resumed from {b / "ckpt.pt"} at iter 3' in out_b2
    la, lb1, lb2 = losses(out_a), losses(out_b1), losses(out_b2)
    assert sorted(la) == [1, 2, 3, 4, 5, 6] and sorted(lb1) == [1, 2, 3] and sorted(lb2) == [4, 5, 6]
    assert {**lb1, **lb2} == la
    eval_line = re.compile(r'^eval @ 6: .*$', re.M)
    assert eval_line.search(out_a).group(0) == eval_line.search(out_b2).group(0)
    ca, cb = (train.load_checkpoint(str(d / 'ckpt.pt')) for d in (a, b))
    assert ca['iter_num'] == cb['iter_num'] == 6
    for key in ('model', 'ema', 'optimizer', 'rng'):
        assert_same_state(ca[key], cb[key], key)
    assert_same_state(ca['config'], dict(cb['config'], init_from='scratch', out_dir=str(a)), 'config')
    assert cb['model']['final.linear.weight'].abs().sum() > 0  # the run did train (it starts at zero)


@pytest.mark.usefixtures('cached_mnist')
def test_compile_unavailable_falls_back_to_eager_training(tmp_path, monkeypatch, capsys):
    """A machine where torch.compile cannot build code (no C++ compiler) still trains:
    one warning naming the problem, then exactly the steps of a --compile=False run."""
    common = TINY + ['--eval_interval=100', '--sample_interval=100', '--max_iters=3']
    train.main(common + [f'--out_dir={tmp_path / "eager"}', '--compile=False'])
    eager = capsys.readouterr().out

    def broken_compile(*args, **kwargs):
        raise RuntimeError('InvalidCxxCompiler: No working C++ compiler found')
    monkeypatch.setattr(torch, 'compile', broken_compile)
    train.main(common + [f'--out_dir={tmp_path / "fallback"}', '--compile=True'])
    out = capsys.readouterr().out
    assert ('warning: torch.compile does not work here (RuntimeError: InvalidCxxCompiler: '
            'No working C++ compiler found); training without it') in out
    assert 'compiling the model' not in out
    assert sorted(losses(out)) == [1, 2, 3] and losses(out) == losses(eager)
    assert train.load_checkpoint(str(tmp_path / 'fallback' / 'ckpt.pt'))['iter_num'] == 3


@pytest.mark.skipif(train.compile_problem(torch.device('cpu')) is not None,
                    reason='torch.compile does not work on this machine (no C++ compiler?)')
def test_compiled_training_step_matches_eager_on_cpu():
    """train.py --compile=True (the CPU recipe) trains the same function: the compiled
    TrainingLoss gives eager's loss and gradients. Inductor draws its own random numbers
    unless fallback_random is set, so it is set here to make the two see the same t,
    noise and label dropout."""
    import acdit
    cfg = acdit.ACDiTConfig(img_size=28, patch_size=7, block_h=1, block_w=4, depth=1, width=16,
                            n_heads=2)
    model = acdit.ACDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would make the output exactly zero
            p.normal_(0, 0.3)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    y = torch.arange(8) % 10
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for step in (train.TrainingLoss(model), torch.compile(train.TrainingLoss(model))):
            torch.manual_seed(0)
            model.zero_grad()
            loss = step(x, y)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_eager, g_eager), (l_comp, g_comp) = results
    assert l_eager > 0.1  # random weights: a real loss, not the zero-init shortcut
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):  # float32 sums in another order: equal to 1e-4 of the scale
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


@pytest.mark.usefixtures('cached_mnist')
def test_resume_refuses_other_shapes_and_bad_files(tmp_path, capsys):
    out = tmp_path / 'out'
    args = TINY + [f'--out_dir={out}', '--eval_interval=100', '--sample_interval=100']
    train.main(args + ['--max_iters=1'])
    before = (out / 'ckpt.pt').read_bytes()
    with pytest.raises(CheckpointError) as e:
        train.main(args + ['--max_iters=2', '--init_from=resume', '--depth=2'])
    msg = str(e.value)
    assert 'checkpoint has depth=1, this run asks depth=2' in msg and '--depth=1' in msg and str(out) in msg
    assert (out / 'ckpt.pt').read_bytes() == before  # untouched
    # a checkpoint from before rope_base was a config key: its base is read from model_config
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['model_config']['rope_base'] == train.DEFAULTS['rope_base']  # the config reached the model
    del ckpt['config']['rope_base']
    ckpt['model_config']['rope_base'] = 10000.0
    torch.save(ckpt, out / 'ckpt.pt')
    with pytest.raises(CheckpointError, match=r'checkpoint has rope_base=10000.0, .*--rope_base=10000.0'):
        train.main(args + ['--max_iters=2', '--init_from=resume'])
    (out / 'ckpt.pt').write_bytes(before)
    # other training settings may change on resume, but the run says so; a checkpoint from
    # before the loss weighting existed trained with the plain eps-MSE (min_snr_gamma=0)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    del ckpt['config']['min_snr_gamma']
    torch.save(ckpt, out / 'ckpt.pt')
    capsys.readouterr()
    train.main(args + ['--max_iters=2', '--init_from=resume', '--min_snr_gamma=1.0', '--learning_rate=2e-3'])
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert note == ["note: this run changes the checkpoint's training settings: min_snr_gamma 0.0 -> 1.0, "
                    "max_iters 1 -> 2, learning_rate 0.001 -> 0.002 (pass the checkpoint's values to "
                    "continue the same run)"]
    (out / 'ckpt.pt').write_bytes(before)
    # a checkpoint written by another number of processes: its per-process random streams
    # cannot be split or merged, so they restart, and the run says so
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    ckpt['world_size'] = 2
    torch.save(ckpt, out / 'ckpt.pt')
    train.main(args + ['--max_iters=2', '--init_from=resume'])
    text = capsys.readouterr().out
    assert 'note: the checkpoint was written by 2 process(es) and this run has 1' in text
    assert f"restart from seed={train.DEFAULTS['seed']}" in text and 'done: 2 iters' in text
    (out / 'ckpt.pt').write_bytes(before)
    # a truncated checkpoint, from the command line: a one-line error, exit status 1
    (out / 'ckpt.pt').write_bytes(before[:len(before) // 2])
    r = run_tiny(f'--out_dir={out}', '--max_iters=2', '--init_from=resume')
    assert_one_line_error(r, 1, f'could not read checkpoint {out / "ckpt.pt"}', 'truncated or corrupt')
    with pytest.raises(CheckpointError, match=f'no checkpoint at {tmp_path / "empty" / "ckpt.pt"}'):
        train.main(args[:-2] + [f'--out_dir={tmp_path / "empty"}', '--max_iters=2', '--init_from=resume'])


@pytest.mark.usefixtures('cached_mnist')
def test_new_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    out = tmp_path / 'out'
    args = TINY + [f'--out_dir={out}', '--eval_interval=100', '--sample_interval=100', '--max_iters=1']
    train.main(args)
    before = (out / 'ckpt.pt').read_bytes()
    with pytest.raises(ConfigError, match=r'ckpt.pt already exists and a new run would overwrite it: '
                                          r'continue that run with --init_from=resume'):
        train.main(args)
    assert (out / 'ckpt.pt').read_bytes() == before


def test_eval_loss_is_the_plain_eps_mse_whatever_the_weighting():
    """train.py's eval reports the unweighted eps-MSE, so runs with and without Min-SNR
    weighting compare; the training loss itself is weighted."""
    import acdit
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=g)
    losses = {}
    for gamma in (0.0, 1.0):
        mcfg = acdit.ACDiTConfig(patch_size=7, block_w=4, depth=1, width=16, n_heads=2, min_snr_gamma=gamma)
        torch.manual_seed(0)
        model = acdit.ACDiT(mcfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3, generator=g.manual_seed(p.numel()))
        (losses[gamma],) = train.estimate_loss([model], images, labels, 2, train.nullcontext())
        torch.manual_seed(1)
        x, y = train.get_batch(images, labels, 8, torch.Generator().manual_seed(2))
        losses[gamma, 'train'] = model.training_loss(x, y).item()
    assert losses[0.0] == losses[1.0]
    assert losses[0.0, 'train'] != losses[1.0, 'train']


@pytest.mark.usefixtures('cached_mnist')
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import acdit
    real, calls = acdit.ACDiT.training_loss, []

    def training_loss(self, imgs, labels, weighted=True):
        loss = real(self, imgs, labels, weighted)
        if torch.is_grad_enabled():  # training steps, not the evaluation
            calls.append(1)
            if len(calls) == 4:  # the 4th step (iter 3, counting from 0)
                return loss * float('nan')
        return loss
    monkeypatch.setattr(acdit.ACDiT, 'training_loss', training_loss)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f'--out_dir={out}', '--max_iters=10', '--eval_interval=2', '--sample_interval=100'])
    assert e.value.code not in (0, None)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert 'loss is nan at iter 3' in text and str(out / 'ckpt.pt') in text
    assert 'error: loss is nan' in captured.err  # an error goes to stderr
    assert len(calls) == 4
    ckpt = train.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 2
    for key in ('model', 'ema'):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values())


@pytest.mark.usefixtures('cached_mnist')
def test_keyboard_interrupt_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C during step k+1 saves the k completed steps; resuming then gives exactly
    the run that was never interrupted."""
    common = TINY + ['--eval_interval=100', '--sample_interval=100', '--max_iters=5']
    train.main(common + [f'--out_dir={tmp_path / "a"}'])
    out_a = capsys.readouterr().out
    real, calls = train.get_batch, []

    def get_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # the batch of step 4: three steps are done
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(train, 'get_batch', get_batch)
    out = tmp_path / 'b'
    with pytest.raises(SystemExit) as e:
        train.main(common + [f'--out_dir={out}'])
    assert e.value.code == 130
    text = capsys.readouterr().out
    assert 'interrupted at iter 3' in text
    assert re.search(r'resume with: python train\.py .*--init_from=resume', text)
    assert train.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3
    monkeypatch.setattr(train, 'get_batch', real)
    train.main(common + [f'--out_dir={out}', '--init_from=resume'])
    out_b = capsys.readouterr().out
    assert 'resumed from' in out_b and {**losses(text), **losses(out_b)} == losses(out_a)
    ca, cb = (train.load_checkpoint(str(tmp_path / d / 'ckpt.pt')) for d in 'ab')
    for key in ('model', 'ema', 'optimizer'):
        assert_same_state(ca[key], cb[key], key)


@pytest.mark.usefixtures('cached_mnist')
def test_keyboard_interrupt_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    def get_batch(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'get_batch', get_batch)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=5'])
    assert e.value.code == 130
    assert not (tmp_path / 'ckpt.pt').exists()


def test_bad_model_shape_is_a_one_line_error(tmp_path):
    out = tmp_path / 'out'
    r = run_tiny('--patch_size=5', f'--out_dir={out}')
    assert_one_line_error(r, 2, 'patch_size=5', 'img_size=28')
    assert r.stdout == '' and not out.exists()  # nothing happened before the check
    # the same path (ConfigError -> exit status 2) for the other checks, in-process
    with pytest.raises(ConfigError, match='width/n_heads = 18/2'):  # RoPE needs head dims of 4k
        train.main(TINY + ['--width=18', f'--out_dir={out}'])
    with pytest.raises(ConfigError, match='block 1x3 .patches. does not tile the 4x4'):
        train.main(TINY + ['--block_w=3', f'--out_dir={out}'])
    with pytest.raises(ConfigError, match='max_iters=0 must be at least 1'):
        train.main(TINY + ['--max_iters=0', f'--out_dir={out}'])
    assert not out.exists()


@pytest.mark.usefixtures('cached_mnist')
def test_ctrl_c_stops_between_steps(tmp_path, monkeypatch, capsys):
    """A real SIGINT: the first one lets the running step finish and then saves; a second
    one stops at once, without saving (it may have hit the middle of a step)."""
    real, calls = train.get_batch, []
    handler_before = signal.getsignal(signal.SIGINT)

    def get_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # in step 4 (iter 3): Ctrl-C, `presses` times
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
        return real(*args, **kw)
    monkeypatch.setattr(train, 'get_batch', get_batch)
    args = TINY + ['--eval_interval=100', '--sample_interval=100', '--max_iters=10']
    presses = 1
    with pytest.raises(SystemExit) as e:
        train.main(args + [f'--out_dir={tmp_path / "once"}'])
    assert e.value.code == 130 and len(calls) == 4  # step 4 finished, step 5 never started
    assert 'interrupted at iter 4' in capsys.readouterr().out
    assert train.load_checkpoint(str(tmp_path / 'once' / 'ckpt.pt'))['iter_num'] == 4
    assert signal.getsignal(signal.SIGINT) is handler_before  # main() restored the handler
    calls.clear()
    presses = 2
    with pytest.raises(SystemExit) as e:
        train.main(args + [f'--out_dir={tmp_path / "twice"}'])
    assert e.value.code == 130 and len(calls) == 4
    assert 'interrupted again: exiting without saving' in capsys.readouterr().out
    assert not (tmp_path / 'twice' / 'ckpt.pt').exists()
    assert signal.getsignal(signal.SIGINT) is handler_before


def torchrun(*args, ctrl_c_after=None, timeout=120):
    """Run train.py under torchrun with 2 CPU processes; return (exit status, stdout+stderr).
    With ctrl_c_after, send torchrun a SIGINT once a line starting with it is printed."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # on a hang: SIGTERM makes torchrun stop its workers (they run in sessions of their own), then SIGKILL
    timed_out = []
    timers = [threading.Timer(timeout, lambda: (timed_out.append(True), p.terminate())),
              threading.Timer(timeout + 45, p.kill)]
    for t in timers:
        t.start()
    text, sent = '', False
    try:
        for line in p.stdout:
            text += line
            if ctrl_c_after and not sent and line.startswith(ctrl_c_after):
                p.send_signal(signal.SIGINT)  # to torchrun only, like a Ctrl-C in its terminal
                sent = True
        p.wait()
    finally:
        for t in timers:
            t.cancel()
    assert not timed_out, f'torchrun timed out after {timeout}s:\n{text[-3000:]}'
    return p.returncode, text


@needs_real_mnist
def test_ddp_two_cpu_processes_ctrl_c_and_resume(tmp_path):
    """torchrun with 2 gloo processes on the CPU. Ctrl-C goes to torchrun, which passes a
    SIGINT to each worker: they agree on a step, stop after it, and rank 0 saves a
    checkpoint holding both ranks' random states. Only rank 0 logs. A resume with the
    same world size then runs to the end."""
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', '--eval_interval=2', '--sample_interval=100000']
    rc, text = torchrun(*args, '--max_iters=100000', ctrl_c_after='iter 3/')
    assert text.count('device: cpu x2 processes') == 1, text[-3000:]
    m = re.search(r'^interrupted at iter (\d+); saving', text, re.M)
    assert m, text[-3000:]
    k = int(m.group(1))
    iters = [int(m[0]) for m in PROGRESS.findall(text)]
    assert iters == list(range(1, k + 1))  # one line per step: only rank 0 logs
    assert text.count('interrupted at iter') == 1 and f'saved {out / "ckpt.pt"} (iter {k})' in text
    assert 'resume with: torchrun --nproc_per_node=2 train.py' in text
    assert rc != 0  # torchrun itself re-raises the signal (with its own traceback)
    assert 'train.py", line' not in text  # but the workers stopped cleanly: no traceback of ours
    ckpt = train.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['world_size'] == 2 and ckpt['iter_num'] == k
    assert all(len(v) == 2 for v in ckpt['rng'].values())
    assert not torch.equal(ckpt['rng']['batches'][0], ckpt['rng']['batches'][1])  # each rank its own batches

    rc, text = torchrun(*args, f'--max_iters={k + 2}', '--init_from=resume')
    assert rc == 0, text[-3000:]
    assert text.count(f'resumed from {out / "ckpt.pt"} at iter {k}') == 1
    assert [int(m[0]) for m in PROGRESS.findall(text)] == [k + 1, k + 2]
    assert text.count('eval @ ') == 1 + k % 2 and text.count('done: ') == 1
    assert [p.name for p in out.glob('*.png')] == [f'samples_{k + 2:06d}.png']
    ckpt = train.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['world_size'] == 2 and ckpt['iter_num'] == k + 2
