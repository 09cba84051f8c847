"""
Tests for generate.py (sampling from a checkpoint, prefix completion), bench.py (the
benchmark table and its token-forward counts), evaluate.py and judge.py (class accuracy,
FID and motion). Run with: python -m pytest -q test_generate.py

Most use a tiny MNIST-shaped checkpoint (28px, patch 7 -> a 4x4 token grid, 4 row blocks
of 4 tokens, depth 1, width 16) laid out as train.py writes one, with random weights: a
freshly initialized ACDiT outputs exactly zero (adaLN-Zero) and would sample the same
flat image for every seed and label. One fixture runs train.main for a few steps on the
real MNIST, to check that generate.py redraws the grid train.py saved; it and the tests
that read MNIST test images are skipped where the dataset is absent. Most tests call
main() in-process (fast); the exit-status checks run the scripts as subprocesses.

A user's mistake is checked by behaviour, not wording: a cli.ConfigError (exit status 2
from the command line) of one line that names the option or file, and nothing written.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import acdit
import bench
import cli
import data
import evaluate
import generate
import judge
import train
from cli import ConfigError
from test_data import MNIST_DIR, NO_MNIST, have_real_mnist, needs_real_mnist

REPO = Path(__file__).resolve().parent

TRAIN_DEFAULTS = {k: v[0] for k, v in train.OPTIONS.items()}
TINY = dict(dataset='mnist', patch_size=7, block_h=1, block_w=4, depth=1, width=16, n_heads=2,
            cfg_scale=1.5, sample_steps=4, sampler='ddim')  # sampling keys differ from train.py's defaults on purpose
TINY_MODEL = acdit.ACDiTConfig(img_size=28, in_channels=1, patch_size=7, block_h=1, block_w=4,
                               depth=1, width=16, n_heads=2,
                               **{k: TRAIN_DEFAULTS[k] for k in ('min_snr_gamma', 'label_dropout',
                                                                 'rope_base', 'attn_backend')})
# a CIFAR-10-shaped one: 32px RGB, patch 8 -> a 4x4 grid, 4 row blocks of 4 tokens
CIFAR_MODEL = dataclasses.replace(TINY_MODEL, img_size=32, in_channels=3, patch_size=8)
# what train.py keeps in a checkpoint (tested against a real one below); an eval adds the losses.
# write_checkpoint leaves out 'classes' and 'log', as train.py did before it saved them
CHECKPOINT_KEYS = {'model', 'ema', 'optimizer', 'args', 'model_config', 'iter_num', 'classes', 'log'}


def random_state(config, seed):
    """The state dict of an ACDiT whose every parameter is random (no path is trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    model = acdit.ACDiT(config)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}


def write_checkpoint(path, run_args, config=TINY_MODEL, **overrides):
    """A checkpoint laid out as train.py saves one (the run's options under 'args'); overrides
    replace or drop (None) entries."""
    ckpt = {'model': random_state(config, 1), 'ema': random_state(config, 2), 'optimizer': {},
            'args': run_args, 'model_config': dataclasses.asdict(config), 'iter_num': 7}
    ckpt.update(overrides)
    cli.save_checkpoint(str(path), {k: v for k, v in ckpt.items() if v is not None})
    return path


def files(directory):
    """Everything under directory, to check that a refusal wrote nothing."""
    return sorted(p.relative_to(directory) for p in Path(directory).rglob('*'))


def refuses(main, argv, *names, untouched=()):
    """main(argv) stops with a ConfigError of one line that names each of names (options or
    files), before writing anything into the untouched directories. Returns the message."""
    before = [files(d) for d in untouched]
    with pytest.raises(ConfigError) as e:
        main([str(a) for a in argv])
    message = str(e.value)
    assert message.strip() and '\n' not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    assert [files(d) for d in untouched] == before
    return message


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp('run') / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY))


@pytest.fixture(scope='module')
def cifar_ckpt(tmp_path_factory):
    args = dict(TRAIN_DEFAULTS, **dict(TINY, dataset='cifar10', patch_size=8))
    return write_checkpoint(tmp_path_factory.mktemp('cifar') / 'ckpt.pt', args, CIFAR_MODEL)


