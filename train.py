"""
Train an ACDiT model on MNIST or CIFAR-10.

    python train.py                                  # MNIST with the defaults below
    python train.py config/mnist_gpu.py              # a config file overrides the defaults
    python train.py config/cifar10.py --batch_size=64   # ...and --key=value overrides both
    python train.py --help                           # list every key with its default

Everything configurable is a module-level global in the block right below, nanoGPT
style. This file also holds the small pieces the training loop needs (config parsing,
dataset loading, checkpoint I/O, device choice) as plain top-level functions, so that
`import train` is cheap and side-effect free and the tests can call them directly.
"""

import ast
import builtins
import dataclasses
import difflib
import functools
import gzip
import hashlib
import math
import os
import pickle
import re
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import threading
import time
import types
import urllib.request
import zipfile
import zlib
from contextlib import nullcontext

import numpy as np
import torch

import acdit

# Every name bound between here and `DEFAULTS = ...` is a config key. Remembering which
# globals existed before lets us collect the keys without listing them twice.
_globals_before_config = set(globals())
# ----------------------------------------------------------------------------- config start
# --- I/O ---
out_dir = 'out'  # the checkpoint and sample grids go here (progress is printed, not saved)
init_from = 'scratch'  # 'scratch' (new model) or 'resume' (from out_dir/ckpt.pt)
eval_interval = 1000  # evaluate the test loss (and save a checkpoint) every this many steps
eval_iters = 20  # test batches (of 32 images, whatever batch_size is) averaged per evaluation
log_interval = 200  # print the training loss every this many steps
sample_interval = 6000  # save a grid of samples every this many steps
# --- data ---
dataset = 'mnist'  # 'mnist' or 'cifar10'
data_dir = 'data'  # where the dataset files are (downloaded there when missing)
# --- model shape ---
patch_size = 4  # each token is a patch_size x patch_size patch of pixels
block_h = 1  # a block (the unit of autoregression) is block_h x block_w patches...
block_w = 7  # ...so 1x7 patches of 4x4 pixels is one row of a 28x28 MNIST image
depth = 3  # transformer layers (3 beat 4 in 20 minutes on 2 CPU cores: shallower, so more steps)
width = 128  # model dimension
n_heads = 4  # attention heads (width must be divisible by n_heads)
rope_base = 100.0  # 2D RoPE frequency base (100 beat 10000 on the 7x7 MNIST grid: class accuracy 0.71 vs 0.62)
min_snr_gamma = 1.0  # Min-SNR-gamma loss weights (1 beat 2 and 5; at CFG 2 class accuracy 0.64 -> 0.91 in the 4-layer CPU recipe); 0 = plain eps-MSE as in the paper
label_dropout = 0.1  # drop the class label this often in training, for classifier-free guidance
# --- training ---
max_iters = 24000  # total optimizer steps (about 18 minutes on 2 CPU cores with these defaults)
batch_size = 8  # images per optimizer step (small batches, many steps: compiled, 8 did best in 20 minutes on 2 CPU cores)
learning_rate = 3e-3  # peak learning rate (AdamW); QK-norm and grad clipping keep this high lr stable
warmup_iters = 800  # linear warmup from ~0 to learning_rate over this many steps
decay_frac = 0.5  # warmup-stable-decay: decay linearly during the last decay_frac of max_iters (0.5 beat 0.2 in a short CPU run)
min_lr_frac = 0.1  # ...down to learning_rate * min_lr_frac
weight_decay = 0.0  # AdamW weight decay
grad_clip = 1.0  # clip the global gradient norm to this (0.0 disables clipping)
ema_decay = 0.999  # exponential moving average of the weights, used for sampling
# --- sampling ---
cfg_scale = 2.0  # classifier-free guidance scale (1.0 = no guidance); higher: surer class, less variety
sampler = 'ddpm'  # 'ddpm' (ancestral) or 'ddim' (deterministic), for the sample grids
sample_steps = 50  # denoising steps per block when sampling
# --- system ---
seed = 1337  # seeds torch and the batch sampler
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'
dtype = 'bfloat16'  # 'float32' or 'bfloat16'; bfloat16 autocast is used on CUDA only, float32 elsewhere
compile = True  # torch.compile the training step: ~45 s to start, then ~1.2x faster on a 2-core CPU; without a working compiler it warns and trains eagerly
attn_backend = 'auto'  # 'auto', 'flex' (FlexAttention) or 'sdpa' (scaled_dot_product_attention)
# ----------------------------------------------------------------------------- config end
DEFAULTS = {k: v for k, v in globals().items()
            if k not in _globals_before_config and not k.startswith('_')}

