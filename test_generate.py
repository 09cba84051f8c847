"""
Tests for generate.py (sampling from a checkpoint, prefix completion), bench.py (the
benchmark table), evaluate.py and judge.py (class accuracy and FID).
Run with: python -m pytest -q test_generate.py

Most use a tiny MNIST-shaped checkpoint (28px, patch 7 -> a 4x4 token grid, 4 row blocks
of 4 tokens, depth 1, width 16) laid out as train.py writes one, with random weights: a
freshly initialized ACDiT outputs exactly zero (adaLN-Zero) and would sample the same
flat image for every seed and label. One fixture runs train.main for a few steps on the
real MNIST, to check that generate.py redraws the grid train.py saved; it and the tests
that read MNIST test images are skipped where the dataset is absent. Most tests call
main() in-process (fast); only the exit-status checks run the scripts as subprocesses.
"""

import dataclasses
import re
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
from cli import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parent
MNIST_DIR = REPO.parent / 'shared' / 'data' / 'mnist'  # the real dataset, when this checkout has it
have_real_mnist = all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + '.gz')).exists()
                      for pair in data.MNIST_FILES.values() for n in pair)
needs_real_mnist = pytest.mark.skipif(not have_real_mnist, reason=f'real MNIST not found in {MNIST_DIR}')

TRAIN_DEFAULTS = {k: v[0] for k, v in cli.config_block(str(REPO / 'train.py')).items()}
TINY = dict(dataset='mnist', patch_size=7, block_h=1, block_w=4, depth=1, width=16, n_heads=2,
            cfg_scale=1.5, sample_steps=4, sampler='ddim')  # sampling keys differ from train.py's defaults on purpose
TINY_MODEL = acdit.ACDiTConfig(img_size=28, in_channels=1, patch_size=7, block_h=1, block_w=4,
                               depth=1, width=16, n_heads=2,
                               **{k: TRAIN_DEFAULTS[k] for k in ('min_snr_gamma', 'label_dropout',
                                                                 'rope_base', 'attn_backend')})
# what train.py keeps in a checkpoint (tested against a real one below)
CHECKPOINT_KEYS = {'model', 'ema', 'optimizer', 'config', 'model_config', 'iter_num'}


def random_state(mcfg, seed):
    """The state dict of an ACDiT whose every parameter is random (no path is trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    model = acdit.ACDiT(mcfg)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}


def write_checkpoint(path, train_config, mcfg=TINY_MODEL, **overrides):
    """A checkpoint laid out as train.py saves one; overrides replace or drop (None) entries."""
    ckpt = {'model': random_state(mcfg, 1), 'ema': random_state(mcfg, 2), 'optimizer': {},
            'config': train_config, 'model_config': dataclasses.asdict(mcfg), 'iter_num': 7}
    ckpt.update(overrides)
    cli.save_checkpoint(str(path), {k: v for k, v in ckpt.items() if v is not None})
    return path


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp('run') / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY))


TRAIN_ARGS = [f'--{k}={v}' for k, v in TINY.items()] + [
    f'--data_dir={MNIST_DIR}', '--device=cpu', '--dtype=float32', '--compile=False', '--batch_size=8',
    '--eval_iters=1', '--log_interval=1', '--learning_rate=1e-3', '--warmup_iters=0', '--decay_frac=0.0',
    '--max_iters=3', '--eval_interval=3', '--sample_interval=3']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint that train.main wrote after 3 steps of the tiny model on the real MNIST,
    beside the sample grid it drew at the end (samples_000003.png)."""
    if not have_real_mnist:
        pytest.skip(f'real MNIST not found in {MNIST_DIR}')
    import train
    out = tmp_path_factory.mktemp('trained')
    train.main(TRAIN_ARGS + [f'--out_dir={out}'])
    return out / 'ckpt.pt'