TRAIN_ARGS = [f'--{k}={v}' for k, v in TINY.items()] + [
    f'--data_dir={MNIST_DIR}', '--device=cpu', '--dtype=float32', '--compile=False', '--batch_size=8',
    '--eval_iters=1', '--log_interval=1', '--learning_rate=1e-3', '--warmup_iters=0', '--decay_frac=0.0',
    '--max_iters=3', '--eval_interval=3', '--sample_interval=3']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint that train.main wrote after 3 steps of the tiny model on the real MNIST,
    beside the sample grid it drew at the end (samples_000003.png)."""
    if not have_real_mnist:
        pytest.skip(NO_MNIST)
    out = tmp_path_factory.mktemp('trained')
    train.main(TRAIN_ARGS + [f'--out_dir={out}'])
    return out / 'ckpt.pt'


@pytest.fixture(scope='module')
def mnist_test():
    if not have_real_mnist:
        pytest.skip(NO_MNIST)
    return data.load_dataset('mnist', str(MNIST_DIR), 'test')


def generate_npz(ckpt, tmp_path, *args):
    """Run generate.main in-process; return its (images, labels) and the arrays it saved."""
    npz = tmp_path / f'samples{len(list(tmp_path.iterdir()))}.npz'
    result = generate.main([f'--ckpt={ckpt}', f'--out={npz.with_suffix(".png")}', f'--npz={npz}', *args])
    with np.load(npz) as f:
        return result, f['images'], f['labels']


def test_tiny_checkpoint_is_laid_out_as_train_py_writes_one(trained):
    real = cli.load_checkpoint(str(trained))
    assert real.keys() - {'test_loss', 'ema_test_loss'} == CHECKPOINT_KEYS
    assert {'test_loss', 'ema_test_loss'} <= real.keys()           # it ended on an eval
    assert real['model_config'] == dataclasses.asdict(TINY_MODEL)  # the tiny model is what train.py builds
    expected = vars(cli.parse_args(TRAIN_ARGS + [f'--out_dir={trained.parent}'], train.__doc__, train.OPTIONS,
                                   train.CHOICES))
    assert real['args'] == expected and expected.items() >= TINY.items()
    assert real['args'].keys() == TRAIN_DEFAULTS.keys()
    assert (TINY_MODEL.n_blocks, TINY_MODEL.block_len) == (4, 4)
    assert real['model'].keys() == random_state(TINY_MODEL, 0).keys()
    assert real['iter_num'] == 3


# -----------------------------------------------------------------------------
# outputs

def test_png_npz_and_gif(ckpt, tmp_path, capsys):
    png, npz, gif = tmp_path / 'grid.png', tmp_path / 'raw.npz', tmp_path / 'sub' / 'gen.gif'
    images_t, labels_t = generate.main([f'--ckpt={ckpt}', '--labels=1,3,5', '--n_per_class=2', '--steps=3',
                                        f'--out={png}', f'--npz={npz}', f'--gif={gif}'])
    # steps as asked; sampler and guidance from the run (TINY), with the KV cache
    assert 'ddim, 3 steps per block, cfg_scale 1.5, KV cache' in capsys.readouterr().out

    with np.load(npz) as f:
        images, labels = f['images'], f['labels']
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    assert labels.tolist() == [1, 1, 3, 3, 5, 5]
    assert images.std() > 10  # random weights: real variation, not a flat image
    # main returns what it saved: uint8 (B, C, H, W) and the labels
    assert images_t.dtype == torch.uint8 and np.array_equal(images_t.permute(0, 2, 3, 1).numpy(), images)
    assert labels_t.tolist() == labels.tolist()

    grid = np.array(Image.open(png))  # one row per label, n_per_class columns of 28px cells
    assert grid.shape == (3 * 28, 2 * 28)
    for i, img in enumerate(images):
        r, c = divmod(i, 2)
        assert np.array_equal(grid[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28], img[:, :, 0])

    with Image.open(gif) as g:
        n_frames, scale = g.n_frames, g.size[0] // 56
        assert n_frames >= 8 and scale > 1 and g.size == (56 * scale, 84 * scale)
        first = np.array(g.convert('L'))[::scale, ::scale]
        g.seek(n_frames - 1)
        last = np.array(g.convert('L'))[::scale, ::scale]
    assert np.array_equal(last, grid)  # the animation ends on the finished samples
    # in the first frame, blocks 1..3 (rows 7..27 of every cell) are not generated yet: mid-gray
    cells = first.reshape(3, 28, 2, 28)
    assert (cells[:, 7:] == 128).all() and not (cells[:, :7] == 128).all()


def test_default_out_path_and_sampling_settings_match_train_py(trained, capsys):
    """With no options generate.py reads cfg_scale, sample_steps and sampler from the
    checkpoint's args and draws exactly the grid train.py drew at the end of its run (EMA
    weights, seed 0), next to the checkpoint."""
    # train.py drew its grid on the CPU; generate.py's device=auto would pick a GPU if there is one
    cpu = ['--device=cpu'] if cli.pick_device('auto').type != 'cpu' else []
    generate.main([f'--ckpt={trained}', '--labels=0'] + cpu)
    assert 'ddim, 4 steps per block, cfg_scale 1.5' in capsys.readouterr().out
    # after 3 steps train.py drew 1 a class at 1 step (a tenth of 3 steps of batch 8), as it printed
    generate.main([f'--ckpt={trained}', '--n_per_class=1', '--steps=1'] + cpu)
    ours = trained.parent / 'samples.png'  # next to the checkpoint
    with Image.open(trained.parent / 'samples_000003.png') as im:
        reference = np.array(im)
    assert reference.shape == (10 * 28, 28) and len(np.unique(reference)) > 2
    assert np.array_equal(np.array(Image.open(ours)), reference)


def test_labels_by_name_or_number(ckpt, tmp_path, capsys):
    """--labels takes the checkpoint's class names or numbers, a name first (a folder named '3'),
    and the grid's rows are named in that order; an unknown one is one line listing the names.
    A checkpoint from before the names: numbers."""
    names = ['ant', 'bee', '3'] + [f'x{i}' for i in range(3, 10)]
    named = write_checkpoint(tmp_path / 'named.pt', dict(TRAIN_DEFAULTS, **TINY), classes=names)
    common = ['--n_per_class=2', '--steps=1', f'--out={tmp_path / "grid.png"}']
    assert generate.main([f'--ckpt={named}', '--labels=3,bee,7,x9'] + common)[1].tolist() == [2, 2, 1, 1, 7, 7, 9, 9]
    assert f'wrote {tmp_path / "grid.png"}: rows of 3, bee, x7, x9\n' in capsys.readouterr().out
    assert generate.main([f'--ckpt={ckpt}', '--labels=3,1'] + common)[1].tolist() == [3, 3, 1, 1]
    assert ': rows of 3, 1\n' in capsys.readouterr().out
    refuses(generate.main, [f'--ckpt={named}', '--labels=bee,cat'] + common, "'cat'", ', '.join(names),
            untouched=[tmp_path])
    refuses(generate.main, [f'--ckpt={ckpt}', '--labels=ant'] + common, "'ant'", '0..9', untouched=[tmp_path])


def test_a_checkpoint_without_the_runs_args_is_a_one_line_error(tmp_path, monkeypatch):
    """There is no fallback for a checkpoint without train.py's args (how it sampled, which
    dataset): generate.py and evaluate.py refuse it in one line naming it, and write nothing."""
    path = write_checkpoint(tmp_path / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY), args=None)
    monkeypatch.setattr(evaluate, 'get_judge', no_work)
    monkeypatch.setattr(data, 'load_dataset', no_work)
    refuses(generate.main, [f'--ckpt={path}', '--steps=1', '--cfg_scale=1.0', '--sampler=ddim'], path,
            untouched=[tmp_path])
    refuses(generate.main, [f'--ckpt={path}', '--prefix_blocks=1', f'--data_dir={tmp_path}'], path,
            untouched=[tmp_path])
    refuses(evaluate.main, [f'--ckpt={path}', f'--judge={tmp_path / "judge.pt"}'], path, untouched=[tmp_path])


# -----------------------------------------------------------------------------
# the samples themselves

def test_cached_and_uncached_give_the_same_images(ckpt, tmp_path, capsys):
    args = ['--labels=0,7,9', '--n_per_class=2', '--steps=3', '--seed=5']
    _, a, labels_a = generate_npz(ckpt, tmp_path, *args)
    assert 'KV cache' in capsys.readouterr().out
    _, b, labels_b = generate_npz(ckpt, tmp_path, *args, '--use_cache=False')
    assert 'uncached reference' in capsys.readouterr().out
    assert np.array_equal(labels_a, labels_b) and a.std() > 10
    # float32 rounding differs between the two attention layouts, so a pixel that sits on a
    # rounding boundary may move by one level; anything more is a real difference
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm', 'dpm++'])
def test_seed_decides_the_images(ckpt, tmp_path, sampler):
    args = ['--labels=2,4', '--n_per_class=1', '--steps=2', f'--sampler={sampler}']
    _, a, _ = generate_npz(ckpt, tmp_path, *args, '--seed=1')
    _, b, _ = generate_npz(ckpt, tmp_path, *args, '--seed=1')
    _, c, _ = generate_npz(ckpt, tmp_path, *args, '--seed=2')
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_samplers_differ(ckpt, tmp_path):
    args = ['--labels=2,4', '--n_per_class=1', '--steps=3', '--seed=1']
    images = {s: generate_npz(ckpt, tmp_path, *args, f'--sampler={s}')[1] for s in acdit.SAMPLERS}
    assert not np.array_equal(images['ddim'], images['dpm++'])  # the same noise, another solver
    assert not np.array_equal(images['ddim'], images['ddpm'])


def test_weights_option_picks_ema_or_raw_model(ckpt, tmp_path):
    args = ['--labels=3', '--n_per_class=2', '--steps=2']
    _, ema, _ = generate_npz(ckpt, tmp_path, *args)
    _, raw, _ = generate_npz(ckpt, tmp_path, *args, '--weights=model')
    assert not np.array_equal(ema, raw)
    # and each is what its own weights sample, seeded as generate.py seeds
    for name, images in (('ema', ema), ('model', raw)):
        model, _ = cli.load_model(str(ckpt), name)
        want = acdit.sample(model, torch.tensor([3, 3]), cfg_scale=1.5, sampler='ddim', steps=2,
                            generator=torch.Generator().manual_seed(0))
        assert np.array_equal(data.to_uint8(want).permute(0, 2, 3, 1).numpy(), images), name


# -----------------------------------------------------------------------------
# prefix completion

@needs_real_mnist
def test_prefix_completion_keeps_the_given_blocks(ckpt, tmp_path, mnist_test, capsys):
    """--prefix_blocks=K: each row of the grid is a test image, then its completions; the
    first K blocks of every completion are the test image's, bit for bit."""
    test_x, test_y = mnist_test
    K, sources, n = 2, 2, 3
    png, npz, gif = tmp_path / 'prefix.png', tmp_path / 'prefix.npz', tmp_path / 'prefix.gif'
    generate.main([f'--ckpt={ckpt}', f'--prefix_blocks={K}', f'--sources={sources}', '--labels=3,5',
                   f'--n_per_class={n}', '--steps=2', f'--data_dir={MNIST_DIR}', f'--out={png}',
                   f'--npz={npz}', f'--gif={gif}'])
    assert 'given 2 of 4 blocks' in capsys.readouterr().out
    picks = [int(i) for y in (3, 5) for i in (test_y == y).nonzero()[:sources, 0]]
    source = test_x[picks, 0].numpy()                              # (4, 28, 28)
    with np.load(npz) as f:
        images, labels = f['images'][..., 0], f['labels']
    assert images.shape == (len(picks) * n, 28, 28)
    assert labels.tolist() == [y for y in (3, 3, 5, 5) for _ in range(n)]
    rows = K * TINY_MODEL.block_h * TINY_MODEL.patch_size           # 14 pixel rows given
    completions = images.reshape(len(picks), n, 28, 28)
    assert np.array_equal(completions[:, :, :rows], np.broadcast_to(source[:, None, :rows], (len(picks), n, rows, 28)))
    generated = completions[:, :, rows:].astype(int)
    assert (generated != source[:, None, rows:]).any(axis=(2, 3)).all()  # the rest is the model's
    assert np.abs(generated[:, 0] - generated[:, 1]).mean() > 5      # and differs between completions

    # the grid: a row per source image, [source, completions with the generated part tinted]
    grid = np.array(Image.open(png))
    assert grid.shape == (len(picks) * 28, (n + 1) * 28, 3)
    cells = grid.reshape(len(picks), 28, n + 1, 28, 3).transpose(0, 2, 1, 3, 4)  # (row, col, 28, 28, 3)
    assert np.array_equal(cells[:, 0], np.repeat(source[..., None], 3, axis=-1))
    assert np.array_equal(cells[:, 1:, :, :, 1], completions)          # green: the pixels as they are
    for channel in (0, 2):
        assert np.array_equal(cells[:, 1:, :rows, :, channel], completions[:, :, :rows])  # given: gray
        tinted = np.round(completions[:, :, rows:].astype(np.float32) * np.float32(0.55))
        assert np.abs(cells[:, 1:, rows:, :, channel] - tinted).max() <= 1  # generated: tinted green

    # the GIF shows the completions only; its first frame has the given blocks already
    with Image.open(gif) as g:
        scale = g.size[0] // (n * 28)
        assert g.size == (n * 28 * scale, len(picks) * 28 * scale)
        first = np.array(g.convert('L'))[::scale, ::scale].reshape(len(picks), 28, n, 28).transpose(0, 2, 1, 3)
    assert np.array_equal(first[:, :, :rows], completions[:, :, :rows])
    assert (first[:, :, rows + 7:] == 128).all()  # blocks after the current one: mid-gray

    # and the uncached reference completes them the same way
    _, again, _ = generate_npz(ckpt, tmp_path, f'--prefix_blocks={K}', f'--sources={sources}', '--labels=3,5',
                               f'--n_per_class={n}', '--steps=2', f'--data_dir={MNIST_DIR}', '--use_cache=False')
    assert np.abs(again[..., 0].astype(int) - images.astype(int)).max() <= 1