# String keys that only make sense with a handful of values: checked up front so that a
# typo fails in the first second, not after the dataset has loaded.
CHOICES = {
    'dataset': ('mnist', 'cifar10'),
    'init_from': ('scratch', 'resume'),
    'device': ('auto', 'cpu', 'cuda', 'mps'),
    'dtype': ('float32', 'bfloat16'),
    'attn_backend': ('auto', 'flex', 'sdpa'),
    'sampler': ('ddpm', 'ddim'),
}

# A checkpoint can only be resumed by a run whose model has the same shape and data.
MODEL_KEYS = ('dataset', 'patch_size', 'block_h', 'block_w', 'depth', 'width', 'n_heads', 'rope_base')
# Keys that change what training does without changing the model's shape: a resumed run may
# change them (say, a longer max_iters) but is told so, since it no longer continues the same
# run. A checkpoint lacking a key predates it and trained with the value given here.
TRAINING_KEYS = {'min_snr_gamma': 0.0, 'label_dropout': None, 'max_iters': None, 'batch_size': None,
                 'learning_rate': None, 'warmup_iters': None, 'decay_frac': None, 'min_lr_frac': None,
                 'weight_decay': None, 'grad_clip': None, 'ema_decay': None}


# -----------------------------------------------------------------------------
# configuration

class ConfigError(ValueError):
    """A bad command line or config file. Shown to the user as a one-line error."""


def _valid_keys(defaults):
    return 'valid keys: ' + ', '.join(sorted(defaults))