@pytest.fixture(scope='module')
def mnist_test():
    if not have_real_mnist:
        pytest.skip(f'real MNIST not found in {MNIST_DIR}')
    return data.load_dataset('mnist', str(MNIST_DIR), 'test')


def generate_npz(ckpt, tmp_path, *args):
    """Run generate.main in-process; return its result and the arrays it saved."""
    npz = tmp_path / f'samples{len(list(tmp_path.iterdir()))}.npz'
    result = generate.main([f'--ckpt={ckpt}', f'--out={npz.with_suffix(".png")}', f'--npz={npz}', *args])
    with np.load(npz) as f:
        return result, f['images'], f['labels']


def test_tiny_checkpoint_is_laid_out_as_train_py_writes_one(trained):
    real = cli.load_checkpoint(str(trained))
    assert CHECKPOINT_KEYS <= real.keys()
    assert real['model_config'] == dataclasses.asdict(TINY_MODEL)  # the tiny model is what train.py builds
    expected = dict(cli.parse_config(TRAIN_ARGS, TRAIN_DEFAULTS), out_dir=str(trained.parent))
    assert real['config'] == expected and expected.items() >= TINY.items()
    assert (TINY_MODEL.n_blocks, TINY_MODEL.block_len) == (4, 4)
    assert real['model'].keys() == random_state(TINY_MODEL, 0).keys()


# -----------------------------------------------------------------------------
# outputs