@needs_real_mnist
def test_prefix_completion_of_given_test_indices(ckpt, tmp_path, mnist_test):
    test_x, test_y = mnist_test
    picks = [7, 0, 42]
    _, images, labels = generate_npz(ckpt, tmp_path, '--prefix_blocks=1', '--indices=7,0,42', '--n_per_class=2',
                                     '--steps=2', f'--data_dir={MNIST_DIR}')
    assert labels.tolist() == [int(test_y[i]) for i in picks for _ in range(2)]  # each source's own label
    rows = TINY_MODEL.block_h * TINY_MODEL.patch_size
    for j, i in enumerate(picks):
        assert np.array_equal(images[2 * j:2 * j + 2, :rows, :, 0], np.broadcast_to(test_x[i, 0, :rows].numpy(), (2, rows, 28)))
    for bad in ('7,x', '10000', '-1'):  # not a number; past the 10000 test images; negative
        refuses(generate.main, [f'--ckpt={ckpt}', '--prefix_blocks=1', f'--indices={bad}', f'--data_dir={MNIST_DIR}',
                                f'--out={tmp_path / "x.png"}'], 'indices', untouched=[tmp_path])


def test_prefix_completion_takes_the_runs_dataset(cifar_ckpt, tmp_path, monkeypatch):
    """The test images come from the dataset named in the checkpoint's args (here CIFAR-10's
    RGB images, a stand-in test set): the given blocks are kept in all three channels."""
    g = torch.Generator().manual_seed(0)
    test_x, test_y = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(30) % 10
    asked = []

    def fake_load_dataset(name, data_dir, split, img_size, channels):
        asked.append((name, data_dir, split))
        return test_x, test_y
    monkeypatch.setattr(data, 'load_dataset', fake_load_dataset)
    (images, labels), npz, _ = generate_npz(cifar_ckpt, tmp_path, '--prefix_blocks=1', '--labels=2,6',
                                            '--sources=2', '--n_per_class=2', '--steps=2', '--data_dir=somewhere')
    assert asked == [('cifar10', 'somewhere', 'test')]
    picks = [2, 12, 6, 16]                                        # the first two of each class
    assert labels.tolist() == [int(test_y[i]) for i in picks for _ in range(2)]
    assert images.shape == (8, 3, 32, 32) and npz.shape == (8, 32, 32, 3)
    rows = CIFAR_MODEL.block_h * CIFAR_MODEL.patch_size           # 8 pixel rows given
    given = test_x[picks].repeat_interleave(2, dim=0)
    assert torch.equal(images[:, :, :rows], given[:, :, :rows])
    assert (images[:, :, rows:] != given[:, :, rows:]).any()


def test_prefix_blocks_must_leave_a_block_to_generate(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'load_dataset', no_work)  # refused before any test image is looked for
    for k in (4, 7, -1):  # TINY has 4 blocks: 0..3 may be given
        refuses(generate.main, [f'--ckpt={ckpt}', f'--prefix_blocks={k}', f'--data_dir={tmp_path / "no-data"}',
                                f'--out={tmp_path / "x.png"}'], 'prefix_blocks', untouched=[tmp_path])


# -----------------------------------------------------------------------------
# mistakes: one line naming the option or file, exit status 2, nothing written

def no_work(*args, **kwargs):
    raise AssertionError('the script started working before rejecting its input')


@pytest.mark.parametrize('arg, name', [
    ('--labels=10', 'labels'),                  # TINY knows classes 0..9
    ('--labels=-1,2', 'labels'),
    ('--labels=one', 'labels'),
    ('--steps=0', 'steps'),
    ('--steps=1001', 'steps'),                  # more than the model's 1000 diffusion timesteps
    ('--steps=2.5', 'steps'),
    ('--cfg_scale=strong', 'cfg_scale'),
    ('--cfg_scale=inf', 'cfg_scale'),
    ('--cfg_scale=1,3,2,1.5', 'cfg_scale'),     # one scale per block is no longer an option
    ('--cfg_interval=200,800', 'cfg_interval'),  # nor is an interval of guided steps
    ('--n_per_class=0', 'n_per_class'),
    ('--sampler=euler', 'sampler'),
    ('--weights=best', 'weights'),
    ('--device=tpu', 'device'),
    ('--use_cache=maybe', 'use_cache'),
    ('--seed=-1', 'seed'),
    ('--out={dir}/grid.txt', 'out'),            # not an image format
    ('--bogus=1', 'bogus'),
    ('--sources=0', 'sources'),
    ('--n_frames=4', 'n_frames'),               # an image model
])
def test_impossible_options(ckpt, tmp_path, monkeypatch, arg, name):
    monkeypatch.setattr(data, 'load_dataset', no_work)
    refuses(generate.main, [f'--ckpt={ckpt}', f'--out={tmp_path}/x.png', f'--npz={tmp_path}/x.npz',
                            f'--gif={tmp_path}/x.gif', arg.format(dir=tmp_path)], name, untouched=[tmp_path])