def _coerce(value, default):
    """Return value if it has the type of default (int is fine for a float), else None.
    bool is checked first because in Python True is also an int, and --compile=1 or
    --depth=True are much more likely mistakes than intent."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        return None
    if isinstance(value, bool):
        return None
    if isinstance(default, int):
        return value if isinstance(value, int) else None
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) else None
    if isinstance(default, str):
        return value if isinstance(value, str) else None
    return None


def _set(config, defaults, key, value, source, choices):
    """Type-check value against the default of key and store it in config."""
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ''
        raise ConfigError(f"unknown config key '{key}' from {source}{hint}; {_valid_keys(defaults)}")
    default = defaults[key]
    coerced = _coerce(value, default)
    if coerced is None:
        want = type(default).__name__ + (' (True/False/true/false)' if isinstance(default, bool) else '')
        raise ConfigError(f"{key}={value!r} from {source} has type {type(value).__name__}, expected {want} "
                          f"like the default {key}={default!r}; {_valid_keys(defaults)}")
    if key in choices and coerced not in choices[key]:
        raise ConfigError(f"{key}={coerced!r} from {source} is not one of {', '.join(map(repr, choices[key]))}")
    config[key] = coerced


def _parse_value(text, default):
    """Turn the text after '=' into a Python value: a literal if it parses as one
    (3, 1e-3, True, 'x'), else the plain string, so --out_dir=out-mnist needs no quotes.
    For string keys a bare word always stays a string (--out_dir=1 means the folder "1")."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def parse_config(argv, defaults, choices=CHOICES):
    """Apply config files (positional args ending in .py) and --key=value args, in the
    order given, on top of a copy of defaults; return the resulting dict.
    Anything wrong (unknown key, wrong type, a value outside `choices`[key], missing file)
    raises ConfigError. Other scripts pass their own choices (or none) and check values themselves."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"expected --key=value, got '{arg}'; {_valid_keys(defaults)}")
            _set(config, defaults, key, _parse_value(text, defaults.get(key)), f"'{arg}'", choices)
        elif arg.endswith('.py'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            with open(arg) as f:
                source = f.read()
            # A config file is plain Python run with the current config as its globals,
            # so it can also compute values (e.g. batch_size = 2 * batch_size).
            namespace = dict(config)
            try:
                # builtins.compile: the config key `compile` shadows the builtin in this module
                exec(builtins.compile(source, arg, 'exec'), namespace)
            except SyntaxError as e:
                raise ConfigError(f"config file '{arg}' line {e.lineno}: {e.msg}") from None
            for key, value in namespace.items():
                # skip Python's own __builtins__ and any helpers the file imported
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                if key in config and value is config[key]:
                    continue  # untouched by the file
                _set(config, defaults, key, value, f"config file '{arg}'", choices)
        else:
            raise ConfigError(f"unexpected argument '{arg}': use --key=value or a config file ending in .py")
    return config


def format_help(defaults):
    """Usage text: every key with its default and its comment, grouped as in the config
    block at the top of this file (read from the source, so it never goes stale)."""
    lines = [(__doc__ or 'train.py').strip().splitlines()[0], '',
             'usage: python train.py [config.py ...] [--key=value ...]', '']
    try:
        with open(__file__) as f:
            source = f.read().splitlines()
    except OSError:
        source = []
    shown, inside = set(), False
    for line in source:
        if line.startswith('#') and line.endswith('config start'):
            inside = True
        if line.startswith('#') and line.endswith('config end'):
            break
        if not inside:
            continue
        group = re.match(r'^# --- (.*) ---$', line)
        key = re.match(r'^(\w+) = .*?(?:\s+#\s*(.*))?$', line)
        if group:
            lines.append(f'{group.group(1)}:')
        elif key and key.group(1) in defaults:
            name = key.group(1)
            shown.add(name)
            lines.append(f'  --{name}={defaults[name]!r}'.ljust(34) + f'  {key.group(2) or ""}'.rstrip())
    for name in sorted(set(defaults) - shown):  # in case the source could not be read
        lines.append(f'  --{name}={defaults[name]!r}')
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# data: MNIST and CIFAR-10, read with numpy and the standard library only

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


def _digest(data_or_path, algo):
    """Hex digest of a bytes object, or of a file read in chunks (CIFAR is 170 MB)."""
    h = hashlib.new(algo)
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        h.update(data_or_path)
    else:
        with open(data_or_path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                h.update(chunk)
    return h.hexdigest()


_REPLACE_ADVICE = 'Delete it (it is then downloaded again) or replace it with a good copy.'


def _verify(name, data_or_path, shown_path, advice=_REPLACE_ADVICE):
    """Raise DataError unless the bytes (or the file) have the checksum recorded for name."""
    algo, expected = CHECKSUMS[name]
    actual = _digest(data_or_path, algo)
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


def parse_idx(data, name, ndim):
    """Parse an idx file (the MNIST format): 2 zero bytes, a type byte (0x08 = uint8),
    a byte with the number of dimensions, then each dimension as a big-endian uint32,
    then the values in C order."""
    magic = 0x0800 | ndim
    if len(data) < 4 + 4 * ndim or struct.unpack('>I', data[:4])[0] != magic:
        got = struct.unpack('>I', data[:4])[0] if len(data) >= 4 else None
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
    howto = (f"Place {name}.gz (or the decompressed {name}) in the directory {os.path.abspath(data_dir)}, "
             f"e.g. from {MNIST_MIRRORS[0]}{name}.gz, or set --data_dir to where it is. MNIST needs all "
             f"four files: {', '.join(n + '.gz' for pair in MNIST_FILES.values() for n in pair)}.")
    if not os.path.exists(raw) and not os.path.exists(gz):

        def check(tmp):  # a download is only kept if it decompresses to the right bytes
            with open(tmp, 'rb') as f:
                _verify(name, gzip.decompress(f.read()), 'the downloaded ' + name + '.gz', advice='')

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


def _load_cifar10(data_dir, split):
    path = os.path.join(data_dir, CIFAR10_ARCHIVE)
    howto = (f"Place {CIFAR10_ARCHIVE} (the 'CIFAR-10 python version', not extracted) in the directory "
             f"{os.path.abspath(data_dir)}, e.g. from {CIFAR10_URLS[0]}, or set --data_dir to where it is.")
    if not os.path.exists(path):
        def check(tmp):  # a download is only kept if its md5 is right
            _verify(CIFAR10_ARCHIVE, tmp, 'the downloaded ' + CIFAR10_ARCHIVE, advice='')

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
        data = np.asarray(batches[n][b'data'], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batches[n][b'labels']):
            raise DataError(f"{path}: {n} has data of shape {data.shape} and {len(batches[n][b'labels'])} labels, "
                            f"expected (N, 3072) and N labels")
        # each row is 1024 red values, then 1024 green, then 1024 blue, each a 32x32 image
        # in row-major order: exactly a (3, 32, 32) channel-first array
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batches[n][b'labels'], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_dataset(name, data_dir, split):
    """Load a whole split into memory, downloading it into data_dir first if missing.
    Returns (images, labels): a torch uint8 tensor (N, C, H, W) and a torch int64 tensor (N,)."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == 'mnist':
        images, labels = _load_mnist(data_dir, split)
    elif name == 'cifar10':
        images, labels = _load_cifar10(data_dir, split)
    else:
        raise ValueError(f"unknown dataset {name!r}, expected 'mnist' or 'cifar10'")
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


