"""
Datasets for ACDiT: MNIST and CIFAR-10, read with numpy and the standard library only.

    images, labels = load_dataset('mnist', 'path/to/mnist', 'train')  # uint8 (N, C, H, W), int64 (N,)
    x, y = get_batch(images, labels, 64, torch.Generator().manual_seed(0))  # float in [-1, 1]
    save_grid(to_uint8(x), 'batch.png', nrow=8)

A missing file is downloaded into data_dir from the official mirrors. Every file is
checked against a known checksum before it is used, so a corrupt or truncated file is
a clear DataError naming the file and the fix, never a crash somewhere in training.
"""

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np
import torch

DATASET_SHAPES = {'mnist': (28, 1), 'cifar10': (32, 3)}  # name -> (image size, channels)
DATASETS = tuple(DATASET_SHAPES)


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or could not be downloaded."""


# Checksums of the files we read. For MNIST it is the sha256 of the *decompressed* idx
# file, because the bytes of the .gz differ between mirrors while the contents do not.
# For CIFAR-10 it is the md5 of the archive, as published on its download page.
# The tests swap in checksums of tiny fake files they write themselves.
CHECKSUMS = {
    'train-images-idx3-ubyte': ('sha256', 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db'),
    'train-labels-idx1-ubyte': ('sha256', '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5'),
    't10k-images-idx3-ubyte': ('sha256', '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7'),
    't10k-labels-idx1-ubyte': ('sha256', 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2'),
    'cifar-10-python.tar.gz': ('md5', 'c58f30108f718f92721af3b95e74349a'),
}
MNIST_FILES = {  # split -> (images, labels); on disk as NAME or NAME.gz
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
MNIST_MIRRORS = [  # tried in order; each serves NAME.gz under this prefix
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
    'https://storage.googleapis.com/cvdf-datasets/mnist/',
]
CIFAR10_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR10_URLS = ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz']

# -----------------------------------------------------------------------------
# checksums and downloads

_REPLACE_ADVICE = 'Delete it (it is then downloaded again) or replace it with a good copy.'


def _verify(name, data_or_path, shown_path, advice=_REPLACE_ADVICE):
    """Raise DataError unless the bytes (or the file at a path) have the checksum recorded for name."""
    algo, expected = CHECKSUMS[name]
    if isinstance(data_or_path, bytes):
        actual = hashlib.new(algo, data_or_path).hexdigest()
    else:  # a file, hashed in chunks: the CIFAR archive is 170 MB
        with open(data_or_path, 'rb') as f:
            actual = hashlib.file_digest(f, algo).hexdigest()
    if actual != expected:
        what = 'its decompressed contents' if shown_path.endswith('.gz') and algo == 'sha256' else 'it'
        raise DataError(f"{shown_path} is corrupt or not the expected file: {algo} of {what} "
                        f"is {actual}, expected {expected}. {advice}".rstrip())


def download(url, path):
    """Fetch url into path. Kept as its own function so that tests can replace it."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, 'wb') as f:
        shutil.copyfileobj(response, f)