@pytest.mark.parametrize('content', ['missing', 'truncated', 'text', 'a list', 'no args', 'no model_config',
                                     'no ema', 'wrong width', 'bad model_config', 'unknown model_config key'])
def test_unusable_checkpoints(ckpt, tmp_path, content):
    """A checkpoint that is missing, unreadable, not train.py's or does not fit an ACDiT is
    a one-line error naming the file, for generate.py and evaluate.py alike."""
    path = tmp_path / 'ckpt.pt'
    args = dict(TRAIN_DEFAULTS, **TINY)
    if content == 'truncated':
        path.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    elif content == 'text':
        path.write_text('not a checkpoint')
    elif content == 'a list':
        cli.save_checkpoint(str(path), [1, 2, 3])
    elif content == 'no args':
        write_checkpoint(path, args, args=None)
    elif content == 'no model_config':
        write_checkpoint(path, args, model_config=None)
    elif content == 'no ema':
        write_checkpoint(path, args, ema=None)
    elif content == 'wrong width':
        write_checkpoint(path, args, model_config=dataclasses.asdict(dataclasses.replace(TINY_MODEL, width=32)))
    elif content == 'bad model_config':  # patch 5 does not divide 28
        write_checkpoint(path, args, model_config=dict(dataclasses.asdict(TINY_MODEL), patch_size=5))
    elif content == 'unknown model_config key':
        write_checkpoint(path, args, model_config=dict(dataclasses.asdict(TINY_MODEL), n_experts=8))
    refuses(generate.main, [f'--ckpt={path}'], path, untouched=[tmp_path])
    refuses(evaluate.main, [f'--ckpt={path}', f'--judge={tmp_path / "judge.pt"}'], path, untouched=[tmp_path])


def test_raw_weights_must_be_in_the_checkpoint(ckpt, tmp_path):
    path = write_checkpoint(tmp_path / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY), model=None)
    generate_npz(path, tmp_path, '--labels=1', '--n_per_class=1', '--steps=1')  # the EMA weights are there
    refuses(generate.main, [f'--ckpt={path}', '--weights=model', f'--out={tmp_path}/y.png'], path, 'model',
            untouched=[tmp_path])


def test_cli_errors_are_one_line_with_exit_status_2(ckpt, tmp_path):
    """From the command line every mistake, a bad option or an unusable file, is one line
    on stderr (no traceback) naming it, exit status 2, and nothing on stdout or disk."""
    truncated, no_args, bad_npz = tmp_path / 'truncated.pt', tmp_path / 'no-args.pt', tmp_path / 'bad.npz'
    truncated.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    write_checkpoint(no_args, dict(TRAIN_DEFAULTS, **TINY), args=None)
    bad_npz.write_bytes(b'not an npz')
    out = tmp_path / 'out'
    cases = {  # (script, arguments) -> a name the error line must hold: unusable files, then options
        ('generate.py', f'--ckpt={truncated}', f'--out={out}/x.png'): str(truncated),
        ('generate.py', f'--ckpt={no_args}', f'--out={out}/x.png'): str(no_args),
        ('generate.py', f'--ckpt={ckpt}', f'--out={out}/x.png', '--labels=10'): 'labels',
        ('evaluate.py', f'--npz={bad_npz}', f'--judge={out}/judge.pt', f'--data_dir={out}/data'): str(bad_npz),
        ('bench.py', '--quick=True', '--reps=0'): 'reps',
    }
    # started together, as each one mostly waits for `import torch`
    procs = {case: subprocess.Popen([sys.executable, *case], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for case in cases}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 2, (case, stderr)
        assert 'Traceback' not in stderr and stdout == '', (case, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and cases[case] in lines[0], (case, stderr)
    assert not out.exists() and not (ckpt.parent / 'samples.png').exists()


def test_help(capsys):
    for module in (generate, bench, evaluate):
        with pytest.raises(SystemExit) as e:
            module.main(['-h'])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(module.__doc__.strip().splitlines()[0]), module.__name__
        for key, (default, help_text) in module.OPTIONS.items():
            assert f'--{key}={default!r}' in out and help_text in out, (module.__name__, key)


# -----------------------------------------------------------------------------
# bench.py: the work of sampling, and the table

def test_token_forward_counts_from_the_definition():
    config = acdit.ACDiTConfig()  # 7 blocks of 7 tokens
    # cached: 2*B rows x Bl tokens per step, plus 2*B x Bl per commit of blocks 0..5
    assert bench.sample_token_forwards(config, 1, 10, cached=True) == 2 * 10 * 7 * 7 + 2 * 6 * 7
    # uncached: block i reruns (i+1)*Bl tokens every step (i clean blocks re-committed, then
    # its own): 7 * (1+2+...+7) = 196 per row and step
    assert bench.sample_token_forwards(config, 1, 10, cached=False) == 2 * 10 * 196
    assert bench.sample_token_forwards(config, 3, 10, cached=False) == 3 * bench.sample_token_forwards(config, 1, 10, False)
    # with many steps the cache saves a factor of (N+1)/2 in token-forwards
    ratio = bench.sample_token_forwards(config, 1, 10 ** 6, False) / bench.sample_token_forwards(config, 1, 10 ** 6, True)
    assert ratio == pytest.approx((7 + 1) / 2, rel=1e-4)


def count_passes(model):
    """A forward hook on the first layer, which every pass (denoising steps and commits alike)
    goes through: the (rows, tokens) of each pass, appended to the list returned."""
    seen = []
    return seen, model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))