def test_png_npz_and_gif(ckpt, tmp_path, capsys):
    png, npz, gif = tmp_path / 'grid.png', tmp_path / 'raw.npz', tmp_path / 'sub' / 'gen.gif'
    generate.main([f'--ckpt={ckpt}', '--labels=1,3,5', '--n_per_class=2', '--steps=3',
                   f'--out={png}', f'--npz={npz}', f'--gif={gif}'])
    out = capsys.readouterr().out
    assert 'network passes' in out and 'token-forwards' in out and 'KV cache' in out

    with np.load(npz) as f:
        images, labels = f['images'], f['labels']
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    assert labels.tolist() == [1, 1, 3, 3, 5, 5]
    assert images.std() > 10  # random weights: real variation, not a flat image

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
    checkpoint and draws exactly the grid train.py drew at the end of its run (EMA
    weights, seed 0)."""
    # train.py drew its grid on the CPU; generate.py's device=auto would pick a GPU if there is one
    generate.main([f'--ckpt={trained}'] + (['--device=cpu'] if cli.pick_device('auto').type != 'cpu' else []))
    assert 'ddim, 4 steps per block, cfg_scale 1.5' in capsys.readouterr().out
    ours = trained.parent / 'samples.png'  # next to the checkpoint
    with Image.open(trained.parent / 'samples_000003.png') as im:
        reference = np.array(im)
    assert reference.shape == (10 * 28, 10 * 28) and len(np.unique(reference)) > 2
    assert np.array_equal(np.array(Image.open(ours)), reference)


def test_fallback_settings_without_a_train_config(tmp_path, capsys):
    path = write_checkpoint(tmp_path / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY), config=None)
    with pytest.raises(ConfigError, match='steps=2000'):  # reaches the sampler only if options load
        generate.main([f'--ckpt={path}', '--steps=2000'])
    generate.main([f'--ckpt={path}', '--labels=0', '--n_per_class=1', '--steps=1'])
    d = cli.SAMPLING_DEFAULTS
    assert f"{d['sampler']}, 1 steps per block, cfg_scale {d['cfg_scale']}" in capsys.readouterr().out


@needs_real_mnist
def test_prefix_completion_without_a_train_config(tmp_path):
    """A checkpoint without train.py's config still completes test images (its model's
    shape says which dataset they come from), or says in one line why it cannot."""
    path = write_checkpoint(tmp_path / 'ckpt.pt', dict(TRAIN_DEFAULTS, **TINY), config=None)
    try:
        generate.main([f'--ckpt={path}', '--prefix_blocks=1', f'--data_dir={MNIST_DIR}', '--labels=0',
                       '--n_per_class=1', '--steps=1', f'--out={tmp_path / "x.png"}'])
    except (ConfigError, CheckpointError):
        pass


# -----------------------------------------------------------------------------
# the samples themselves

def test_cached_and_uncached_give_the_same_images(ckpt, tmp_path):
    args = ['--labels=0,7,9', '--n_per_class=2', '--steps=3', '--seed=5']
    cached, a, labels_a = generate_npz(ckpt, tmp_path, *args)
    uncached, b, labels_b = generate_npz(ckpt, tmp_path, *args, '--use_cache=False')
    assert np.array_equal(labels_a, labels_b)
    # float32 rounding differs between the two attention layouts, so a pixel that sits on a
    # rounding boundary may move by one level; anything more is a real difference
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01

    # the work counted while sampling is what bench.py derives from the algorithm
    cfg, batch, steps, N = TINY_MODEL, 6, 3, TINY_MODEL.n_blocks
    assert cached.token_forwards == bench.sample_token_forwards(cfg, batch, steps, cached=True)
    assert uncached.token_forwards == bench.sample_token_forwards(cfg, batch, steps, cached=False)
    assert cached.passes == N * steps + N - 1  # steps + a commit of every block but the last
    assert uncached.passes == N * steps + steps * (N - 1)  # steps + a rebuild of the cache per step (block > 0)


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


# -----------------------------------------------------------------------------
# prefix completion

@needs_real_mnist
def test_prefix_completion_keeps_the_given_blocks(ckpt, tmp_path, mnist_test, capsys):
    """--prefix_blocks=K: each row of the grid is a test image, then its completions; the
    first K blocks of every completion are the test image's, bit for bit."""
    test_x, test_y = mnist_test
    K, sources, n = 2, 2, 3
    png, npz, gif = tmp_path / 'prefix.png', tmp_path / 'prefix.npz', tmp_path / 'prefix.gif'
    result = generate.main([f'--ckpt={ckpt}', f'--prefix_blocks={K}', f'--sources={sources}', '--labels=3,5',
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

    # the work: the prefix fills the cache in one pass, then N-K blocks of steps and commits
    N = TINY_MODEL.n_blocks
    assert result.passes == 1 + (N - K) * 2 + (N - K - 1)
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
    for bad, words in (('7,x', 'expected test-set indices'), ('10000', 'the test set has images 0..9999')):
        with pytest.raises(ConfigError, match=re.escape(words)):
            generate.main([f'--ckpt={ckpt}', '--prefix_blocks=1', f'--indices={bad}', f'--data_dir={MNIST_DIR}',
                           f'--out={tmp_path / "x.png"}'])


def test_prefix_blocks_must_leave_a_block_to_generate(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=re.escape('prefix_blocks=4: this model has 4 blocks, so at most 3 can be given')):
        generate.main([f'--ckpt={ckpt}', '--prefix_blocks=4', f'--data_dir={tmp_path / "no-data"}'])
    assert not (tmp_path / 'no-data').exists()  # refused before any test image is looked for


# -----------------------------------------------------------------------------
# mistakes

@pytest.mark.parametrize('arg, message', [
    ('--labels=10', "labels='10': 10 out of range; this model knows classes 0..9"),
    ('--labels=-1,2', 'out of range'),
    ('--labels=one', 'expected class numbers'),
    ('--steps=0', 'steps=0 must be an integer >= 1'),
    ('--steps=1001', "more than the model's 1000 diffusion timesteps"),
    ('--cfg_scale=strong', 'cfg_scale=strong must be a number'),
    ('--n_per_class=0', 'n_per_class=0 must be at least 1'),
    ('--sampler=euler', "sampler='euler': choose one of ddim, ddpm, dpm++"),
    ('--weights=best', "weights='best'"),
    ('--out=grid.txt', 'needs an image extension'),
    ('--bogus=1', "unknown config key 'bogus'"),
    ('--prefix_blocks=-1', 'prefix_blocks=-1 must be >= 0'),
    ('--sources=0', 'sources=0 must be at least 1'),
    ('--prefix_blocks=7', 'prefix_blocks=7: this model has 4 blocks'),
])
def test_impossible_options(ckpt, arg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate.main([f'--ckpt={ckpt}', arg])


@pytest.mark.parametrize('content, message', [
    ('missing', 'no checkpoint at'),
    ('a list', 'is not a train.py checkpoint: expected a dict'),
    ('no model_config', "expected a dict with a 'model_config' entry"),
    ('no ema', "has no 'ema' weights"),
    ('wrong width', 'does not fit an ACDiT model: size mismatch for'),
    ('bad model_config', 'does not fit an ACDiT model'),
])
def test_unusable_checkpoints(tmp_path, content, message):
    path = tmp_path / 'ckpt.pt'
    config = dict(TRAIN_DEFAULTS, **TINY)
    if content == 'a list':
        cli.save_checkpoint(str(path), [1, 2, 3])
    elif content == 'no model_config':
        write_checkpoint(path, config, model_config=None)
    elif content == 'no ema':
        write_checkpoint(path, config, ema=None)
    elif content == 'wrong width':
        write_checkpoint(path, config, model_config=dataclasses.asdict(dataclasses.replace(TINY_MODEL, width=32)))
    elif content == 'bad model_config':
        write_checkpoint(path, config, model_config={'img_size': 28, 'patch_size': 5})
    with pytest.raises(CheckpointError, match=message):
        generate.main([f'--ckpt={path}'])


def test_cli_errors_are_one_line(ckpt, tmp_path):
    truncated = tmp_path / 'truncated.pt'
    raw = ckpt.read_bytes()
    truncated.write_bytes(raw[:len(raw) // 2])
    out = f'--out={tmp_path / "x.png"}'
    cases = {  # arguments -> exit status: 1 for a file that cannot be used, 2 for a bad option
        (f'--ckpt={tmp_path / "nothing-here.pt"}', out): 1,
        (f'--ckpt={truncated}', out): 1,
        (f'--ckpt={ckpt}', out, '--labels=10'): 2,
        (f'--ckpt={ckpt}', out, '--steps=0'): 2,
        (f'--ckpt={ckpt}', out, '--prefix_blocks=4'): 2,
    }
    # started together, as each one mostly waits for `import torch`
    procs = {args: subprocess.Popen([sys.executable, 'generate.py', *args], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in cases}
    for args, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == cases[args], (args, stderr)
        assert 'Traceback' not in stderr and stdout == ''
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: '), (args, stderr)
    assert not (tmp_path / 'x.png').exists()


def test_help(capsys):
    for module in (generate, bench, evaluate):
        module.main(['-h'])
        out = capsys.readouterr().out
        options = cli.config_block(module.__file__)
        assert all(f'--{k}={v[0]!r}' in out for k, v in options.items()), module.__name__


# -----------------------------------------------------------------------------
# bench.py

def test_token_forward_counts_from_the_definition():
    cfg = acdit.ACDiTConfig()  # 7 blocks of 7 tokens
    # cached: 2*B rows x Bl tokens per step, plus 2*B x Bl per commit of blocks 0..5
    assert bench.sample_token_forwards(cfg, 1, 10, cached=True) == 2 * 10 * 7 * 7 + 2 * 6 * 7
    # uncached: block i reruns (i+1)*Bl tokens every step (i clean blocks re-committed, then
    # its own): 7 * (1+2+...+7) = 196 per row and step
    assert bench.sample_token_forwards(cfg, 1, 10, cached=False) == 2 * 10 * 196
    assert bench.sample_token_forwards(cfg, 3, 10, cached=False) == 3 * bench.sample_token_forwards(cfg, 1, 10, False)
    # with many steps the cache saves a factor of (N+1)/2 in token-forwards
    ratio = bench.sample_token_forwards(cfg, 1, 10 ** 6, False) / bench.sample_token_forwards(cfg, 1, 10 ** 6, True)
    assert ratio == pytest.approx((7 + 1) / 2, rel=1e-4)


@pytest.mark.parametrize('cached', [True, False], ids=['KV cache', 'uncached'])
def test_token_forward_counts_match_a_real_sampling_run(cached):
    """Count the tokens the first layer sees during acdit.sample (every pass, denoising
    steps and commits alike, goes through it) and compare with bench's formula."""
    for label, cfg in bench.shapes(quick=True).items():
        model = acdit.ACDiT(dataclasses.replace(cfg, attn_backend='sdpa')).eval()
        seen = []
        hook = model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
        batch, steps = 3, 2
        acdit.sample(model, torch.arange(batch), cfg_scale=bench.CFG_SCALE, steps=steps, use_cache=cached,
                     generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert all(rows == 2 * batch for rows, _ in seen), label  # CFG: both halves in every pass
        assert sum(r * t for r, t in seen) == bench.sample_token_forwards(cfg, batch, steps, cached), label


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
    assert 'FlexAttention rows need CUDA' in out and 'torch' in out and 'of ideal: ratio / ideal' in out


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
            cfg = next(c for label, c in quick_shapes(True).items() if label == row['shape'])
            assert row['tokens'] == bench.sample_token_forwards(cfg, batch, 1, row['variant'] == 'KV cache')
    with pytest.raises(ConfigError, match='sample_batches'):
        bench.main(['--device=cpu', '--sample_batches=8,many'])
    with pytest.raises(ConfigError, match='sample_batches=0 must be at least 1'):
        bench.main(['--device=cpu', '--sample_batches=0,8'])


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


def no_work(*args, **kwargs):
    raise AssertionError('evaluate.py started working before rejecting its options')


def test_evaluate_rejects_bad_options_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, 'get_judge', no_work)
    monkeypatch.setattr(evaluate, 'sample_images', no_work)
    monkeypatch.setattr(data, 'load_dataset', no_work)
    with pytest.raises(ConfigError, match='n_per_class=0 must be at least 1'):
        evaluate.main(['--n_per_class=0'])
    with pytest.raises(CheckpointError, match='no checkpoint at'):
        evaluate.main([f'--ckpt={tmp_path / "missing.pt"}'])
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='not a complete torch.save archive'):
        evaluate.main([f'--ckpt={tmp_path / "notes.txt"}'])
    # a bad sampling option or weights name is caught before the (missing) checkpoint or NPZ is read
    for missing in (f'--ckpt={tmp_path / "missing.pt"}', f'--npz={tmp_path / "missing.npz"}'):
        for bad, message in [('--sampler=euler', "sampler='euler': choose one of ddim, ddpm, dpm++"),
                             ('--cfg_scale=strong', 'cfg_scale=strong must be a number'),
                             ('--steps=0', 'steps=0 must be an integer >= 1'),
                             ('--weights=best', "weights='best': choose 'ema' or 'model'")]:
            with pytest.raises(ConfigError, match=re.escape(message)):
                evaluate.main([missing, bad])
    assert list(tmp_path.iterdir()) == [tmp_path / 'notes.txt']  # no judge.pt, no data


@pytest.mark.parametrize('args, expected', [
    ([], (1.5, 4, 'ddim', None)),  # 'auto': how the checkpoint's run sampled (TINY)
    (['--cfg_scale=3', '--steps=10', '--sampler=ddpm'], (3.0, 10, 'ddpm', None)),
    (['--sampler=dpm++', '--cfg_interval=200,800'], (1.5, 4, 'dpm++', (200, 800))),
    (['--cfg_scale=1,3,2,1.5'], ((1.0, 3.0, 2.0, 1.5), 4, 'ddim', None)),  # per block: TINY has 4
])
def test_evaluate_samples_as_the_checkpoint_did_unless_told(ckpt, monkeypatch, capsys, args, expected):
    seen = {}

    def fake_sample_images(model, n_per_class, cfg_scale, steps, sampler, seed=0, cfg_interval=None, n_frames=None):
        seen['settings'] = (cfg_scale, steps, sampler, cfg_interval)
        labels = torch.arange(10).repeat_interleave(n_per_class)
        return torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8), labels, 0.0

    def fake_judge_images(judge_, images, labels, test_x):
        return 1.0, 0.0, torch.eye(10, dtype=torch.long) * int((labels == 0).sum())
    test_y = torch.arange(200) % 10
    monkeypatch.setattr(evaluate, 'sample_images', fake_sample_images)
    monkeypatch.setattr(evaluate, 'judge_images', fake_judge_images)
    monkeypatch.setattr(evaluate, 'get_judge', lambda data_dir, path: None)
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (torch.zeros(200, 1, 28, 28, dtype=torch.uint8), test_y))
    evaluate.main([f'--ckpt={ckpt}', '--n_per_class=3'] + args)
    assert seen['settings'] == expected
    out = capsys.readouterr().out
    assert f'{expected[2]} {expected[1]} steps/block, CFG {expected[0]}' in out
    assert (f'on t in [200, 800]' in out) == (expected[3] is not None)
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


@needs_real_mnist
def test_per_block_cfg_scale_must_fit_the_model(ckpt, tmp_path):
    for script, more in ((evaluate, [f'--judge={tmp_path}/judge.pt', f'--data_dir={tmp_path}/nothing']),
                         (generate, [f'--out={tmp_path}/s.png'])):
        with pytest.raises(ConfigError, match=re.escape("cfg_scale=1,2: 2 scales, but per-block guidance needs "
                                                        "one for each of the model's 4 blocks")):
            script.main([f'--ckpt={ckpt}', '--cfg_scale=1,2'] + more)
    assert list(tmp_path.iterdir()) == []                        # nothing made before the check


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
    monkeypatch.setattr(data, 'load_dataset', lambda name, data_dir, split: (test_x, test_y))
    capsys.readouterr()
    acc, fid, real_acc, real_fid = evaluate.main([f'--npz={npz}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}',
                                                  f'--ckpt={tmp_path / "no-checkpoint.pt"}'])
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

    # images the judge cannot read
    other = tmp_path / 'rgb.npz'
    np.savez(other, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match=r'the judge knows MNIST only, uint8 images \(N, 28, 28, 1\) or .*; got torch.uint8 \(2, 32, 32, 3\)'):
        evaluate.main([f'--npz={other}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}'])


@pytest.mark.parametrize('content, message', [
    (b'not an npz', 'is not an NPZ of images and labels'),
    ('missing-key', 'is not an NPZ of images and labels'),
    ('3d', 'uint8 images (N, 28, 28, 1)'),
    ('bad-labels', 'expected one label in 0..9 per image'),
])
def test_evaluate_rejects_bad_npz_files_in_one_line(tmp_path, monkeypatch, content, message):
    path = tmp_path / 'x.npz'
    if content == b'not an npz':
        path.write_bytes(content)
    elif content == 'missing-key':
        np.savez(path, pictures=np.zeros((2, 28, 28, 1), np.uint8))
    elif content == '3d':
        np.savez(path, images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2, np.int64))
    else:
        np.savez(path, images=np.zeros((2, 28, 28, 1), np.uint8), labels=np.array([0, 12]))
    monkeypatch.setattr(evaluate, 'get_judge', lambda data_dir, path: None)
    monkeypatch.setattr(data, 'load_dataset', lambda *a: (torch.zeros(20, 1, 28, 28, dtype=torch.uint8),
                                                          torch.arange(20) % 10))
    with pytest.raises((cli.ConfigError, cli.CheckpointError), match=re.escape(message)):
        evaluate.main([f'--npz={path}'])


# --- video: Moving MNIST ------------------------------------------------------------

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
    with pytest.raises(ValueError, match='at least 3 frames'):
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
def test_moving_mnist_trains_generates_past_its_length_and_is_judged(tmp_path, mnist_test, monkeypatch, capsys):
    from PIL import Image
    import train
    out = tmp_path / 'run'
    train.main(VIDEO_ARGS + [f'--out_dir={out}'])
    with Image.open(out / 'samples_000002.png') as im:  # one video per class, a row of its 8 frames
        assert im.size == (8 * 32, 10 * 32)
    npz, gif, strip = tmp_path / 'v.npz', tmp_path / 'v.gif', tmp_path / 'strip.png'
    r = generate.main([f'--ckpt={out / "ckpt.pt"}', '--labels=3,5', '--n_per_class=2', '--n_frames=10',
                       f'--out={strip}', f'--gif={gif}', f'--npz={npz}'])
    assert r.images.shape == (4, 10, 1, 32, 32) and r.labels.tolist() == [3, 3, 5, 5]
    with Image.open(strip) as im:  # one row per video, one column per frame
        assert im.size == (10 * 32, 4 * 32)
        assert np.array_equal(np.asarray(im)[32:64, 64:96], r.images[1, 2, 0].numpy())
    with Image.open(gif) as im:  # the videos play, two per row as on the command line
        assert im.n_frames == 10 and im.size[0] == im.size[1]
    with np.load(npz) as f:
        assert f['images'].shape == (4, 10, 32, 32, 1) and f['labels'].tolist() == [3, 3, 5, 5]
    image_ckpt = str(write_checkpoint(tmp_path / 'img.pt', dict(TRAIN_DEFAULTS, **TINY)))
    with pytest.raises(ConfigError, match='only for video models; this checkpoint makes images'):
        generate.main([f'--ckpt={image_ckpt}', '--n_frames=4'])
    with pytest.raises(ConfigError, match='past the trained 8 frames only with --use_cache=True'):
        generate.main([f'--ckpt={out / "ckpt.pt"}', '--n_frames=9', '--use_cache=False'])

    test_x, test_y = (t[:1000] for t in mnist_test)
    torch.manual_seed(0)
    judge_path = tmp_path / 'judge.pt'  # an untrained judge: training one takes a minute
    cli.save_checkpoint(str(judge_path), judge.Judge().state_dict())
    monkeypatch.setattr(data, 'load_dataset', lambda name, data_dir, split: (test_x, test_y))
    capsys.readouterr()
    acc, fid, real_acc, real_fid, motion, by_frame = evaluate.main(
        [f'--npz={npz}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}'])
    text = capsys.readouterr().out
    assert len(by_frame) == 10 and acc == pytest.approx(sum(by_frame) / 10)
    assert f'{npz}: 4 videos: frame class accuracy {acc:.3f}' in text
    assert 'real Moving MNIST videos, same judge, 4 videos of 10 frames' in text
    speed, spread, real_speed, real_spread = motion
    assert 1.0 < real_speed < 4.3 and real_spread >= 0  # 1..3 pixels a frame on each axis
    acc2, *_ = evaluate.main([f'--ckpt={out / "ckpt.pt"}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}',
                              '--n_per_class=1', '--steps=2'])
    assert 'frame class accuracy' in capsys.readouterr().out
    with pytest.raises(ConfigError, match='at least 3'):
        evaluate.main([f'--ckpt={out / "ckpt.pt"}', f'--data_dir={MNIST_DIR}', '--n_frames=2'])
    with pytest.raises(ConfigError, match='only for video models'):
        evaluate.main([f'--ckpt={image_ckpt}', f'--data_dir={MNIST_DIR}', '--n_frames=12'])
    short = tmp_path / 'short.npz'
    np.savez(short, images=np.zeros((2, 2, 32, 32, 1), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match='videos of 2 frames; the motion check needs at least 3'):
        evaluate.main([f'--npz={short}', f'--data_dir={MNIST_DIR}', f'--judge={judge_path}'])