def save_grid(images, path, nrow=None):
    """Save a batch of images (float in [-1, 1] or uint8, shape (B, C, H, W)) as one PNG
    grid with nrow images per row (default: about square)."""
    from PIL import Image  # imported here so that only sampling needs pillow
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(c, ncol * h, nrow * w, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i].cpu()
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)


# -----------------------------------------------------------------------------
# learning rate schedule

def get_lr(it, max_iters, learning_rate, warmup_iters, decay_frac, min_lr_frac):
    """Warmup-stable-decay: linear warmup for warmup_iters steps, then flat at
    learning_rate, then a linear decay to learning_rate * min_lr_frac over the last
    decay_frac of the run. Unlike cosine, the flat phase does not depend on max_iters,
    so a run can be extended and only the final decay needs redoing."""
    min_lr = learning_rate * min_lr_frac
    decay_start = max_iters - int(decay_frac * max_iters)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it < decay_start:
        return learning_rate
    progress = min(1.0, (it - decay_start) / max(1, max_iters - decay_start))
    return learning_rate + progress * (min_lr - learning_rate)


# -----------------------------------------------------------------------------
# checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit this run."""


def save_checkpoint(path, obj):
    """torch.save obj to path atomically: write a temp file in the same directory, flush
    it to disk, then rename it over path. A crash (or a full disk) mid-save leaves the
    previous checkpoint intact instead of a truncated one."""
    directory = os.path.dirname(path) or '.'
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows, as both paths are on one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location='cpu'):
    """torch.load a checkpoint saved by save_checkpoint, with every way that can fail
    turned into a CheckpointError that names the file. weights_only=True (torch's safe
    loader) accepts tensors, dicts, lists, numbers and strings: keep checkpoints to those."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: init_from='resume' needs one; "
                              f"start with --init_from=scratch or point --out_dir at an earlier run")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the very end
        raise CheckpointError(f"could not read checkpoint {path}: not a complete torch.save archive, so "
                              f"it is probably truncated or corrupt (or not a checkpoint at all). Delete "
                              f"or replace it (to train anew: --init_from=scratch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, EOF, ...: all mean we cannot use it
        first_line = (str(e).strip().splitlines() or [''])[0]
        if 'Weights only load failed' in str(e):  # readable, but holds a type the safe loader refuses
            advice = ('It holds an object that torch.load(weights_only=True) refuses: '
                      'save only tensors, dicts, lists, numbers and strings in checkpoints')
        else:
            advice = 'It is probably truncated or corrupt: delete it, or start with --init_from=scratch'
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {first_line}). {advice}") from e


def check_compatible(ckpt_config, config, keys=MODEL_KEYS, path='the checkpoint'):
    """Raise CheckpointError listing each key in keys whose value in the checkpoint's
    config differs from this run's, e.g. when resuming with a different --depth."""
    diffs = [f"checkpoint has {k}={ckpt_config.get(k, '<missing>')!r}, this run asks {k}={config.get(k)!r}"
             for k in keys if ckpt_config.get(k) != config.get(k)]
    if diffs:
        fix = ' '.join(f'--{k}={ckpt_config[k]!r}' for k in keys
                       if k in ckpt_config and ckpt_config[k] != config.get(k))
        raise CheckpointError(f"cannot resume from {path}: " + '; '.join(diffs) +
                              f". Run with the checkpoint's values ({fix}), or train a new model "
                              f"with --init_from=scratch (and another --out_dir to keep this one)")