@pytest.mark.parametrize('cached', [True, False], ids=['KV cache', 'uncached'])
def test_token_forward_counts_match_a_real_sampling_run(cached):
    """Count the passes and tokens the first layer sees during acdit.sample and compare with
    bench's formula, counted from the algorithm instead."""
    batch, steps = 3, 2
    for label, config in bench.shapes(quick=True).items():
        model = acdit.ACDiT(dataclasses.replace(config, attn_backend='sdpa')).eval()
        seen, hook = count_passes(model)
        try:
            acdit.sample(model, torch.arange(batch), cfg_scale=bench.CFG_SCALE, steps=steps, use_cache=cached,
                         generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        N = config.n_blocks
        # steps, and either a commit of every block but the last or a rebuild of the cache per step (block > 0)
        assert len(seen) == N * steps + (N - 1 if cached else steps * (N - 1)), label
        assert all(rows == 2 * batch for rows, _ in seen), label  # CFG: both halves in every pass
        assert sum(r * t for r, t in seen) == bench.sample_token_forwards(config, batch, steps, cached), label


def test_a_prefix_fills_the_cache_in_one_pass(ckpt):
    """Prefix completion: the K given blocks go through the network once, together, then the
    N-K others are generated as usual (steps and a commit each, but the last)."""
    model, _ = cli.load_model(str(ckpt), 'ema')
    N, Bl, K, steps, batch = TINY_MODEL.n_blocks, TINY_MODEL.block_len, 2, 3, 2
    prefix = torch.rand(batch, K * Bl, TINY_MODEL.patch_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen, hook = count_passes(model)
    try:
        out = acdit.sample(model, torch.tensor([1, 8]), cfg_scale=2.0, sampler='ddim', steps=steps, prefix=prefix,
                           generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen[0] == (2 * batch, K * Bl)                          # the prefix, in one pass
    assert seen[1:] == [(2 * batch, Bl)] * ((N - K) * steps + (N - K - 1))
    assert torch.equal(acdit.patchify(out, TINY_MODEL)[:, :K * Bl], prefix)  # and it comes out unchanged


def bench_table(out):
    table = [line for line in out.splitlines() if line.startswith('|')]
    cells = [[c.strip() for c in line.split('|')[1:-1]] for line in table]
    return table, cells


def check_table(out, rows):
    table, cells = bench_table(out)
    assert cells[0] == ['benchmark', 'shape', 'variant', 'token-forwards', 'time (ms)', 'peak MiB', 'ratio',
                        'ideal', 'of ideal']
    assert set(table[1]) <= set('|-: ')  # the Markdown header rule
    assert len(table) == 2 + len(rows)
    body = '\n'.join(table[2:])
    for name in ('sampling', 'training step', 'KV cache', 'uncached', 'DiT (1 block)', 'ACDiT, sdpa',
                 '7 blocks x 7', '16 blocks x 16', '8 frames x 16'):
        assert name in body
    base = None
    for row, line in zip(rows, cells[2:]):
        bench_name, shape, variant, tokens, ms, peak, ratio, ideal, of_ideal = line
        assert (bench_name, shape, variant, tokens) == (row['bench'], row['shape'], row['variant'], f"{row['tokens']:,}")
        seconds = row['result'][0]
        assert ms == f'{seconds * 1e3:.1f}' and peak == 'n/a'  # peak memory: CUDA only
        if base is None or (bench_name, shape) != base[:2]:  # the first row of a group is its baseline
            base = (bench_name, shape, seconds, row['tokens'])
            assert (ratio, ideal, of_ideal) == ('1.00x', '1.00x', '1.00')
        want_ratio, want_ideal = seconds / base[2], row['tokens'] / base[3]
        assert ratio == f'{want_ratio:.2f}x' and ideal == f'{want_ideal:.2f}x'
        assert of_ideal == f'{want_ratio / want_ideal:.2f}'
        if variant == 'uncached' or variant == 'ACDiT, sdpa':
            assert want_ideal > 1  # more token-forwards than the group's baseline
    return cells


def test_bench_quick_prints_the_table(capsys):
    rows = bench.main(['--quick=True', '--device=cpu'])
    out = capsys.readouterr().out
    cells = check_table(out, rows)
    assert len(rows) == 10  # per image shape: sampling (cached, uncached), training (DiT, ACDiT); video: sampling
    assert {c[0] for c in cells[2:]} == {'sampling, batch 2', 'training step'}
    note = ' '.join(out.split())  # the note is wrapped at 100 columns
    assert 'FlexAttention rows need CUDA' in note and 'torch' in out and 'of ideal: ratio / ideal' in note
    for row in rows:  # --quick: 2 images, 2 steps; training batches of 2
        config = bench.shapes(True)[row['shape']]
        want = bench.sample_token_forwards(config, 2, 2, row['variant'] == 'KV cache') \
            if row['bench'].startswith('sampling') else 2 * (config.seq_len if row['variant'] != 'DiT (1 block)'
                                                             else config.n_blocks * config.block_len)
        assert row['tokens'] == want, row


def test_bench_has_a_group_per_sample_batch(monkeypatch, capsys):
    """--sample_batches=1,3: a group of sampling rows for each batch, each with its own
    baseline, the token-forwards as counted from the algorithm (tiny models, as --quick)."""
    quick_shapes = bench.shapes
    monkeypatch.setattr(bench, 'shapes', lambda quick: quick_shapes(True))
    rows = bench.main(['--device=cpu', '--sample_batches=1,3', '--batch_size=2', '--steps=1', '--reps=1'])
    cells = check_table(capsys.readouterr().out, rows)
    assert len(rows) == 2 * (2 + 2 + 2) + 2 * 2
    assert [c[0] for c in cells[2:8]] == ['sampling, batch 1'] * 2 + ['sampling, batch 3'] * 2 + ['training step'] * 2
    for row in rows:
        if row['bench'].startswith('sampling'):
            batch = int(row['bench'].split()[-1])
            config = quick_shapes(True)[row['shape']]
            assert row['tokens'] == bench.sample_token_forwards(config, batch, 1, row['variant'] == 'KV cache')
    monkeypatch.setattr(bench, 'bench_sampling', no_work)
    monkeypatch.setattr(bench, 'bench_training', no_work)
    for bad, name in (('--sample_batches=8,many', 'sample_batches'), ('--sample_batches=0,8', 'sample_batches'),
                      ('--steps=0', 'steps'), ('--batch_size=0', 'batch_size'), ('--reps=0', 'reps')):
        refuses(bench.main, ['--device=cpu', bad], name)


# -----------------------------------------------------------------------------
# judge.py and evaluate.py

def test_frechet_distance_matches_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64) + 1.0
    va, vb = a.var(0), b.var(0)  # the sample covariances are nearly diagonal; use the sample values
    closed = ((a.mean(0) - b.mean(0)) ** 2).sum() + (va + vb - 2 * (va * vb).sqrt()).sum()
    assert abs(judge.frechet_distance(a, b) - closed.item()) < 0.05 * closed.item()
    assert abs(judge.frechet_distance(a, a)) < 1e-6


@pytest.mark.parametrize('arg, name', [
    ('--n_per_class=0', 'n_per_class'),
    ('--sampler=euler', 'sampler'),
    ('--cfg_scale=strong', 'cfg_scale'),
    ('--cfg_scale=1,2', 'cfg_scale'),           # one scale per block is no longer an option
    ('--cfg_interval=200,800', 'cfg_interval'),  # nor is an interval of guided steps
    ('--steps=0', 'steps'),
    ('--steps=1001', 'steps'),
    ('--weights=best', 'weights'),
    ('--n_frames=12', 'n_frames'),              # an image model
])
def test_evaluate_rejects_bad_options_before_any_work(ckpt, tmp_path, monkeypatch, arg, name):
    monkeypatch.setattr(evaluate, 'get_judge', no_work)
    monkeypatch.setattr(evaluate, 'sample_images', no_work)
    monkeypatch.setattr(data, 'load_dataset', no_work)
    refuses(evaluate.main, [f'--ckpt={ckpt}', f'--judge={tmp_path / "judge.pt"}', f'--data_dir={tmp_path}', arg],
            name, untouched=[tmp_path])


def test_evaluate_judges_colour_images_with_a_judge_trained_on_their_folder(cifar_ckpt, ckpt, tmp_path, monkeypatch,
                                                                          capsys):
    """A folder run's checkpoint is judged by a photo judge trained once on the folder's training
    images and cached (judge_<folder>.pt), beside the real test images; a judge file made for
    other images is refused in one line."""
    from test_data import write_folder
    pics = tmp_path / 'pics'
    write_folder(pics / 'train', ['ant', 'bee', 'cat'], n=4, size=(32, 32), mode='RGB')
    write_folder(pics / 'test', ['ant', 'bee', 'cat'], n=2, size=(32, 32), mode='RGB')
    run = dict(TRAIN_DEFAULTS, **dict(TINY, dataset='folder', data_dir=str(pics), patch_size=8))
    folder_ckpt = write_checkpoint(tmp_path / 'run' / 'ckpt.pt', run, dataclasses.replace(CIFAR_MODEL, n_classes=3))
    monkeypatch.chdir(tmp_path)
    first = evaluate.main([f'--ckpt={folder_ckpt}', '--n_per_class=2', '--steps=1'])
    out = capsys.readouterr().out
    assert 'training the judge classifier (once; cached as judge_pics.pt)' in out
    assert f'judge epoch {judge.PHOTO_EPOCHS}/{judge.PHOTO_EPOCHS}' in out
    assert 'real test images, same judge, 6 images' in out and 'accuracy per class: 0: ' in out
    saved = torch.load(tmp_path / 'judge_pics.pt', weights_only=True)
    assert saved['trained_on'] == f'folder in {pics}, 32x32x3'
    again = evaluate.main([f'--ckpt={folder_ckpt}', '--n_per_class=2', '--steps=1'])
    assert 'training the judge' not in capsys.readouterr().out
    assert again[2:] == first[2:]                                 # the same judge reads the real images alike
    for other in (cifar_ckpt, ckpt):                              # CIFAR-10 and MNIST runs: not this judge
        refuses(evaluate.main, [f'--ckpt={other}', '--judge=judge_pics.pt', '--steps=1'], 'judge_pics.pt',
                untouched=[tmp_path])
    refuses(evaluate.main, [f'--ckpt={ckpt}', f'--judge={ckpt}', '--steps=1'], str(ckpt), untouched=[tmp_path])  # not a judge


@pytest.mark.parametrize('args, expected', [
    ([], (1.5, 4, 'ddim')),  # 'auto': how the checkpoint's run sampled (TINY)
    (['--cfg_scale=3', '--steps=10', '--sampler=ddpm'], (3.0, 10, 'ddpm')),
    (['--sampler=dpm++'], (1.5, 4, 'dpm++')),
])
def test_evaluate_samples_as_the_checkpoint_did_unless_told(ckpt, monkeypatch, capsys, args, expected):
    seen = {}

    def fake_sample_images(model, n_per_class, cfg_scale, steps, sampler, seed=0, batch=250, n_frames=None):
        seen['settings'] = (cfg_scale, steps, sampler, seed, n_frames)
        labels = torch.arange(10).repeat_interleave(n_per_class)
        return torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8), labels, 0.0

    def fake_judge_images(judge_, images, labels, test_x):
        return 1.0, 0.0, torch.eye(10, dtype=torch.long) * int((labels == 0).sum())
    test_y = torch.arange(200) % 10
    monkeypatch.setattr(evaluate, 'sample_images', fake_sample_images)
    monkeypatch.setattr(evaluate, 'judge_images', fake_judge_images)
    monkeypatch.setattr(evaluate, 'get_judge', lambda *a: None)
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (torch.zeros(200, 1, 28, 28, dtype=torch.uint8), test_y))
    evaluate.main([f'--ckpt={ckpt}', '--n_per_class=3', '--seed=4'] + args)
    assert seen['settings'] == expected + (4, None)
    out = capsys.readouterr().out
    assert f'{expected[2]} {expected[1]} steps/block, CFG {expected[0]}' in out
    assert 'real test images, same judge, 30 images: class accuracy 1.000' in out