def _download_verified(urls, dest, check, howto):
    """Try each url in turn: download next to dest, check the temp file (raises if bad),
    then rename it into place. The rename is atomic, so dest is either absent or a
    verified file, never a half-written one, even if we are killed mid-download.
    If every url fails, the directories made for dest are removed again."""
    directory = os.path.abspath(os.path.dirname(dest) or '.')
    made = []  # the directories this call creates, deepest first
    d = directory
    while not os.path.isdir(d) and d != os.path.dirname(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(directory, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.download-', suffix='.part')
        os.close(fd)
        try:
            print(f'downloading {url} -> {dest}')
            download(url, tmp)
            check(tmp)
            os.replace(tmp, dest)
            return
        except Exception as e:  # any failure (no network, 404, bad checksum): try the next mirror
            errors.append(f'{url}: {e}')
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    for d in made:  # leave no empty data directory behind a failed download
        try:
            os.rmdir(d)
        except OSError:  # not empty after all (another process wrote there): keep it
            break
    raise DataError(f"could not download {os.path.basename(dest)} ({'; '.join(errors)}). {howto}")

# -----------------------------------------------------------------------------
# MNIST: four gzipped idx files

def parse_idx(data, name, ndim):
    """Parse an idx file (the MNIST format): 2 zero bytes, a type byte (0x08 = uint8),
    a byte with the number of dimensions, then each dimension as a big-endian uint32,
    then the values in C order."""
    magic = 0x0800 | ndim
    got = struct.unpack('>I', data[:4])[0] if len(data) >= 4 else None
    if got != magic or len(data) < 4 + 4 * ndim:
        raise DataError(f"{name}: not an idx file of {ndim}-d uint8 data "
                        f"(magic number {'missing' if got is None else hex(got)}, expected {hex(magic)})")
    dims = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise DataError(f"{name}: header says {'x'.join(map(str, dims))} = {math.prod(dims)} values "
                        f"but the file has {len(body)}")
    # np.frombuffer gives a read-only view of the bytes; copy so torch can own writable memory
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _read_mnist_file(data_dir, name):
    """Return the decompressed, checksum-verified bytes of one MNIST file, reading
    data_dir/NAME if present, else data_dir/NAME.gz, else downloading NAME.gz."""
    raw, gz = os.path.join(data_dir, name), os.path.join(data_dir, name + '.gz')
    if not os.path.exists(raw) and not os.path.exists(gz):
        howto = (f"Place {name}.gz (or the decompressed {name}) in the directory {os.path.abspath(data_dir)}, "
                 f"e.g. from {MNIST_MIRRORS[0]}{name}.gz, or set --data_dir to where it is. MNIST needs all "
                 f"four files: {', '.join(n + '.gz' for pair in MNIST_FILES.values() for n in pair)}.")

        def check(tmp):  # a download is only kept if it decompresses to the right bytes
            with open(tmp, 'rb') as f:
                _verify(name, gzip.decompress(f.read()), f'the downloaded {name}.gz', advice='')

        _download_verified([m + name + '.gz' for m in MNIST_MIRRORS], gz, check, howto)
    path = raw if os.path.exists(raw) else gz
    with open(path, 'rb') as f:
        data = f.read()
    if path == gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{gz} is not a valid gzip file ({e}). {_REPLACE_ADVICE}") from None
    _verify(name, data, path)
    return data


def _load_mnist(data_dir, split):
    images_name, labels_name = MNIST_FILES[split]
    images = parse_idx(_read_mnist_file(data_dir, images_name), images_name, 3)
    labels = parse_idx(_read_mnist_file(data_dir, labels_name), labels_name, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_name} has {len(images)} images but {labels_name} has {len(labels)} labels")
    return images[:, None], labels  # (N, 1, 28, 28): grayscale, one channel

# -----------------------------------------------------------------------------
# CIFAR-10: one tar.gz of pickled batches

def _load_cifar10(data_dir, split):
    path = os.path.join(data_dir, CIFAR10_ARCHIVE)
    if not os.path.exists(path):
        howto = (f"Place {CIFAR10_ARCHIVE} (the 'CIFAR-10 python version', not extracted) in the directory "
                 f"{os.path.abspath(data_dir)}, e.g. from {CIFAR10_URLS[0]}, or set --data_dir to where it is.")

        def check(tmp):  # a download is only kept if its md5 is right
            _verify(CIFAR10_ARCHIVE, tmp, f'the downloaded {CIFAR10_ARCHIVE}', advice='')

        _download_verified(CIFAR10_URLS, path, check, howto)
    _verify(CIFAR10_ARCHIVE, path, path)
    wanted = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    batches = {}
    # Walk the members in archive order: asking a .tar.gz for members by name would
    # seek backwards and so decompress the archive from the start again for each one.
    # pickle can run code when loading, which is fine here only because the archive's
    # md5 was just verified to be the official one.
    with tarfile.open(path, 'r:gz') as tar:
        for member in tar:
            batch_name = member.name.rsplit('/', 1)[-1]
            if member.name.startswith('cifar-10-batches-py/') and batch_name in wanted:
                batches[batch_name] = pickle.load(tar.extractfile(member), encoding='bytes')
    missing = [n for n in wanted if n not in batches]
    if missing:
        raise DataError(f"{path} lacks cifar-10-batches-py/{', '.join(missing)}; is it the python version?")
    images, labels = [], []
    for n in wanted:  # fixed order, whatever the order in the archive
        data, batch_labels = np.asarray(batches[n][b'data'], dtype=np.uint8), batches[n][b'labels']
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(f"{path}: {n} has data of shape {data.shape} and {len(batch_labels)} labels, "
                            f"expected (N, 3072) and N labels")
        # each row is 1024 red values, then 1024 green, then 1024 blue, each a 32x32 image
        # in row-major order: exactly a (3, 32, 32) channel-first array
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)

# -----------------------------------------------------------------------------
# the public entry point, pixels and batches

def load_dataset(name, data_dir, split):
    """Load a whole split into memory, downloading it into data_dir first if missing.
    Returns (images, labels): a torch uint8 tensor (N, C, H, W) and a torch int64 tensor (N,)."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}, expected one of {', '.join(map(repr, DATASETS))}")
    images, labels = (_load_mnist if name == 'mnist' else _load_cifar10)(data_dir, split)
    n, c, h, w = images.shape
    print(f'loaded {name} {split}: {n} images {h}x{w}x{c} from {os.path.join(data_dir, "")}')
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_float(images):
    """uint8 pixels in [0, 255] -> float in [-1, 1], the range the diffusion model works in."""
    return images.float() / 127.5 - 1.0


def to_uint8(x):
    """The inverse of to_float, clamping whatever the model produced to valid pixels."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def get_batch(images, labels, batch_size, generator, hflip=False):
    """A random batch (with replacement) as float images in [-1, 1] of shape (B, C, H, W)
    and int64 labels, on the device the dataset tensors live on. The indices come from
    generator (a CPU torch.Generator), so a run's batches are reproducible from its seed.
    hflip mirrors a random half of the images: a fine augmentation for CIFAR's photos,
    but not for digits, which are not symmetric."""
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
    if hflip:
        flip = (torch.rand(batch_size, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return to_float(x), y

# -----------------------------------------------------------------------------
# image grids

def grid_array(images, nrow):
    """Images (B, C, H, W), uint8 or float in [-1, 1] -> one uint8 numpy array
    (rows*H, nrow*W, C) with nrow images per row, left to right then top to bottom.
    A last row that is not full is padded with black."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    B, C, H, W = images.shape
    rows = math.ceil(B / nrow)
    images = torch.cat([images.cpu(), images.new_zeros(rows * nrow - B, C, H, W, device='cpu')])
    grid = images.reshape(rows, nrow, C, H, W).permute(0, 3, 1, 4, 2)  # (rows, H, nrow, W, C)
    return grid.reshape(rows * H, nrow * W, C).numpy()


def save_grid(images, path, nrow=None):
    """Save a batch of images (float in [-1, 1] or uint8, shape (B, C, H, W)) as one image
    grid with nrow images per row (default: about square); the format follows path's
    extension (.png, .jpg, ...)."""
    from PIL import Image  # imported here so that only saving images needs pillow
    array = grid_array(images, nrow or math.ceil(math.sqrt(len(images))))
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
