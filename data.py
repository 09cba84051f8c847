"""
Datasets for ACDiT: MNIST and CIFAR-10, read with numpy and the standard library only, your own
images in class folders (read with Pillow), and Moving MNIST videos made on the fly from the
MNIST digits.

    images, labels = load_dataset('mnist', 'path/to/mnist', 'train')  # uint8 (N, C, H, W), int64 (N,)
    x, y = get_batch(images, labels, 64, torch.Generator().manual_seed(0))  # float in [-1, 1]
    save_grid(to_uint8(x), 'batch.png', nrow=8)
    digits, labels = load_dataset('moving_mnist', 'path/to/mnist', 'train')  # MNIST digits, halved
    images, labels = load_dataset('folder', 'path/to/pictures', 'train', img_size=64)  # train/<class>/*
    v, y = moving_mnist_batch(digits, labels, 8, torch.Generator().manual_seed(0))  # (8, T, 1, 32, 32)

A missing file is downloaded into data_dir from the official mirrors; every file is checked against a
known checksum before use, so a corrupt or truncated one is a DataError naming it and the fix, not a crash.
"""

import contextlib
import gzip
import hashlib
import io
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

# name -> (image size, channels) of what the model sees: for moving_mnist the video frames
# (load_dataset returns the 14x14 digits they are made from); a folder's come from its images
DATASET_SHAPES = {'mnist': (28, 1), 'cifar10': (32, 3), 'moving_mnist': (32, 1)}
DATASETS = (*DATASET_SHAPES, 'folder')
CLASS_NAMES = {'cifar10': ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')}
FOLDER_TEST_SHARE = 0.1  # a folder without test/: this share of train/, drawn with seed 0, is held out
# Moving MNIST: one MNIST digit, halved to 14x14, moving with a constant velocity of 1 to
# MAX_SPEED pixels a frame on each axis and bouncing off the edges of a 32x32 frame (18
# pixels of room). 8 frames of 4x4 patches of 8x8 pixels: 16 tokens a frame, so the training
# sequence (15 blocks) is 240 tokens and a 2-core CPU learns the motion in well under an hour.
VIDEO_FRAMES = {'moving_mnist': 8}  # video datasets -> frames per video
MAX_SPEED = 3
LOG_COLUMNS = ('iter', 'loss', 'lr', 'ms_per_step', 'test_loss', 'ema_test_loss', 'elapsed_s')  # train.py's log.csv


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or could not be downloaded."""


# For MNIST the checksum is the sha256 of the *decompressed* idx file, because the bytes
# of the .gz differ between mirrors while the contents do not. For CIFAR-10 it is the md5
# of the archive, as published on its download page. The tests swap in their own.
CHECKSUMS = {
    'train-images-idx3-ubyte': ('sha256', 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db'),
    'train-labels-idx1-ubyte': ('sha256', '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5'),
    't10k-images-idx3-ubyte': ('sha256', '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7'),
    't10k-labels-idx1-ubyte': ('sha256', 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2'),
    'cifar-10-python.tar.gz': ('md5', 'c58f30108f718f92721af3b95e74349a')}
MNIST_FILES = {  # split -> (images, labels); on disk as NAME or NAME.gz
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
MNIST_MIRRORS = [  # tried in order; each serves NAME.gz under this prefix
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
    'https://storage.googleapis.com/cvdf-datasets/mnist/']
CIFAR10_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR10_URLS = ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz']

# -----------------------------------------------------------------------------
# reading the datasets: checksums, downloads, the MNIST and CIFAR-10 formats

def _read_checked(name, path, gz, shown=None):
    """The bytes of the file at path (decompressed, if gz), after checking that they have the
    checksum recorded for name. Errors name it as path and say how to fix it, or for a
    download (just reported, then the next url is tried) name it as shown."""
    advice = '' if shown else ' Delete it (it is then downloaded again) or replace it with a good copy.'
    shown = shown or path
    try:
        with (gzip.open if gz else open)(path, 'rb') as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{shown} is not a valid gzip file ({e}).{advice}") from None
    algo, expected = CHECKSUMS[name]
    if (actual := hashlib.new(algo, data).hexdigest()) != expected:
        raise DataError(f"{shown} is corrupt or not the expected file: {algo} of "
                        f"{'its decompressed contents' if gz else 'it'} is {actual}, "
                        f"expected {expected}.{advice}")
    return data


def download(url, path):
    """Fetch url into path. Kept as its own function so that tests can replace it."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, 'wb') as f:
        shutil.copyfileobj(response, f)


def _load_file(name, path, gz, urls, howto):
    """The checked bytes of path (decompressed, if gz). A missing file is first downloaded from
    the first of urls that gives a good copy; if none does, DataError ends with howto."""
    if os.path.exists(path):
        return _read_checked(name, path, gz)
    directory = top = os.path.abspath(os.path.dirname(path))
    if os.path.isdir(os.path.join(directory, 'train')):  # images in class folders: not a place to download to
        raise DataError(f"{directory} holds a train/ folder, not {os.path.basename(path)}: for images in class "
                        f"folders pass --dataset=folder")
    while not os.path.isdir(top):  # the deepest existing directory: all a failed download leaves
        top = os.path.dirname(top)
    os.makedirs(directory, exist_ok=True)
    errors = []
    for url in urls:
        # Download to a temp file beside path and rename it into place once checked: the
        # rename is atomic, so path is never a half-written file, even if we are killed.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.download-', suffix='.part')
        os.close(fd)
        try:
            print(f'downloading {url} -> {path}')
            download(url, tmp)
            data = _read_checked(name, tmp, gz, f'the downloaded {os.path.basename(path)}')
            os.replace(tmp, path)
            return data
        except Exception as e:  # any failure (no network, 404, bad checksum): try the next url
            errors.append(f'{url}: {e}')
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with contextlib.suppress(OSError):  # not empty after all (another process wrote there): keep it
        while directory != top:
            os.rmdir(directory)
            directory = os.path.dirname(directory)
    raise DataError(f"could not download {os.path.basename(path)} ({'; '.join(errors)}). {howto}")


def parse_idx(data, name, ndim):
    """Parse an idx file (the MNIST format) of ndim-d uint8 data: the magic number
    0x0800 | ndim and then each dimension as big-endian uint32s, then the values in C order."""
    magic, header = 0x0800 | ndim, 4 + 4 * ndim
    got = struct.unpack('>I', data[:4])[0] if len(data) >= 4 else None
    if got != magic or len(data) < header:
        raise DataError(f"{name}: not an idx file of {ndim}-d uint8 data "
                        f"(magic number {'missing' if got is None else hex(got)}, expected {hex(magic)})")
    dims, body = struct.unpack(f'>{ndim}I', data[4:header]), data[header:]
    if len(body) != math.prod(dims):
        raise DataError(f"{name}: header says {'x'.join(map(str, dims))} = {math.prod(dims)} values "
                        f"but the file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()  # a writable copy, for torch


def _load_mnist(data_dir, split):
    arrays = []
    for name, ndim in zip(MNIST_FILES[split], (3, 1)):  # images, then labels
        path = os.path.join(data_dir, name)
        gz = not os.path.exists(path)  # read NAME if present, else NAME.gz, downloading it if missing
        urls = [m + name + '.gz' for m in MNIST_MIRRORS]
        data = _load_file(name, path + '.gz' if gz else path, gz, urls, (
            f"Place {name}.gz (or the decompressed {name}) in the directory {os.path.abspath(data_dir)}, "
            f"e.g. from {urls[0]}, or set --data_dir to where it is. MNIST needs all "
            f"four files: {', '.join(n + '.gz' for pair in MNIST_FILES.values() for n in pair)}."))
        arrays.append(parse_idx(data, name, ndim))
    (images_name, labels_name), (images, labels) = MNIST_FILES[split], arrays
    if len(images) != len(labels):
        raise DataError(f"{images_name} has {len(images)} images but {labels_name} has {len(labels)} labels")
    return images[:, None], labels  # (N, 1, 28, 28): grayscale, one channel


def _load_cifar10(data_dir, split):
    path = os.path.join(data_dir, CIFAR10_ARCHIVE)
    archive = _load_file(CIFAR10_ARCHIVE, path, False, CIFAR10_URLS, (
        f"Place {CIFAR10_ARCHIVE} (the 'CIFAR-10 python version', not extracted) in the directory "
        f"{os.path.abspath(data_dir)}, e.g. from {CIFAR10_URLS[0]}, or set --data_dir to where it is."))
    wanted = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    batches = {}
    # pickle can run code when loading, which is fine here only because we unpickle the very
    # bytes whose md5 was just checked to be the official one. Members are read in archive
    # order: asking a .tar.gz for them by name would decompress it from the start for each.
    with tarfile.open(fileobj=io.BytesIO(archive), mode='r:gz') as tar:
        for member in tar:
            n = member.name.rsplit('/', 1)[-1]
            if member.name.startswith('cifar-10-batches-py/') and n in wanted:
                batches[n] = pickle.load(tar.extractfile(member), encoding='bytes')
    missing = [n for n in wanted if n not in batches]
    if missing:
        raise DataError(f"{path} lacks cifar-10-batches-py/{', '.join(missing)}; is it the python version?")
    images, labels = [], []
    for n in wanted:  # in this fixed order, whatever the order in the archive
        data, batch_labels = np.asarray(batches[n][b'data'], dtype=np.uint8), batches[n][b'labels']
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(f"{path}: {n} has data of shape {data.shape} and {len(batch_labels)} labels, "
                            f"expected (N, 3072) and N labels")
        images.append(data.reshape(-1, 3, 32, 32))  # a row: the red 32x32 plane, then green, then blue
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _class_folders(root):
    """The sorted names of root's subfolders (hidden ones skipped): the classes of a folder dataset."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))


def _decode_folder(root, classes, img_size, channels, every_class):
    """Every image in root/<class>/ for the given classes, decoded: uint8 (N, C, S, S), int64 (N,),
    labels the classes' places in `classes` (every_class: each has a non-empty folder). img_size > 0
    crops each to its central square and resizes it to that; channels 0: 1 if every image is gray, else 3."""
    from PIL import Image, ImageOps
    extra = sorted(set(_class_folders(root)) - set(classes))
    if extra:
        raise DataError(f"{root} has class folders that train/ lacks: {', '.join(extra)}")
    files = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        names = sorted(f for f in os.listdir(folder) if not f.startswith('.')) if os.path.isdir(folder) else []
        if not names and every_class:
            raise DataError(f"{folder}: no images (every class folder in train/ needs some)")
        files += [(os.path.join(folder, f), label) for f in names]
    if not files:
        raise DataError(f"{root}: no images in its class folders")

    def read(path, what):  # what(image) for the image at path; an unreadable file is named
        try:
            with Image.open(path) as img:
                return what(img)
        except Exception as e:  # Pillow raises many kinds: not an image, truncated, unsupported
            raise DataError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None

    print(f'reading {len(files)} images in {root} ...', flush=True)  # tens of seconds for 60,000
    headers = [read(path, lambda img: (img.size, img.mode)) for path, _ in files]  # no pixels decoded yet
    channels = channels or (1 if all(mode in ('1', 'L', 'I', 'I;16', 'F') for _, mode in headers) else 3)
    if not img_size:  # one common square size, or the user says which
        (w, h), _ = headers[0]
        odd = next((f'{path} is {s[0]}x{s[1]}' for (path, _), (s, _) in zip(files, headers) if s != (w, h)), '')
        if odd or w != h:
            raise DataError(f"{root}: the images are not all one square size ({files[0][0]} is {w}x{h}"
                            f"{', ' + odd if odd else ''}): pass --img_size=N to crop each to its central "
                            f"square and resize it to NxN")
        img_size = w
    mode = 'L' if channels == 1 else 'RGB'
    arrays = [read(path, lambda img: np.asarray(ImageOps.fit(img.convert(mode), (img_size, img_size), Image.BICUBIC)))
              for path, _ in files]
    array = np.stack(arrays).reshape(len(arrays), img_size, img_size, channels).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array), np.array([label for _, label in files], dtype=np.int64)


def _load_folder(data_dir, split, img_size=0, channels=0):
    """Your own images: data_dir/train/<class>/* and, if there, data_dir/test/<class>/* (else FOLDER_TEST_SHARE of
    train, drawn with seed 0, is the test split and the rest trains). Labels are the sorted class folder names of
    train/; any file Pillow reads is an image. Decoded on every call (nothing cached that could go stale)."""
    train = os.path.join(data_dir, 'train')
    classes = _class_folders(train) if os.path.isdir(train) else []
    if len(classes) < 2:
        raise DataError(f"{train}: {'one class folder (' + classes[0] + ')' if classes else 'no class folders'}; "
                        f"expected {os.path.join(train, '<class>', '<image>')} for at least two classes "
                        f"(or set --data_dir)")
    test = os.path.join(data_dir, 'test')
    if split == 'test' and os.path.isdir(test):
        return _decode_folder(test, classes, img_size, channels, every_class=False)
    images, labels = _decode_folder(train, classes, img_size, channels, every_class=True)
    if os.path.isdir(test):
        return images, labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    n_test = max(1, round(FOLDER_TEST_SHARE * len(images)))
    keep = order[:n_test] if split == 'test' else np.sort(order[n_test:])
    return images[keep], labels[keep]

# -----------------------------------------------------------------------------
# the public entry point, pixels, batches and image grids

def load_dataset(name, data_dir, split, img_size=0, channels=0):
    """Load a whole split into memory, downloading it into data_dir first if missing.
    Returns (images, labels): a torch uint8 tensor (N, C, H, W) and a torch int64 tensor (N,).
    img_size and channels (0: from the images) are for 'folder' only."""
    assert split in ('train', 'test') and name in DATASETS
    if name == 'folder':
        images, labels = _load_folder(data_dir, split, img_size, channels)
    else:
        images, labels = (_load_cifar10 if name == 'cifar10' else _load_mnist)(data_dir, split)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    if name == 'moving_mnist':
        images = halve(images)
    n, c, h, w = images.shape
    what = f'digits {h}x{w} to move in {VIDEO_FRAMES[name]}-frame videos' if name in VIDEO_FRAMES \
        else f'images {h}x{w}x{c}'
    print(f'loaded {name} {split}: {n} {what} from {os.path.join(data_dir, "")}')
    return images, labels


def class_names(name, data_dir):
    """The names of labels 0, 1, ...: digits, CIFAR-10's classes (CLASS_NAMES) or a folder dataset's class folders."""
    return _class_folders(os.path.join(data_dir, 'train')) if name == 'folder' else list(CLASS_NAMES.get(name, '0123456789'))


def to_float(images):
    """uint8 pixels in [0, 255] -> float in [-1, 1], the range the diffusion model works in."""
    return images.float() / 127.5 - 1.0


def to_uint8(x):
    """The inverse of to_float, clamping whatever the model produced to valid pixels."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def get_batch(images, labels, batch_size, generator, hflip=False):
    """A random batch (with replacement, reproducible from generator, a CPU torch.Generator): float
    images (B, C, H, W) in [-1, 1] and their labels, on the dataset's device. hflip mirrors a random
    half of the images: fine for CIFAR's photos, not for digits, which are not symmetric."""
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
    if hflip:
        flip = (torch.rand(batch_size, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return to_float(x), y


def halve(images):
    """uint8 images (N, C, H, W) at half the size, each pixel the rounded mean of a 2x2 square:
    Moving MNIST's digits, 14x14, so that they have room to move in a 32x32 frame."""
    return torch.nn.functional.avg_pool2d(images.float(), 2).round().to(torch.uint8)


def moving_mnist(digits, generator, frames=VIDEO_FRAMES['moving_mnist'], size=32, max_speed=MAX_SPEED):
    """Videos (B, frames, 1, size, size) uint8 of digits (B, 1, d, d), each starting at a random
    place and moving by a random constant (vy, vx), 1..max_speed pixels a frame on each axis,
    bouncing off the edges: reproducible from generator (a CPU torch.Generator)."""
    B, d, room = len(digits), digits.shape[-1], size - digits.shape[-1]
    start = torch.randint(room + 1, (B, 1, 2), generator=generator)
    velocity = torch.randint(1, max_speed + 1, (B, 1, 2), generator=generator) * \
        (torch.randint(2, (B, 1, 2), generator=generator) * 2 - 1)
    pos = (start + velocity * torch.arange(frames)[:, None]) % (2 * room)      # (B, T, 2) unfolded
    pos = torch.where(pos > room, 2 * room - pos, pos).to(digits.device)       # folded: bounces
    rows, cols = (pos[..., axis, None] + torch.arange(d, device=digits.device) for axis in (0, 1))
    video = digits.new_zeros(B, frames, size, size)
    b, t = torch.arange(B)[:, None, None, None], torch.arange(frames)[None, :, None, None]
    video[b, t, rows[..., :, None], cols[..., None, :]] = digits[:, None, 0]  # (B, T, d, d) windows
    return video[:, :, None]


def moving_mnist_batch(digits, labels, batch_size, generator):
    """A random batch of Moving MNIST videos (B, T, 1, 32, 32), float in [-1, 1], and the labels
    of their digits; reproducible from generator, like get_batch."""
    idx = torch.randint(len(digits), (batch_size,), generator=generator)
    return to_float(moving_mnist(digits[idx.to(digits.device)], generator)), labels[idx.to(labels.device)]


def grid_array(images, nrow):
    """Images (B, C, H, W), uint8 or float in [-1, 1] -> one uint8 numpy array (rows*H, nrow*W, C)
    with nrow images per row, left to right then top to bottom, a last partial row padded black."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    B, C, H, W = images.shape
    rows = math.ceil(B / nrow)
    images = torch.cat([images.cpu(), images.new_zeros(rows * nrow - B, C, H, W, device='cpu')])
    grid = images.reshape(rows, nrow, C, H, W).permute(0, 3, 1, 4, 2)  # (rows, H, nrow, W, C)
    return grid.reshape(rows * H, nrow * W, C).numpy()


def save_grid(images, path, nrow=None):
    """Save images (B, C, H, W), float in [-1, 1] or uint8, as one grid of nrow per row (default:
    about square), in the format of path's extension (.png, .jpg, ...), its folder made if need be."""
    from PIL import Image  # imported here so that only saving images needs pillow
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    array = grid_array(images, nrow or math.ceil(math.sqrt(len(images))))
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def save_gif(frames, path, ms_per_frame=80, hold_last_ms=2000):
    """uint8 arrays (H, W, C) -> an animated GIF that loops, the last frame held longer."""
    from PIL import Image  # as in save_grid
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    h, w, c = frames[0].shape
    scale = max(1, min(256 // min(h, w), 1024 // max(h, w)))  # small grids: nearest-neighbour upscale
    images = [Image.fromarray(f[:, :, 0] if c == 1 else f).resize((w * scale, h * scale), Image.NEAREST) for f in frames]
    images[0].save(path, format='GIF', save_all=True, append_images=images[1:], loop=0,
                   duration=[ms_per_frame] * (len(images) - 1) + [hold_last_ms])


def write_log(out_dir, rows, new):
    """Add rows[-1], a dict of LOG_COLUMNS (test losses at evals only), to out_dir/log.csv: a new file if new or none
    is there, else at its end (rows a stopped run wrote after its last checkpoint stay; the resumed run's repeat their
    iters). After an eval, plot rows (each iter once) in out_dir/loss.png: the losses against iter, on a log scale."""
    from PIL import Image, ImageDraw  # as in save_grid
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'log.csv'), 'w' if new else 'a') as f:
        f.write(','.join(LOG_COLUMNS) + '\n' if f.tell() == 0 else '')  # a new file: the header first
        f.write(f"{rows[-1]['iter']}," + ','.join(f'{rows[-1][k]:.6g}' if k in rows[-1] else '' for k in LOG_COLUMNS[1:]) + '\n')
    if 'test_loss' not in rows[-1]:
        return
    curves = {'loss': (170, 170, 170), 'test_loss': (31, 119, 180), 'ema_test_loss': (214, 39, 40)}  # gray, blue, red
    logs = [math.log10(r[k]) for r in rows for k in curves if r.get(k, 0) > 0]  # room around them; at least 2x
    lo, hi, last = min(logs) - 0.02, max(max(logs), min(logs) + 0.3) + 0.02, max(1, rows[-1]['iter'])
    img = Image.new('RGB', (640, 400), 'white')
    draw = ImageDraw.Draw(img)

    def xy(it, loss):  # the frame: 60 pixels on the left for the loss ticks, 40 below for the iter ones
        return 60 + 560 * it / last, 370 - 340 * (math.log10(loss) - lo) / (hi - lo)
    for v in [m * 10 ** e for e in range(math.floor(lo), math.ceil(hi)) for m in ((1, 2, 5) if hi - lo > 1 else range(1, 10))]:
        if lo < math.log10(v) < hi:  # a tick: a line across, its loss on the left
            draw.line([xy(0, v), xy(last, v)], fill=(225, 225, 225))
            draw.text((55 - draw.textlength(f'{v:g}'), xy(0, v)[1] - 6), f'{v:g}', fill='black')
    for it in (0, last // 2, last):
        draw.text((xy(it, 10 ** lo)[0] - draw.textlength(str(it)) / 2, 374), str(it), fill='black')
    draw.rectangle([xy(0, 10 ** hi), xy(last, 10 ** lo)], outline='black')
    for key, colour in curves.items():
        draw.line([xy(r['iter'], r[key]) for r in rows if r.get(key, 0) > 0], fill=colour, width=2 if 'test' in key else 1)
    draw.text((60, 8), 'loss (log scale) against iter: training (gray), test (blue), test of the EMA (red)', fill='black')
    img.save(os.path.join(out_dir, 'loss.png'))