def test_judge_counts_what_the_judge_reads(ckpt, tmp_path):
    """accuracy and the confusion matrix come from the judge's readings of the samples asked
    for: a judge that reads 'class 3' for every image is right exactly on the 3s."""
    class ReadsThree(judge.Judge):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()
    model, _ = cli.load_model(str(ckpt), 'ema')
    images, labels, seconds = judge.sample_images(model, 3, 1.5, 2, 'ddim')
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.uint8 and seconds > 0
    assert labels.tolist() == [y for y in range(10) for _ in range(3)]
    test_x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    acc, fid, confusion = judge.judge_images(ReadsThree(), images, labels, test_x)
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected[:, 3] = 3
    assert torch.equal(confusion, expected) and acc == pytest.approx(0.1) and fid > 0
    assert judge.misreadings(confusion, top=2) == '0 read as 3: 3/3, 1 read as 3: 3/3'
    assert judge.misreadings(torch.eye(10, dtype=torch.long)) == 'none'
    # the judge sees what generate.py draws with the same settings and seed
    _, drawn, _ = generate_npz(ckpt, tmp_path, '--n_per_class=3', '--cfg_scale=1.5', '--steps=2', '--sampler=ddim',
                               '--device=cpu')
    assert np.array_equal(drawn, images.permute(0, 2, 3, 1).numpy())


def test_evaluate_judges_an_npz_from_generate(ckpt, tmp_path, mnist_test, monkeypatch, capsys):
    """evaluate.py --npz judges generate.py's images (no checkpoint needed) and prints the
    same judge's numbers for as many real test images of the same classes."""
    test_x, test_y = (t[:1000] for t in mnist_test)  # FID against 1000 test images: 10x faster than all
    npz = tmp_path / 'samples.npz'
    generate.main([f'--ckpt={ckpt}', '--labels=1,4,4', '--n_per_class=2', '--steps=2', f'--npz={npz}',
                   f'--out={tmp_path / "samples.png"}'])
    torch.manual_seed(0)
    judge_path = tmp_path / 'judge.pt'  # an untrained judge: training one takes a minute
    cli.save_checkpoint(str(judge_path), judge.Judge().state_dict())
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (test_x, test_y))
    capsys.readouterr()
    acc, fid, real_acc, real_fid = evaluate.main([f'--npz={npz}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}'])
    out = capsys.readouterr().out
    j = judge.get_judge(str(MNIST_DIR), str(judge_path))
    with np.load(npz) as f:
        images, labels = torch.from_numpy(f['images']).permute(0, 3, 1, 2), torch.from_numpy(f['labels'])
    assert labels.tolist() == [1, 1, 4, 4, 4, 4]
    want_acc, want_fid, _ = judge.judge_images(j, images, labels, test_x)
    picks = [int(i) for i in (test_y == 1).nonzero()[:2, 0]] + [int(i) for i in (test_y == 4).nonzero()[:4, 0]]
    want_real_acc, want_real_fid, _ = judge.judge_images(j, test_x[picks], test_y[picks], test_x)
    assert (acc, real_acc) == (want_acc, want_real_acc)
    assert fid == pytest.approx(want_fid) and real_fid == pytest.approx(want_real_fid)
    assert f'{npz}: 6 images: class accuracy {acc:.3f}, FID {fid:.1f}' in out
    assert f'real test images, same judge, 6 images: class accuracy {real_acc:.3f}, FID {real_fid:.1f}' in out
    assert 'accuracy per class: ' in out and 'most frequent misreadings: ' in out
    assert not (tmp_path / 'no-checkpoint.pt').exists()


@pytest.mark.parametrize('content', ['not an npz', 'an npy', 'missing key', '3d', 'rgb', 'float', 'short video',
                                     'bad labels', 'too few labels'])
def test_evaluate_rejects_bad_npz_files_in_one_line(tmp_path, monkeypatch, content):
    path = tmp_path / 'x.npz'
    images, labels = np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int64)
    if content == 'not an npz':
        path.write_bytes(b'not an npz')
    elif content == 'an npy':
        with open(path, 'wb') as f:
            np.save(f, images)
    elif content == 'missing key':
        np.savez(path, pictures=images)
    else:
        images, labels = {'3d': (images[..., 0], labels), 'rgb': (np.zeros((2, 32, 32, 3), np.uint8), labels),
                          'float': (images.astype(np.float32), labels),
                          'short video': (np.zeros((2, 2, 32, 32, 1), np.uint8), labels),  # motion needs 3 frames
                          'bad labels': (images, np.array([0, 12])), 'too few labels': (images, labels[:1])}[content]
        np.savez(path, images=images, labels=labels)
    monkeypatch.setattr(evaluate, 'get_judge', no_work)
    monkeypatch.setattr(data, 'load_dataset', no_work)
    refuses(evaluate.main, [f'--npz={path}', f'--judge={tmp_path / "judge.pt"}'], path, untouched=[tmp_path])
    # a good one passes the door (and reaches the judge)
    np.savez(path, images=np.zeros((2, 28, 28, 1), np.uint8), labels=np.array([0, 9]))
    with pytest.raises(AssertionError, match='before rejecting'):
        evaluate.main([f'--npz={path}'])
    # colour images pass when the file says they are CIFAR-10's, as generate.py writes it
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([0, 9]), dataset='cifar10',
             data_dir='data', n_classes=10)
    with pytest.raises(AssertionError, match='before rejecting'):
        evaluate.main([f'--npz={path}'])