# -----------------------------------------------------------------------------
# device

def pick_device(name):
    """'auto' -> the best available of cuda, mps, cpu; otherwise exactly the device asked
    for, with a clear error (not a crash deep inside the first .to()) if it is missing."""
    has_mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if has_mps else 'cpu')
    available = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': has_mps}
    if name not in available:
        raise ConfigError(f"unknown device {name!r}, expected one of 'auto', 'cpu', 'cuda', 'mps'")
    if not available[name]:
        raise ConfigError(f"device={name!r} is not available with this PyTorch ({torch.__version__}) on this "
                          f"machine; use --device=auto or --device=cpu")
    return torch.device(name)


def autocast_context(device, dtype):
    """bfloat16 autocast on CUDA when asked for (and supported); plain float32 elsewhere,
    where bf16 autocast is either slow (CPU) or patchy (MPS)."""
    if device.type == 'cuda' and dtype == 'bfloat16' and torch.cuda.is_bf16_supported():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def compile_problem(device):
    """None if torch.compile works on this device, else why not (one line). torch.compile
    generates C++ (CPU) or Triton (CUDA) code and builds it on first use; a machine without
    a C++ compiler, or a backend that does not support the device, fails there. Compiling a
    two-op function finds out in a few seconds, before training starts, and the same way on
    every DDP rank."""
    try:
        probe = torch.compile(lambda x: (x * 2.0).sin(), dynamic=False)
        probe(torch.ones(4, device=device))
        return None
    except Exception as e:  # whatever the toolchain raises; the message says what is missing
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        torch._dynamo.reset()  # forget the failed attempt
        return f'{type(e).__name__}: {first_line[:300]}'


# -----------------------------------------------------------------------------
# training

DATASET_SHAPES = {'mnist': (28, 1), 'cifar10': (32, 3)}  # image size, channels
# accelerators whose random generator a checkpoint saves besides the CPU's (torch.cuda, torch.mps)
DEVICE_RNG = {'cuda': torch.cuda, 'mps': torch.mps}


def model_config(config):
    """The acdit.ACDiTConfig this run's config describes (ValueError if it is impossible)."""
    img_size, channels = DATASET_SHAPES[config['dataset']]
    return acdit.ACDiTConfig(
        img_size=img_size, in_channels=channels, patch_size=config['patch_size'],
        block_h=config['block_h'], block_w=config['block_w'], depth=config['depth'],
        width=config['width'], n_heads=config['n_heads'], rope_base=config['rope_base'], n_classes=10,
        label_dropout=config['label_dropout'], min_snr_gamma=config['min_snr_gamma'],
        attn_backend=config['attn_backend'])