# -----------------------------------------------------------------------------
# video: Moving MNIST

VIDEO_ARGS = ['--dataset=moving_mnist', '--patch_size=8', '--block_h=4', '--block_w=4', '--depth=1', '--width=16',
              '--n_heads=2', '--cfg_scale=1.5', '--sample_steps=2', '--sampler=ddim', f'--data_dir={MNIST_DIR}',
              '--device=cpu', '--dtype=float32', '--compile=False', '--batch_size=4', '--eval_iters=1',
              '--log_interval=1', '--warmup_iters=0', '--max_iters=2', '--eval_interval=2', '--sample_interval=2']


def test_motion_of_known_paths():
    videos = torch.zeros(2, 5, 1, 32, 32, dtype=torch.uint8)
    for t in range(5):
        videos[0, t, 0, 3 * t:3 * t + 4, 4 * t:4 * t + 4] = 200  # moves by (3, 4): 5 pixels a frame
        videos[1, t, 0, 10:14, 10:14] = 200                        # frozen
    speed, spread = judge.motion(videos[:1])
    assert speed == pytest.approx(5.0) and spread == pytest.approx(0.0, abs=1e-5)
    assert judge.motion(videos[1:]) == pytest.approx((0.0, 0.0), abs=1e-5)
    assert judge.motion(videos)[0] == pytest.approx(2.5)
    # a jittering digit: speed 5 then 1 alternately, so a spread
    jitter = torch.zeros(1, 4, 1, 32, 32, dtype=torch.uint8)
    for t, (r, c) in enumerate([(0, 0), (3, 4), (3, 5), (6, 9)]):
        jitter[0, t, 0, r:r + 4, c:c + 4] = 200
    speed, spread = judge.motion(jitter)
    assert speed == pytest.approx(11 / 3) and spread == pytest.approx(torch.tensor([5.0, 1.0, 5.0]).std().item())
    with pytest.raises(AssertionError):  # two frames: one displacement, no spread
        judge.motion(videos[:, :2])
    dot = torch.zeros(32, 32)
    dot[20, 3] = 7
    assert judge.center_of_mass(dot).tolist() == [20.0, 3.0]
    # every frame's digit is cut out around its center of mass and scaled to 28x28: a digit
    # symmetric under a half turn has its center of mass in its middle, so its crop is itself
    half = torch.randint(1, 256, (7, 14), generator=torch.Generator().manual_seed(0)).float()
    digit = torch.cat([half, half.flip(0, 1)])                    # (14, 14)
    frame = torch.zeros(1, 1, 1, 32, 32, dtype=torch.uint8)
    frame[0, 0, 0, 9:23, 5:19] = digit.to(torch.uint8)            # middle (15.5, 11.5)
    want = torch.nn.functional.interpolate(digit[None, None], size=(28, 28), mode='bilinear')
    assert torch.equal(judge.frame_digits(frame), want.round().to(torch.uint8))


@needs_real_mnist
def test_moving_mnist_trains_generates_past_its_length_and_is_judged(ckpt, tmp_path, mnist_test, monkeypatch, capsys):
    out = tmp_path / 'run'
    train.main(VIDEO_ARGS + [f'--out_dir={out}'])
    video_ckpt = out / 'ckpt.pt'
    assert cli.load_checkpoint(str(video_ckpt))['args']['dataset'] == 'moving_mnist'
    with Image.open(out / 'samples_000002.png') as im:  # one video per class, a row of its 8 frames
        assert im.size == (8 * 32, 10 * 32)
    npz, gif, strip = tmp_path / 'v.npz', tmp_path / 'v.gif', tmp_path / 'strip.png'
    images, labels = generate.main([f'--ckpt={video_ckpt}', '--labels=3,5', '--n_per_class=2', '--n_frames=10',
                                    f'--out={strip}', f'--gif={gif}', f'--npz={npz}'])
    printed = capsys.readouterr().out
    assert 'videos of 10 frames' in printed and f'wrote {strip}: rows of 3, 5 (2 rows each: a video a row)' in printed
    assert images.shape == (4, 10, 1, 32, 32) and labels.tolist() == [3, 3, 5, 5]
    with Image.open(strip) as im:  # one row per video, one column per frame
        assert im.size == (10 * 32, 4 * 32)
        assert np.array_equal(np.asarray(im)[32:64, 64:96], images[1, 2, 0].numpy())
    with Image.open(gif) as im:  # the videos play, two per row as on the command line
        assert im.n_frames == 10 and im.size[0] == im.size[1]
    with np.load(npz) as f:
        assert np.array_equal(f['images'], images.permute(0, 1, 3, 4, 2).numpy()) and f['labels'].tolist() == [3, 3, 5, 5]
    for argv in ([f'--ckpt={video_ckpt}', '--n_frames=9', '--use_cache=False'],  # past 8 frames: only with the cache
                 [f'--ckpt={video_ckpt}', '--n_frames=-1'],
                 [f'--ckpt={video_ckpt}', '--prefix_blocks=8', f'--data_dir={tmp_path}/nothing']):  # no frame left
        refuses(generate.main, argv + [f'--out={tmp_path}/refused.png'], argv[1].split('=')[0][2:],
                untouched=[tmp_path])

    test_x, test_y = (t[:1000] for t in mnist_test)
    torch.manual_seed(0)
    judge_path = tmp_path / 'judge.pt'  # an untrained judge: training one takes a minute
    cli.save_checkpoint(str(judge_path), judge.Judge().state_dict())
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (test_x, test_y))
    capsys.readouterr()
    acc, fid, real_acc, real_fid, motion, by_frame = evaluate.main(
        [f'--npz={npz}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}'])
    text = capsys.readouterr().out
    assert len(by_frame) == 10 and acc == pytest.approx(sum(by_frame) / 10)
    assert f'{npz}: 4 videos: frame class accuracy {acc:.3f}' in text
    assert 'real Moving MNIST videos, same judge, 4 videos of 10 frames' in text
    speed, spread, real_speed, real_spread = motion
    assert (speed, spread) == pytest.approx(judge.motion(images))
    assert 1.0 < real_speed < 4.3 and real_spread >= 0  # 1..3 pixels a frame on each axis
    *_, by_frame = evaluate.main([f'--ckpt={video_ckpt}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}',
                                  '--n_per_class=1', '--steps=2', '--n_frames=9'])
    assert len(by_frame) == 9
    assert 'frame class accuracy' in capsys.readouterr().out
    for bad in ('--n_frames=2', '--n_frames=-1'):  # the motion check needs two displacements
        refuses(evaluate.main, [f'--ckpt={video_ckpt}', f'--judge={judge_path}', bad], 'n_frames',
                untouched=[tmp_path])


# frame prediction: a video model given the first K frames of real test videos

VIDEO_MODEL = dataclasses.replace(TINY_MODEL, img_size=32, n_frames=8, patch_size=8, block_h=4)  # a block: a frame


@pytest.fixture(scope='module')
def video_ckpt(tmp_path_factory):
    args = dict(TRAIN_DEFAULTS, **dict(TINY, dataset='moving_mnist', patch_size=8, block_h=4))
    return write_checkpoint(tmp_path_factory.mktemp('video') / 'ckpt.pt', args, VIDEO_MODEL)