class TrainingLoss(torch.nn.Module):
    """model.training_loss as a forward(), so DistributedDataParallel and torch.compile,
    which both act on forward(), see the whole training computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs, labels):
        return self.model.training_loss(imgs, labels)


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def ema_decay_at(it, ema_decay):
    """EMA warm-up: average over at most ~it/10 steps early on, so that the EMA model of a
    short run is not dominated by its random initialization."""
    return min(ema_decay, (1.0 + it) / (10.0 + it))


EVAL_BATCH_SIZE = 32  # images per test batch in estimate_loss


@torch.no_grad()
def estimate_loss(models, images, labels, eval_iters, ctx):
    """Mean eps-MSE (unweighted) of each model on the same eval_iters fixed test batches, with the
    same fixed timesteps, noise and label dropout: comparable from one eval to the next, and
    between runs with another batch_size (the eval batches do not depend on it)."""
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(images, labels, EVAL_BATCH_SIZE, gen) for _ in range(eval_iters)]
    out = []
    # torch.manual_seed below reseeds every device, so fork (save and restore) the RNG of the
    # device in use: always the CPU's, plus CUDA's or MPS's when the data lives there
    on_cpu = images.device.type == 'cpu'
    with torch.random.fork_rng(devices=[] if on_cpu else [images.device],
                               device_type=None if on_cpu else images.device.type):
        for m in models:
            m.eval()
            torch.manual_seed(0)
            with ctx:
                out.append(sum(m.training_loss(x, y, weighted=False).item() for x, y in batches) / len(batches))
            m.train()
    return out


def sample_grid(model, path, cfg, dev, n_per_class=10):
    """A grid of samples, one row per class, with a fixed seed (comparable across evals)."""
    labels = torch.arange(10, device=dev).repeat_interleave(n_per_class)
    gen = torch.Generator(device=dev).manual_seed(0)
    imgs = acdit.sample(model, labels, cfg_scale=cfg.cfg_scale, sampler=cfg.sampler,
                        steps=cfg.sample_steps, generator=gen)
    save_grid(imgs, path, nrow=n_per_class)


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(format_help(DEFAULTS))
        return
    config = parse_config(argv, DEFAULTS)
    cfg = types.SimpleNamespace(**config)  # cfg.batch_size reads better than config['batch_size']
    try:
        mcfg = model_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ('max_iters', 'batch_size', 'eval_interval', 'eval_iters', 'log_interval',
                'sample_interval', 'sample_steps'):
        if getattr(cfg, key) < 1:
            raise ConfigError(f'{key}={getattr(cfg, key)} must be at least 1')

    # torchrun sets RANK/WORLD_SIZE: one process per GPU (or per CPU worker with gloo)
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        if cfg.device in ('auto', 'cuda') and torch.cuda.is_available():
            dev = torch.device(f'cuda:{local_rank}')
            torch.cuda.set_device(dev)
        else:
            dev = pick_device('cpu' if cfg.device == 'auto' else cfg.device)
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    else:
        rank, world = 0, 1
        dev = pick_device(cfg.device)  # before touching the disk, so a bad --device changes nothing
    if cfg.attn_backend == 'flex' and dev.type != 'cuda':
        raise ConfigError(f"attn_backend='flex' cannot train on {dev.type}: FlexAttention has no "
                          f"backward there. Use --attn_backend=sdpa (or auto)")
    master = rank == 0  # only rank 0 prints and writes files
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from == 'scratch' and os.path.exists(ckpt_path):  # never lose a run by accident
        raise ConfigError(f'{ckpt_path} already exists and a new run would overwrite it: continue that '
                          f'run with --init_from=resume (with a larger --max_iters to train longer), '
                          f'start anew in another --out_dir, or delete the file')
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    ctx = autocast_context(dev, cfg.dtype)
    log(f'device: {dev}{f" x{world} processes" if ddp else ""}, '
        f'dtype: {"bfloat16 autocast" if isinstance(ctx, torch.autocast) else "float32"}')

    # the whole dataset lives on the device as uint8 (47 MB for MNIST, 150 MB for CIFAR):
    # batches are then just an index, with no DataLoader or host-to-device copies
    train_images, train_labels = (t.to(dev) for t in load_dataset(cfg.dataset, cfg.data_dir, 'train'))
    test_images, test_labels = (t.to(dev) for t in load_dataset(cfg.dataset, cfg.data_dir, 'test'))
    hflip = cfg.dataset == 'cifar10'
    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)

    model = acdit.ACDiT(mcfg).to(dev)
    ema = acdit.ACDiT(mcfg).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    # fused AdamW updates all parameters in one kernel: on a 2-core CPU at batch 8 the default
    # per-tensor loop costs ~5 ms a step (about 8% of it), the fused one ~1 ms
    fused = True if dev.type in ('cpu', 'cuda') else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                  fused=fused)
    start_iter = 0
    if cfg.init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path, map_location=dev)
        # a model key the checkpoint's train config lacks (it predates the key, as rope_base
        # once did) is read from the model config saved beside it, which has every field
        built = ckpt.get('model_config') or {}
        ckpt_config = {**{k: built[k] for k in MODEL_KEYS if k in built}, **ckpt.get('config', {})}
        check_compatible(ckpt_config, config, path=ckpt_path)
        try:
            model.load_state_dict(ckpt['model'])
            ema.load_state_dict(ckpt['ema'])
            optimizer.load_state_dict(ckpt['optimizer'])
            for group in optimizer.param_groups:  # the saved one may come from another device
                group['fused'] = fused
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f'checkpoint {ckpt_path} does not fit this model: '
                                  f'{str(e).splitlines()[0]}') from None
        start_iter = ckpt['iter_num']
        saved_world = ckpt.get('world_size', 1)
        if saved_world == world:  # same layout: continue the exact random streams
            torch.set_rng_state(ckpt['rng']['torch'][rank].cpu())
            batch_gen.set_state(ckpt['rng']['batches'][rank].cpu())
            saved_device_rng = ckpt['rng'].get(dev.type, [])  # CUDA's or MPS's own generator
            if dev.type in DEVICE_RNG and len(saved_device_rng) > rank and saved_device_rng[rank].numel():
                DEVICE_RNG[dev.type].set_rng_state(saved_device_rng[rank].cpu())
        log(f'resumed from {ckpt_path} at iter {start_iter}')
        if saved_world != world:  # each process had its own streams: there is no way to split or merge them
            log(f'note: the checkpoint was written by {saved_world} process(es) and this run has {world}: '
                f'weights, optimizer and schedule continue, but the random streams (batches, noise, '
                f'timesteps) restart from seed={cfg.seed}, so this is not the run it would have been')
        changed = []
        for key, predates in TRAINING_KEYS.items():
            was = ckpt_config.get(key, predates)
            if was is not None and was != config[key]:
                changed.append(f'{key} {was!r} -> {config[key]!r}')
        if changed:
            log(f"note: this run changes the checkpoint's training settings: {', '.join(changed)} "
                f"(pass the checkpoint's values to continue the same run)")
        del ckpt
    log(f'model: {model.num_params() / 1e6:.2f}M parameters, {mcfg.n_blocks} blocks of '
        f'{mcfg.block_len} tokens, training sequence {mcfg.seq_len} tokens, '
        f'attention: {model.backend(dev)}')
    log('loss: eps-MSE' + (f' with Min-SNR-{mcfg.min_snr_gamma:g} weights (the logged loss is weighted; '
                           f'eval reports the plain eps-MSE)' if mcfg.min_snr_gamma else ' (unweighted)'))

    step_model = TrainingLoss(model)
    if cfg.compile:
        problem = compile_problem(dev)
        if problem is None:
            slow = ': about 45 s on a 2-core CPU' if dev.type == 'cpu' else ''
            log(f'compiling the model (the first steps are slow{slow})...')
            step_model = torch.compile(step_model)
        else:  # a missing compiler should not stop a laptop run: the eager model trains the same
            log(f'warning: torch.compile does not work here ({problem}); training without it, '
                f'about 1.2x slower on a CPU. Install a C++ compiler (gcc or clang) to use it, '
                f'or pass --compile=False to skip this check.')
    if ddp:
        step_model = DDP(step_model, device_ids=[dev.index] if dev.type == 'cuda' else None)

    def gather_rng():
        """Every rank's random state, so a resumed run continues each stream exactly."""
        none = torch.empty(0, dtype=torch.uint8)
        states = {'torch': torch.get_rng_state(), 'batches': batch_gen.get_state(),
                  **{kind: rng.get_rng_state() if dev.type == kind else none for kind, rng in DEVICE_RNG.items()}}
        if not ddp:
            return {k: [v] for k, v in states.items()}
        out = {}
        for k, v in states.items():
            parts = [None] * world
            dist.all_gather_object(parts, v)
            out[k] = parts
        return out

    def save(it):
        rng = gather_rng()  # every rank takes part in the gather
        if master:
            save_checkpoint(ckpt_path, {
                'model': model.state_dict(), 'ema': ema.state_dict(),
                'optimizer': optimizer.state_dict(), 'config': config,
                'model_config': dataclasses.asdict(mcfg), 'iter_num': it,
                'world_size': world, 'rng': rng})
            log(f'saved {ckpt_path} (iter {it})')

    if start_iter >= cfg.max_iters:
        log(f'nothing to do: the checkpoint is at iter {start_iter}, max_iters={cfg.max_iters}')

    # Ctrl-C (SIGINT) only asks to stop: the loop then stops between two steps, so the
    # checkpoint it saves never holds a half-applied step. Under torchrun every rank gets
    # the signal at a different point of its step, so the ranks first agree (in the
    # all-reduce after the forward pass) and all stop after the same step. A second
    # Ctrl-C in a single process stops at once, without saving.
    stop = {'asked': 0, 'agreed': False}

    def on_sigint(signum, frame):
        stop['asked'] += 1
        if stop['asked'] > 1 and not ddp:
            raise KeyboardInterrupt

    # (signal handlers can only be set from the main thread, e.g. not when main() runs in a thread)
    old_sigint = signal.signal(signal.SIGINT, on_sigint) \
        if threading.current_thread() is threading.main_thread() else None

    def check_finite(what, value):
        """Stop before a non-finite step is applied: the last checkpoint stays the last good one."""
        if not math.isfinite(value):
            log(f'error: {what} is {value} at iter {it}; stopping without saving. '
                f'The last good checkpoint (if any) is {ckpt_path}: resume from it with a '
                f'lower --learning_rate', file=sys.stderr)
            sys.exit(1)

    t_start = time.time()
    t_log, it_log = t_start, start_iter
    it = start_iter
    try:
        while it < cfg.max_iters:
            if stop['agreed'] or (stop['asked'] and not ddp):
                raise KeyboardInterrupt
            lr = get_lr(it, cfg.max_iters, cfg.learning_rate, cfg.warmup_iters,
                        cfg.decay_frac, cfg.min_lr_frac)
            for group in optimizer.param_groups:
                group['lr'] = lr
            x, y = get_batch(train_images, train_labels, cfg.batch_size, batch_gen, hflip)
            with ctx:
                loss = step_model(x, y)
            loss_value = loss.detach().float()
            if ddp:  # one tiny all-reduce: the loss averaged over the ranks (so a NaN on any rank
                # stops them all, together) and whether any rank was asked to stop
                flags = torch.stack([loss_value, torch.tensor(float(stop['asked'] > 0), device=dev)])
                dist.all_reduce(flags)  # a sum (gloo has no average)
                loss_value, stop['agreed'] = flags[0] / world, bool(flags[1] > 0)
            loss_value = loss_value.item()
            check_finite('loss', loss_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm is checked too: a finite loss can still give inf/nan gradients, which
            # would poison the weights (and the next checkpoint) one step before the loss shows it
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            check_finite('the gradient norm', grad_norm.item())
            optimizer.step()
            update_ema(ema, model, ema_decay_at(it, cfg.ema_decay))
            it += 1

            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                now = time.time()
                dt = (now - t_log) / max(1, it - it_log)
                t_log, it_log = now, it
                log(f'iter {it}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | '
                    f'{dt * 1000:.0f} ms/it | {cfg.batch_size * world / dt:.0f} img/s | '
                    f'elapsed {fmt_time(now - t_start)} | eta {fmt_time(dt * (cfg.max_iters - it))}')
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                if master:
                    raw, avg = estimate_loss([model, ema], test_images, test_labels, cfg.eval_iters, ctx)
                    log(f'eval @ {it}: test loss {raw:.4f}, ema {avg:.4f}')
                save(it)
            if master and (it % cfg.sample_interval == 0 or it == cfg.max_iters):
                path = os.path.join(cfg.out_dir, f'samples_{it:06d}.png')
                t0 = time.time()
                sample_grid(ema, path, cfg, dev)
                log(f'wrote {path} ({time.time() - t0:.1f}s)')
    except KeyboardInterrupt:
        if stop['asked'] > 1 and not ddp:  # Ctrl-C twice: maybe in the middle of a step
            log(f'\ninterrupted again: exiting without saving (the last checkpoint, if any, is {ckpt_path})')
        elif it > start_iter:  # stopped between two steps: iter `it` is the next step to run
            log(f'\ninterrupted at iter {it}; saving a checkpoint before exiting')
            save(it)
            launcher = f'torchrun --nproc_per_node={world}' if ddp else 'python'
            args = ' '.join(a for a in argv if not a.startswith('--init_from='))
            log(f'resume with: {launcher} train.py {args} --init_from=resume')
        sys.exit(130)
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
        if ddp:
            # Free DDP (which holds a reference to the process group) before destroying the
            # group: if DDP went last, the group's gloo threads would be joined while this
            # thread holds the GIL, and can deadlock at exit (seen with torch 2.13 on CPU).
            del step_model
            dist.destroy_process_group()
    if it > start_iter:
        log(f'done: {it} iters in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}')


if __name__ == '__main__':
    try:
        main()
    except ConfigError as e:  # a usage mistake: one line, no traceback, exit status 2 like argparse
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except (DataError, CheckpointError) as e:  # a problem with files on disk: also no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