def fake_test_set(monkeypatch, size):
    """data.load_dataset returns 30 random 'digits' of size x size (3 of each class) instead."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, 256, (30, 1, size, size), dtype=torch.uint8, generator=g), torch.arange(30) % 10
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (x, y))
    return x, y


def test_frame_prediction_keeps_the_given_frames(video_ckpt, tmp_path, monkeypatch, capsys):
    """--prefix_blocks=K on a video model: each test digit moves through its true video; its
    predictions start with that video's first K frames, bit for bit, and go on on their own."""
    digits, _ = fake_test_set(monkeypatch, 14)
    K, n, T = 3, 2, 10
    png = tmp_path / 'predicted.png'
    (images, labels), npz, _ = generate_npz(video_ckpt, tmp_path, f'--prefix_blocks={K}', '--labels=4,7',
                                            f'--n_per_class={n}', '--steps=2', f'--n_frames={T}')
    generate.main([f'--ckpt={video_ckpt}', f'--prefix_blocks={K}', '--labels=4,7', f'--n_per_class={n}',
                   '--steps=2', f'--n_frames={T}', f'--out={png}'])
    assert 'given 3 of 10 frames' in capsys.readouterr().out
    assert images.shape == (2 * n, T, 1, 32, 32) and labels.tolist() == [4, 4, 7, 7]
    for video, digit in zip(images, digits[[4, 4, 7, 7]]):
        for t in range(K):  # a given frame: the whole digit, somewhere in a black frame
            ys, xs = video[t, 0].nonzero().min(0).values.tolist()
            assert torch.equal(video[t, 0, ys:ys + 14, xs:xs + 14], digit[0]) and video[t].sum() == digit.sum()
    assert torch.equal(images[0, :K], images[1, :K]) and not torch.equal(images[0, :K], images[2, :K])
    assert not torch.equal(images[0, K:], images[1, K:])            # the predictions are the model's

    # the strip: per source a row of its true frames, then a row per prediction, generated frames tinted
    cells = np.array(Image.open(png)).reshape(2, n + 1, 32, T, 32, 3).transpose(0, 1, 3, 2, 4, 5)
    predicted = images.view(2, n, T, 32, 32).numpy()
    assert np.array_equal(cells[:, 0, :K, ..., 0], predicted[:, 0, :K])  # the truth's given frames
    assert (cells[:, 0, ..., 0] == cells[:, 0, ..., 2]).all()        # the truth: gray
    assert np.array_equal(cells[:, 1:, ..., 1], predicted)           # green: the pixels as they are
    assert np.array_equal(cells[:, 1:, :K, ..., 0], predicted[:, :, :K])
    tinted = np.round(predicted[:, :, K:].astype(np.float32) * np.float32(0.55))
    assert np.abs(cells[:, 1:, K:, ..., 0] - tinted).max() <= 1

    # and the uncached reference predicts the same frames (within the trained length)
    (again, _), *_ = generate_npz(video_ckpt, tmp_path, f'--prefix_blocks={K}', '--labels=4,7',
                                  f'--n_per_class={n}', '--steps=2', '--use_cache=False')
    assert (again.int() - images[:, :8].int()).abs().max() <= 1


def test_frame_prediction_is_judged_against_the_true_frames(video_ckpt, tmp_path, monkeypatch):
    test_x, test_y = fake_test_set(monkeypatch, 28)
    torch.manual_seed(0)
    judge_path = tmp_path / 'judge.pt'  # an untrained judge: training one takes a minute
    cli.save_checkpoint(str(judge_path), judge.Judge().state_dict())
    K, T = 5, 8
    scores = evaluate.main([f'--ckpt={video_ckpt}', f'--judge={judge_path}', f'--prefix_blocks={K}',
                            '--n_per_class=2', '--steps=2', '--data_dir=somewhere'])
    assert set(scores) == {'predicted', f'frame {K} repeated', 'true frames'}
    assert all(len(v) == T - K for s in scores.values() for v in s.values())
    # the baseline from the definition: the real videos' frame K (index K-1) against each later frame
    picks = torch.cat([(test_y == y).nonzero()[:2, 0] for y in range(10)])
    real = data.moving_mnist(data.halve(test_x)[picks], torch.Generator().manual_seed(0), frames=T).float() / 255
    for h in range(T - K):
        mse = sum(((v[K - 1] - v[K + h]) ** 2).mean() for v in real) / len(real)
        assert scores[f'frame {K} repeated']['pixel MSE (0..1)'][h] == pytest.approx(mse.item(), rel=1e-5)
        assert scores[f'frame {K} repeated']['center-of-mass error (px)'][h] > 0.5   # the digits move
    assert scores['true frames']['pixel MSE (0..1)'] == [0.0] * (T - K)  # the truth lines up with itself
    for bad in ('--prefix_blocks=8', '--prefix_blocks=-1', '--prefix_blocks=4 --n_frames=4'):
        refuses(evaluate.main, [f'--ckpt={video_ckpt}', f'--judge={judge_path}', *bad.split()], 'prefix_blocks',
                untouched=[tmp_path])


def test_frame_prediction_is_for_video_models_and_checkpoints(ckpt, tmp_path):
    refuses(evaluate.main, [f'--ckpt={ckpt}', '--prefix_blocks=1'], 'prefix_blocks', untouched=[tmp_path])
    refuses(evaluate.main, [f'--npz={tmp_path / "x.npz"}', '--prefix_blocks=1'], 'prefix_blocks', untouched=[tmp_path])
    # so is any other option of sampling from a checkpoint: it would be ignored
    for arg in ('--cfg_scale=3', f'--ckpt={tmp_path / "ckpt.pt"}', '--n_frames=12', '--n_per_class=5'):
        refuses(evaluate.main, [f'--npz={tmp_path / "x.npz"}', arg], arg[2:].split('=')[0], untouched=[tmp_path])


# -----------------------------------------------------------------------------
# the weights that ship in weights/: generate.py draws from them right after git clone

SHIPPED = sorted((REPO / 'weights').glob('*.pt'))


def test_the_mnist_weights_ship():
    assert REPO / 'weights' / 'mnist.pt' in SHIPPED   # the README's quick start opens with it


@pytest.mark.parametrize('path', SHIPPED, ids=lambda p: p.name)
def test_shipped_weights_are_small_fp16_and_draw_their_classes(path, tmp_path):
    assert path.stat().st_size <= (6 if path.name == 'cifar10.pt' else 4) * 2**20   # CIFAR-10's 4x192 may take 6 MB
    ckpt = cli.load_checkpoint(str(path))
    assert ckpt['ema'] and all(v.dtype == torch.float16 for v in ckpt['ema'].values())
    assert 'model' not in ckpt and 'optimizer' not in ckpt      # sampling weights only
    digits = [str(d) for d in range(10)]                         # and the names of their classes
    assert ckpt['classes'] == {'cifar10.pt': 'airplane automobile bird cat deer dog frog horse ship truck'.split()}.get(
        path.name, digits)
    out = tmp_path / 'samples.png'
    images, labels = generate.main([f'--ckpt={path}', '--n_per_class=2', '--sampler=dpm++', '--steps=10',
                                    '--device=cpu', f'--out={out}'])
    n_classes = ckpt['model_config']['n_classes']
    assert labels.tolist() == [c for c in range(n_classes) for _ in range(2)] and out.exists()
    if ckpt['args']['dataset'] == 'mnist':  # digits: white strokes on a mostly black ground (noise: about half)
        assert ((images < 64).float().mean(dim=(1, 2, 3)) > 0.6).all()


def test_a_checkpoint_from_before_the_args_key_still_loads(ckpt, tmp_path):
    """train.py before 3eb02f4 saved the run's options as 'config': load_model reads them as 'args'."""
    old = cli.load_checkpoint(str(ckpt))
    old['config'] = old.pop('args')
    torch.save(old, tmp_path / 'old.pt')
    model, loaded = cli.load_model(str(tmp_path / 'old.pt'))
    assert loaded['args'] == cli.load_checkpoint(str(ckpt))['args'] and model.config.depth == 1
