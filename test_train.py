"""Tests of train.py: the training loop end to end with a tiny model on the real MNIST,
exact resume, checkpoints, stopping (NaN, Ctrl-C, torchrun), the time budget, and bad
input (one line on stderr, exit status 2, nothing written). The data, the command line
and checkpoint I/O have tests of their own (test_data.py, test_cli.py)."""

import contextlib
import csv
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import acdit
import cli
import data
import generate
import train
from cli import ConfigError
from test_data import (MNIST_DIR, NO_MNIST, cifar_batch, have_real_mnist, md5, needs_real_mnist, write_fake_cifar,
                       write_fake_mnist, write_folder)

REPO = Path(__file__).resolve().parent
DEFAULTS = {k: d for k, (d, _) in train.OPTIONS.items()}


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Make any download attempt fail at once, locally, instead of reaching the internet."""
    nowhere = (tmp_path / 'no-such-mirror').as_uri()
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [nowhere + '/'])
    monkeypatch.setattr(data, 'CIFAR10_URLS', [nowhere + '/cifar-10-python.tar.gz'])


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses here get (OMP_NUM_THREADS=1): the tiny model gains
    nothing from two, and on a busy machine spinning threads make each step 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_get_lr_warmup_stable_decay():
    def lr(it, **kw):
        c = dict(max_iters=1000, learning_rate=1.0, warmup_iters=100, decay_frac=0.2, min_lr_frac=0.1)
        return train.get_lr(it, SimpleNamespace(**{**c, **kw}))
    assert 0 < lr(0) < lr(50) < lr(99) < 1.0  # warmup
    assert lr(100) == lr(500) == lr(800) == 1.0  # stable until the last 20%
    assert 1.0 > lr(850) > lr(950) > 0.1  # linear decay
    assert lr(850) == pytest.approx(1.0 - 0.9 * 50 / 200)
    assert lr(1000) == pytest.approx(0.1) and lr(5000) == pytest.approx(0.1)  # floor
    assert lr(5, max_iters=10, warmup_iters=0, decay_frac=0.0, min_lr_frac=0.0) == 1.0  # no warmup, no decay
    assert lr(500) == lr(500, max_iters=10**9)  # the stable phase does not depend on max_iters


def step_draws(seed, rank, it):
    """What a step seeded with (seed, rank, it) draws: from torch's generator and from the batch's."""
    torch.manual_seed(12345)  # whatever state came before
    torch.rand(7)
    g = train.seed_step(seed, rank, it)
    return torch.rand(3), torch.rand(3, generator=g)


def test_step_seed_depends_on_seed_rank_and_iteration_only():
    a, ga = step_draws(1, 0, 5)
    b, gb = step_draws(1, 0, 5)
    assert torch.equal(a, b) and torch.equal(ga, gb)  # the same step draws the same numbers
    for other in [(1, 1, 5), (1, 0, 6), (1, 0, 0)]:
        o, go = step_draws(*other)
        assert not torch.equal(a, o) and not torch.equal(ga, go), other


def test_step_seed_differs_for_another_seed_or_rank():
    a, ga = step_draws(1, 0, 5)
    for other in [(2, 0, 5), (1337, 0, 5), (1, 2, 5), (1, 3, 5)]:  # another --seed; torchrun's 3rd and 4th process
        o, go = step_draws(*other)
        assert not torch.equal(a, o) and not torch.equal(ga, go), other


def test_step_seeds_the_batch_and_the_model_draws_apart():
    """Seeded alike, the batch indices and the timesteps would come from the same raw numbers."""
    for it in range(20):
        a, ga = step_draws(1337, 0, it)
        assert not torch.equal(a, ga), it


def largest_accepted(key, low, high):
    """The largest value of option key in [low, high) that train.py's checks accept (low is)."""
    def ok(v):
        try:
            args = SimpleNamespace(**dict(DEFAULTS, **{key: v}))
            train.check_args(args)
            train.model_config(args)
            return True
        except ConfigError:
            return False
    assert ok(low)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def test_every_seed_the_checks_accept_can_seed_a_step():
    seed = largest_accepted('seed', 0, 2**70)
    for rank, it in ((0, 0), (1, 10**6)):  # torchrun's second process, a long run
        assert train.seed_step(seed, rank, it).initial_seed() < 2**64
    assert torch.rand(1).item() >= 0


def test_ema_warms_up_then_averages_at_ema_decay():
    """The EMA model of a short run follows the weights (not its random start); later it
    averages over ~1/(1 - ema_decay) steps."""
    model, ema = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.zero_()
    for it in range(10):
        train.update_ema(ema, model, it, 0.999)
    assert all((p > 0.5).all() for p in ema.parameters())  # without a warm-up: 1 - 0.999**10 ~ 0.01
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    train.update_ema(ema, model, 10**6, 0.999)
    assert all(torch.allclose(p, torch.full_like(p, 0.001)) for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    train.update_ema(ema, model, 10**6, 0.0)  # no averaging: a copy of the weights
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(ema.parameters(), before))


def test_eval_loss_is_the_plain_eps_mse_whatever_the_weighting():
    """train.py's eval reports the unweighted eps-MSE, so runs with and without Min-SNR
    weighting compare; the training loss itself is weighted."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=g)
    losses = {}
    for gamma in (0.0, 1.0):
        config = acdit.ACDiTConfig(patch_size=7, block_w=4, depth=1, width=16, n_heads=2, min_snr_gamma=gamma)
        torch.manual_seed(0)
        model = acdit.ACDiT(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3, generator=g.manual_seed(p.numel()))
        (losses[gamma],) = train.estimate_loss([model], images, labels, 2, contextlib.nullcontext(), data.get_batch)
        torch.manual_seed(1)
        x, y = data.get_batch(images, labels, 8, torch.Generator().manual_seed(2))
        losses[gamma, 'train'] = model.training_loss(x, y).item()
    assert losses[0.0] == losses[1.0]
    assert losses[0.0, 'train'] != losses[1.0, 'train']


# -----------------------------------------------------------------------------
# the tiny model: 4x4 tokens of 7x7 pixels in 4 blocks (rows), one layer of width 16,
# a few milliseconds a step on a CPU. Most runs call train.main in-process; a subprocess
# is used only where the exit status, stderr or a real signal is what is tested.

TINY = ['--dataset=mnist', f'--data_dir={MNIST_DIR}', '--device=cpu', '--dtype=float32',
        '--patch_size=7', '--block_h=1', '--block_w=4', '--depth=1', '--width=16', '--n_heads=2',
        '--batch_size=8', '--eval_iters=1', '--sample_steps=2', '--log_interval=1',
        '--learning_rate=1e-3', '--warmup_iters=2', '--decay_frac=0.0', '--compile=False']
QUIET = ['--eval_interval=100000', '--sample_interval=100000']  # evaluate and sample at the end only
PROGRESS = re.compile(r'^iter (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| (\d+) ms/it \| (\d+) img/s \| '
                      r'elapsed .+ \| eta .+$', re.M)
_mnist_cache = {}


@pytest.fixture
def cached_mnist(monkeypatch):
    """data.load_dataset reading the real MNIST once per test session (it takes ~0.5 s)."""
    if not have_real_mnist:
        pytest.skip(NO_MNIST)
    real = data.load_dataset

    def load(name, data_dir, split, *shape):
        key = (name, str(data_dir), split)
        if key not in _mnist_cache:
            _mnist_cache[key] = real(name, data_dir, split, *shape)
        return _mnist_cache[key]
    monkeypatch.setattr(data, 'load_dataset', load)


def losses(out):
    """{iter: printed training loss} from the progress lines of a run."""
    return {int(m.group(1)): m.group(3) for m in PROGRESS.finditer(out)}


def run_main(argv, capsys):
    """train.main(argv) as `python train.py argv` runs it, in-process: (exit status, stdout, stderr)."""
    try:
        cli.run_cli(lambda: train.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *names):
    """Exit status 2 and one line on stderr that names each of names."""
    assert code == 2, (code, err[-2000:])
    assert 'Traceback' not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for name in names:
        assert name in lines[0], (name, lines[0])


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


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing written

def test_main_help(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['-h'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f'--{k}={d!r}' in out for k, d in DEFAULTS.items())


@pytest.mark.parametrize('arg, name', [
    ('--learning_rate=-1', 'learning_rate'), ('--learning_rate=nan', 'learning_rate'),
    ('--ema_decay=1.0', 'ema_decay'), ('--decay_frac=1.5', 'decay_frac'), ('--min_lr_frac=-0.1', 'min_lr_frac'),
    ('--grad_clip=-1', 'grad_clip'), ('--warmup_iters=-5', 'warmup_iters'), ('--weight_decay=-1', 'weight_decay'),
    ('--label_dropout=1', 'label_dropout'), ('--min_snr_gamma=-1', 'min_snr_gamma'), ('--rope_base=1', 'rope_base'),
    ('--cfg_scale=nan', 'cfg_scale'), ('--cfg_scale=inf', 'cfg_scale'),
    ('--sample_steps=0', 'sample_steps'), ('--sample_steps=1001', 'sample_steps'), ('--sampler=euler', 'sampler'),
    ('--time_budget=-1', 'time_budget'), ('--max_iters=0', 'max_iters'), ('--batch_size=0', 'batch_size'),
    ('--eval_interval=0', 'eval_interval'), ('--eval_iters=0', 'eval_iters'), ('--log_interval=0', 'log_interval'),
    ('--sample_interval=0', 'sample_interval'), ('--seed=-1', 'seed'), ('--depth=0', 'depth'),
    ('--patch_size=5', 'patch_size'), ('--width=18', 'width'), ('--n_heads=3', 'n_heads'),
    ('--dataset=imagenet', 'dataset'), ('--dtype=float16', 'dtype'), ('--width=wide', 'width'),
    ('--compile=yes', 'compile'),
    ('--block_w=3', 'block_w'),
    pytest.param('--attn_backend=flex', 'attn_backend', marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason='flex trains on CUDA')),
    pytest.param('--device=cuda', 'cuda', marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason='needs a machine without CUDA')),
])
def test_bad_options_fail_up_front(tmp_path, capsys, arg, name):
    code, out, err = run_main(TINY + [arg, f'--out_dir={tmp_path / "out"}'], capsys)
    assert_one_line_error(code, err, name)
    assert out == '' and list(tmp_path.iterdir()) == []  # nothing happened before the check


def test_bad_model_shape_from_the_command_line(tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, 'train.py', *TINY, '--patch_size=5', f'--out_dir={out}'], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(r.returncode, r.stderr, 'patch_size')
    assert r.stdout == '' and not out.exists()


def test_a_run_that_fails_before_training_leaves_no_out_dir(tmp_path, capsys):
    out = tmp_path / 'out'
    code, _, err = run_main([f'--data_dir={tmp_path / "nowhere"}', f'--out_dir={out}', '--compile=False',
                             '--device=cpu'], capsys)
    assert_one_line_error(code, err, str(tmp_path / 'nowhere'))  # no data: where it looked
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor data_dir


# -----------------------------------------------------------------------------
# the training loop, end to end

@needs_real_mnist
def test_train_writes_checkpoint_samples_and_progress(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / 'out'
    train.main(TINY + [f'--out_dir={out}', '--max_iters=3', '--eval_interval=2', '--sample_interval=2'])
    text = capsys.readouterr().out
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    # no random state: every step is seeded from (seed, rank, iteration)
    assert ckpt.keys() == {'model', 'ema', 'optimizer', 'args', 'model_config', 'iter_num', 'test_loss', 'ema_test_loss',
                           'classes', 'log'}
    assert ckpt['iter_num'] == 3 and ckpt['classes'] == ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']
    assert '10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9' in text and 'warmup' not in text  # 2 warmup steps of 3
    assert ckpt['args'].keys() == DEFAULTS.keys() and ckpt['args']['depth'] == 1 and ckpt['args']['max_iters'] == 3
    assert ckpt['model_config']['patch_size'] == 7 and ckpt['model_config']['depth'] == 1
    assert ckpt['model'].keys() == ckpt['ema'].keys()
    assert not all(torch.equal(ckpt['model'][k], ckpt['ema'][k]) for k in ckpt['model'])  # EMA lags
    # the eval losses saved are the ones printed at the last eval
    eval_3 = re.search(r'^eval @ 3: .*$', text, re.M).group(0)
    assert f"{ckpt['test_loss']:.4f}" in eval_3 and f"{ckpt['ema_test_loss']:.4f}" in eval_3
    assert 0 < ckpt['test_loss'] < 10 and 0 < ckpt['ema_test_loss'] < 10
    assert 'eval @ 2: ' in text
    # a grid per sample_interval and at the end: a row of 28x28 digits per class (in the order printed
    # above); after 3 steps of 8 images, a tenth of their cost buys 1 a class at 1 step (see the size test)
    assert sorted(p.name for p in out.glob('*.png')) == ['loss.png', 'samples_000002.png', 'samples_000003.png']
    assert f"wrote {out / 'samples_000003.png'} (1 a class at 1 steps a block: " in text
    with Image.open(out / 'samples_000003.png') as im:
        assert im.mode == 'L' and im.size == (28, 10 * 28)
        assert len(np.unique(np.asarray(im))) > 2  # not a blank image
    lines = PROGRESS.findall(text)
    assert [(int(m[0]), int(m[1])) for m in lines] == [(1, 3), (2, 3), (3, 3)]
    for _, _, loss, lr, ms, img in lines:
        assert 0 < float(loss) < 10 and 0 < float(lr) <= 1e-3 and int(img) > 0
    assert float(lines[0][3]) < float(lines[2][3]) == 1e-3  # warmup, then flat
    assert [p.name for p in out.iterdir() if p.name.startswith('.')] == []  # no temp files left
    # log.csv: a row per printed line, with its loss and lr; the test losses at the evals
    with open(out / 'log.csv') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['iter', 'loss', 'lr', 'ms_per_step', 'test_loss', 'ema_test_loss', 'elapsed_s']
    assert [r['iter'] for r in rows] == ['1', '2', '3'] and [r['iter'] for r in ckpt['log']] == [1, 2, 3]
    for r, (_, _, loss, lr, ms, _) in zip(rows, lines):
        assert f"{float(r['loss']):.4f}" == loss and f"{float(r['lr']):.2e}" == lr and float(r['elapsed_s']) >= 0
    assert rows[0]['test_loss'] == rows[0]['ema_test_loss'] == ''
    assert float(rows[2]['test_loss']) == pytest.approx(ckpt['test_loss'], rel=1e-5)
    assert float(rows[2]['ema_test_loss']) == pytest.approx(ckpt['ema_test_loss'], rel=1e-5)
    with Image.open(out / 'loss.png') as im:  # the plot, drawn at every eval
        assert im.format == 'PNG' and im.size == (640, 400)


@pytest.mark.usefixtures('cached_mnist')
def test_log_csv_has_a_row_per_log_and_eval_step(tmp_path, capsys):
    """log_interval=2 and eval_interval=3 over 7 steps: rows (and progress lines) at 2, 3, 4, 6 and
    7, the last step; the test losses at 3, 6 and 7. Warmup to the end is a warning."""
    out = tmp_path / 'out'
    train.main(TINY + [f'--out_dir={out}', '--max_iters=7', '--log_interval=2', '--eval_interval=3',
                       '--sample_interval=100', '--warmup_iters=7'])
    text = capsys.readouterr().out
    assert 'warning: warmup_iters=7 >= max_iters=7' in text
    with open(out / 'log.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['iter']) for r in rows] == [int(m[0]) for m in PROGRESS.findall(text)] == [2, 3, 4, 6, 7]
    assert [int(r['iter']) for r in rows if r['test_loss'] and r['ema_test_loss']] == [3, 6, 7]


@pytest.mark.parametrize('dataset, shape', [  # (img_size, channels, patch_size, block_h, block_w, n_classes)
    ('mnist', (28, 1, 4, 1, 7, 10)), ('cifar10', (32, 3, 4, 1, 8, 10)),
    ('moving_mnist', (32, 1, 8, 4, 4, 10)), ('folder', (16, 3, 2, 1, 8, 3))])
def test_every_dataset_trains_from_its_name_alone(tmp_path, monkeypatch, capsys, dataset, shape):
    """--dataset=NAME with no shape options: patches and blocks follow the data (files the test
    makes). For a folder, generate.py then completes its test images from the run's data_dir."""
    data_dir, out = tmp_path / 'data', tmp_path / 'out'
    if dataset == 'cifar10':
        rng = np.random.default_rng(0)
        data_dir.mkdir()
        write_fake_cifar(data_dir / data.CIFAR10_ARCHIVE, {f'data_batch_{i}': cifar_batch(rng, 2) for i in range(1, 6)}
                         | {'test_batch': cifar_batch(rng, 2)})
        monkeypatch.setitem(data.CHECKSUMS, data.CIFAR10_ARCHIVE, ('md5', md5(data_dir / data.CIFAR10_ARCHIVE)))
    elif dataset == 'folder':
        for split in ('train', 'test'):
            write_folder(data_dir / split, ['x', 'y', 'z'], n=2, size=(16, 16), mode='RGB', ext='.jpg')
    else:
        write_fake_mnist(data_dir, monkeypatch)
    code, log, err = run_main([f'--dataset={dataset}', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=1',
                             '--depth=1', '--width=16', '--n_heads=2', '--batch_size=2', '--eval_iters=1',
                             '--sample_steps=1', '--compile=False', '--device=cpu', '--dtype=float32'], capsys)
    assert code == 0, err
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    got = tuple(ckpt['model_config'][k] for k in ('img_size', 'in_channels', 'patch_size', 'block_h', 'block_w', 'n_classes'))
    assert got == shape and (out / 'samples_000001.png').exists()
    assert ('half of each batch mirrored' in log) == (dataset in ('cifar10', 'folder'))
    # the names of the labels: printed at the start and kept in the checkpoint
    names = {'cifar10': 'airplane automobile bird cat deer dog frog horse ship truck'.split(),
             'folder': ['x', 'y', 'z']}.get(dataset, [str(d) for d in range(10)])
    assert ckpt['classes'] == names and ', '.join(names) in log
    if dataset == 'folder':  # generate.py takes them for --labels and lists them for a name it does not know
        images, labels = generate.main([f'--ckpt={out / "ckpt.pt"}', '--prefix_blocks=2', '--steps=1',
                                        '--n_per_class=1', '--device=cpu', '--labels=z,x'])
        assert images.shape == (2, 3, 16, 16) and labels.tolist() == [2, 0]
        with pytest.raises(ConfigError, match="labels='w': 'w' is not a number in 0..2 nor a class \\(x, y, z\\)"):
            generate.main([f'--ckpt={out / "ckpt.pt"}', '--labels=w'])


def test_a_short_runs_grid_costs_at_most_a_tenth_of_it(tmp_path, monkeypatch):
    """n images at s steps a block cost about n * s / (3 * batch_size) training steps: after n_steps,
    a grid of 10 a row (a video: 1) at sample_steps if that costs at most n_steps / 10, else
    fewer a row, then fewer steps (at least 1 and 1)."""
    drawn = []

    def sample(model, labels, steps, **kw):
        drawn.append((labels.tolist(), steps))
        return torch.zeros(len(labels), *([model.config.n_frames] if model.config.n_frames > 1 else []), 1, 32, 32)
    monkeypatch.setattr(acdit, 'sample', sample)
    args = SimpleNamespace(batch_size=8, sample_steps=50, cfg_scale=2.0, sampler='ddpm')
    image = acdit.ACDiT(acdit.ACDiTConfig(img_size=32, patch_size=8, block_w=4, depth=1, width=16, n_heads=2))
    video = acdit.ACDiT(acdit.ACDiTConfig(img_size=32, n_frames=8, patch_size=8, block_h=4, block_w=4, depth=1,
                                          width=16, n_heads=2))
    for model, n_steps, size in ((image, 10**6, (10, 50)), (image, 2084, (10, 50)), (image, 1000, (4, 50)),
                                 (image, 200, (1, 48)), (image, 10, (1, 2)), (image, 1, (1, 1)),
                                 (video, 10**6, (1, 50)), (video, 100, (1, 24))):
        assert train.sample_grid(model, tmp_path / 'grid.png', args, 'cpu', n_steps) == size
        labels, steps = drawn.pop()
        assert labels == [c for c in range(10) for _ in range(size[0])] and steps == size[1]
        assert 10 * size[0] * steps / (3 * 8) <= n_steps / 10 or size == (1, 1)


@pytest.mark.parametrize('args, name', [(['--dataset=mnist', '--img_size=32'], 'img_size'),
                                        (['--dataset=moving_mnist', '--hflip=True'], 'hflip')])
def test_options_for_images_or_folders_only(tmp_path, capsys, args, name):
    code, out, err = run_main(args + [f'--out_dir={tmp_path / "out"}'], capsys)
    assert_one_line_error(code, err, name)
    assert out == '' and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures('cached_mnist')
def test_a_grid_due_before_the_first_checkpoint_is_written(tmp_path):
    out = tmp_path / 'out'
    train.main(TINY + [f'--out_dir={out}', '--max_iters=3', '--eval_interval=100', '--sample_interval=2'])
    assert (out / 'samples_000002.png').exists() and cli.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3


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
    with open(b / 'log.csv', 'a') as f:  # as if the run had gone on to iter 4, then crashed before saving
        f.write('4,9,9,9,,,9\n')
    log_b1 = (b / 'log.csv').read_text()
    train.main(common + [f'--out_dir={b}', '--max_iters=6', '--init_from=resume'])
    out_b2 = capsys.readouterr().out
    assert 'eval @ 3' in out_b1 and (b / 'samples_000003.png').exists() and 'eval @ 3' not in out_a
    la, lb1, lb2 = losses(out_a), losses(out_b1), losses(out_b2)
    assert sorted(la) == [1, 2, 3, 4, 5, 6] and sorted(lb1) == [1, 2, 3] and sorted(lb2) == [4, 5, 6]
    assert {**lb1, **lb2} == la
    eval_line = re.compile(r'^eval @ 6: .*$', re.M)
    assert eval_line.search(out_a).group(0) == eval_line.search(out_b2).group(0)
    ca, cb = (cli.load_checkpoint(str(d / 'ckpt.pt')) for d in (a, b))
    assert ca['iter_num'] == cb['iter_num'] == 6
    for key in ('model', 'ema', 'optimizer'):
        assert_same_state(ca[key], cb[key], key)
    assert ca['test_loss'] == cb['test_loss'] and ca['ema_test_loss'] == cb['ema_test_loss']
    assert_same_state(ca['args'], dict(cb['args'], init_from='scratch', out_dir=str(a)), 'args')
    assert cb['optimizer']['param_groups'][0]['fused'] is True  # this device's choice again
    # log.csv: appended to, its stale row kept; the resumed rows continue from the checkpoint's iter with
    # the uninterrupted run's losses and learning rates (its time columns differ); loss.png's rows: each iter once
    assert (b / 'log.csv').read_text().startswith(log_b1)
    rows_a, rows_b = ([(r['iter'], r['loss'], r['lr']) for r in csv.DictReader((d / 'log.csv').read_text().splitlines())] for d in (a, b))
    assert [it for it, _, _ in rows_b] == ['1', '2', '3', '4', '4', '5', '6'] and rows_b[3] == ('4', '9', '9')
    assert rows_b[:3] + rows_b[4:] == rows_a
    assert [(r['iter'], r['loss'], r['lr']) for r in cb['log']] == [(r['iter'], r['loss'], r['lr']) for r in ca['log']]
    assert cb['model']['final.linear.weight'].abs().sum() > 0  # the run did train (it starts at zero)


@pytest.mark.usefixtures('cached_mnist')
def test_compile_unavailable_falls_back_to_eager_training(tmp_path, monkeypatch, capsys):
    """A machine where torch.compile cannot build code (no C++ compiler) still trains:
    one warning naming the problem, then exactly the steps of a --compile=False run."""
    common = TINY + QUIET + ['--max_iters=3']
    train.main(common + [f'--out_dir={tmp_path / "eager"}', '--compile=False'])
    eager = capsys.readouterr().out

    def broken_compile(*args, **kwargs):
        raise RuntimeError('InvalidCxxCompiler: No working C++ compiler found')
    monkeypatch.setattr(torch, 'compile', broken_compile)
    train.main(common + [f'--out_dir={tmp_path / "fallback"}', '--compile=True'])
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if 'No working C++ compiler found' in line]
    assert len(warnings) == 1 and 'warning' in warnings[0] and 'compile' in warnings[0]
    assert sorted(losses(out)) == [1, 2, 3] and losses(out) == losses(eager)
    assert cli.load_checkpoint(str(tmp_path / 'fallback' / 'ckpt.pt'))['iter_num'] == 3


def test_compile_failure_is_a_one_line_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError('InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCH_LOGS=+dynamo for more')
    monkeypatch.setattr(torch, 'compile', broken_compile)
    step_model, said = train.TrainingLoss(torch.nn.Linear(2, 2)), []
    assert train.compiled(step_model, torch.device('cpu'), said.append) is step_model  # the eager model
    assert len(said) == 1 and 'No working C++ compiler found' in said[0]
    assert '\n' not in said[0].strip(), said[0]


def test_compiled_training_step_matches_eager_on_cpu():
    """train.py --compile=True (the CPU recipe) trains the same function: the compiled
    TrainingLoss gives eager's loss and gradients. Inductor draws its own random numbers
    unless fallback_random is set, so it is set here to make the two see the same t,
    noise and label dropout."""
    config = acdit.ACDiTConfig(img_size=28, patch_size=7, block_h=1, block_w=4, depth=1, width=16, n_heads=2)
    model = acdit.ACDiT(config)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would make the output exactly zero
            p.normal_(0, 0.3)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    y = torch.arange(8) % 10
    said = []
    compiled = train.compiled(train.TrainingLoss(model), torch.device('cpu'), said.append)
    if any('warning' in line for line in said):
        pytest.skip(f'torch.compile does not work on this machine: {said}')
    assert compiled is not model and len(said) == 1
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for step in (train.TrainingLoss(model), compiled):
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
def test_resume_refuses_another_model_and_bad_files(tmp_path, capsys):
    out = tmp_path / 'out'
    args = TINY + QUIET + [f'--out_dir={out}']
    train.main(args + ['--max_iters=1'])
    before = (out / 'ckpt.pt').read_bytes()
    assert cli.load_checkpoint(str(out / 'ckpt.pt'))['model_config']['rope_base'] == DEFAULTS['rope_base']
    # another model on the command line
    code, _, err = run_main(args + ['--max_iters=2', '--init_from=resume', '--depth=2'], capsys)
    assert_one_line_error(code, err, 'depth', str(out / 'ckpt.pt'))
    assert (out / 'ckpt.pt').read_bytes() == before  # untouched
    # another model in the checkpoint
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    ckpt['model_config']['rope_base'] = 10000.0
    torch.save(ckpt, out / 'ckpt.pt')
    code, _, err = run_main(args + ['--max_iters=2', '--init_from=resume'], capsys)
    assert_one_line_error(code, err, 'rope_base')
    # a checkpoint from before a field existed trained with its default: another value is another model
    del ckpt['model_config']['noise_schedule'], ckpt['model_config']['rope_base']
    torch.save(ckpt, out / 'ckpt.pt')
    code, _, err = run_main(args + ['--max_iters=2', '--init_from=resume', '--noise_schedule=cosine'], capsys)
    assert_one_line_error(code, err, 'noise_schedule')
    # a truncated checkpoint, something else saved there, and none at all
    (out / 'ckpt.pt').write_bytes(before[:len(before) // 2])
    code, _, err = run_main(args + ['--max_iters=2', '--init_from=resume'], capsys)
    assert_one_line_error(code, err, str(out / 'ckpt.pt'))
    torch.save([1, 2, 3], out / 'ckpt.pt')
    code, _, err = run_main(args + ['--max_iters=2', '--init_from=resume'], capsys)
    assert_one_line_error(code, err, str(out / 'ckpt.pt'))
    empty = tmp_path / 'empty'
    code, _, err = run_main(TINY + QUIET + [f'--out_dir={empty}', '--max_iters=2', '--init_from=resume'], capsys)
    assert_one_line_error(code, err, str(empty / 'ckpt.pt'))
    assert not empty.exists()
    # the run's other options may change on resume, but the run says which
    (out / 'ckpt.pt').write_bytes(before)
    train.main(args + ['--max_iters=2', '--init_from=resume', '--learning_rate=2e-3'])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'learning_rate' in notes[0] and 'max_iters' in notes[0], notes
    assert not any(k in notes[0] for k in ('init_from', 'depth', 'out_dir')), notes
    assert cli.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 2


@pytest.mark.parametrize('foreign', [
    'args renamed', 'no weights',
])
@pytest.mark.usefixtures('cached_mnist')
def test_resume_of_a_foreign_checkpoint_is_a_config_error(tmp_path, capsys, foreign):
    out = tmp_path / 'out'
    args = TINY + QUIET + [f'--out_dir={out}']
    train.main(args + ['--max_iters=1'])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    if foreign == 'args renamed':
        ckpt['config'] = ckpt.pop('args')
    else:
        ckpt['model'] = {}
    torch.save(ckpt, out / 'ckpt.pt')
    before = (out / 'ckpt.pt').read_bytes()
    capsys.readouterr()
    with pytest.raises(ConfigError) as e:
        train.main(args + ['--max_iters=2', '--init_from=resume'])
    assert str(out / 'ckpt.pt') in str(e.value)
    assert (out / 'ckpt.pt').read_bytes() == before


@pytest.mark.usefixtures('cached_mnist')
def test_new_run_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    out = tmp_path / 'out'
    args = TINY + QUIET + [f'--out_dir={out}', '--max_iters=1']
    train.main(args)
    before = (out / 'ckpt.pt').read_bytes()
    capsys.readouterr()
    code, stdout, err = run_main(args, capsys)
    assert_one_line_error(code, err, str(out / 'ckpt.pt'), 'init_from')
    assert stdout == '' and (out / 'ckpt.pt').read_bytes() == before


@pytest.mark.usefixtures('cached_mnist')
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
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
    assert 'iter 3' in captured.err and 'nan' in captured.err and str(out / 'ckpt.pt') in captured.err
    assert captured.err.startswith('error: ') and captured.err.count('\n') == 1  # one line, on stderr
    assert len(calls) == 4  # stopped at once: no 5th step
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
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
    real, calls = data.get_batch, []

    def get_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # the batch of step 4: three steps are done
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(data, 'get_batch', get_batch)
    out = tmp_path / 'b'
    with pytest.raises(SystemExit) as e:
        train.main(common + [f'--out_dir={out}'])
    assert e.value.code == 130
    text = capsys.readouterr().out
    assert re.search(r'python train\.py .*--init_from=resume', text)  # how to resume
    assert cli.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3
    monkeypatch.setattr(data, 'get_batch', real)
    train.main(common + [f'--out_dir={out}', '--init_from=resume'])
    out_b = capsys.readouterr().out
    assert sorted(losses(text)) == [1, 2, 3] and sorted(losses(out_b)) == [4, 5]
    assert {**losses(text), **losses(out_b)} == losses(out_a)
    ca, cb = (cli.load_checkpoint(str(tmp_path / d / 'ckpt.pt')) for d in 'ab')
    for key in ('model', 'ema', 'optimizer'):
        assert_same_state(ca[key], cb[key], key)


@pytest.mark.usefixtures('cached_mnist')
def test_keyboard_interrupt_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    def get_batch(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, 'get_batch', get_batch)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f'--out_dir={tmp_path / "out"}', '--max_iters=5'])
    assert e.value.code == 130
    assert not (tmp_path / 'out').exists()


@pytest.mark.usefixtures('cached_mnist')
def test_ctrl_c_stops_between_steps(tmp_path, monkeypatch, capsys):
    """A real SIGINT: the first one lets the running step finish and then saves; a second
    one stops at once, without saving (it may have hit the middle of a step)."""
    real, calls = data.get_batch, []
    handler_before = signal.getsignal(signal.SIGINT)

    def get_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # in step 4 (iter 3): Ctrl-C, `presses` times
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
        return real(*args, **kw)
    monkeypatch.setattr(data, 'get_batch', get_batch)
    args = TINY + ['--eval_interval=100', '--sample_interval=100', '--max_iters=10']
    presses = 1
    with pytest.raises(SystemExit) as e:
        train.main(args + [f'--out_dir={tmp_path / "once"}'])
    assert e.value.code == 130 and len(calls) == 4  # step 4 finished, step 5 never started
    assert sorted(losses(capsys.readouterr().out)) == [1, 2, 3, 4]
    assert cli.load_checkpoint(str(tmp_path / 'once' / 'ckpt.pt'))['iter_num'] == 4
    assert signal.getsignal(signal.SIGINT) is handler_before  # main() restored the handler
    calls.clear()
    presses = 2
    with pytest.raises(SystemExit) as e:
        train.main(args + [f'--out_dir={tmp_path / "twice"}'])
    assert e.value.code == 130 and len(calls) == 4
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
    checkpoint. Only rank 0 logs. A resume with the same world size then runs to the end."""
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', '--eval_interval=2', '--sample_interval=100000']
    rc, text = torchrun(*args, '--max_iters=100000', ctrl_c_after='iter 3/')
    assert rc != 0  # torchrun itself re-raises the signal (with its own traceback)
    assert 'train.py", line' not in text, text[-3000:]  # but the workers stopped cleanly: no traceback of ours
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    k = ckpt['iter_num']
    assert k >= 3 and ckpt['args']['max_iters'] == 100000
    iters = [int(m[0]) for m in PROGRESS.findall(text)]
    assert iters == list(range(1, k + 1)), text[-3000:]  # one line per step (only rank 0 logs), up to the save
    assert re.search(r'torchrun --nproc_per_node=2 train\.py .*--init_from=resume', text)  # how to resume

    rc, text = torchrun(*args, f'--max_iters={k + 2}', '--init_from=resume')
    assert rc == 0, text[-3000:]
    assert [int(m[0]) for m in PROGRESS.findall(text)] == [k + 1, k + 2]
    assert text.count('eval @ ') == 1 + k % 2  # at step k + 1 or k + 2 (eval_interval=2), and at the end
    assert sorted(p.name for p in out.glob('*.png')) == ['loss.png', f'samples_{k + 2:06d}.png']
    rows = (out / 'log.csv').read_text().splitlines()[1:]  # rank 0's rows only, the resumed ones appended
    assert [row.split(',')[0] for row in rows] == [str(i) for i in range(1, k + 3)]
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == k + 2


# -----------------------------------------------------------------------------
# the time budget, and max_iters and time_budget: the one set last wins

def test_time_budget_chooses_max_iters_from_the_warm_step_time(monkeypatch):
    """After 50 steps the clock starts; after 100, max_iters is what fits in the time left, less
    the 5% reserve; then every 500 steps until the decay starts, from the mean step since step
    50. A fake clock makes the numbers exact (and raises StopIteration if read once too often)."""
    clock = iter([110.0, 112.0])  # step 50 at t = 110 s, step 100 at t = 112 s: 40 ms a step
    monkeypatch.setattr(train.time, 'time', lambda: next(clock))
    said = []
    budget = train.TimeBudget(2.0, 100.0, torch.device('cpu'), False, said.append)  # launched at t = 100 s
    args = SimpleNamespace(max_iters=10**9, decay_frac=0.5)  # no end in sight until the budget chooses
    for it in (1, 49, 50, 51):
        budget.after_step(it, args)
        assert args.max_iters == 10**9
    budget.after_step(100, args)
    assert args.max_iters == 100 + int((120 - 12) * 0.95 / 0.04) == 2665
    assert len(said) == 1 and '2665' in said[0]  # the choice is told
    # steps 50..500 took 27 s (60 ms each, evals included), so fewer steps fit in the 83 s left
    budget.after_step(101, args), budget.after_step(499, args)
    assert args.max_iters == 2665
    clock = iter([137.0])
    budget.after_step(500, args)
    assert args.max_iters == 500 + int((120 - 37) * 0.95 / 0.06) == 1814
    budget.after_step(1000, args)  # past the decay's start (907): the choice stays, the clock is not read
    assert args.max_iters == 1814
    # a budget already spent by the start-up stops right there
    clock = iter([110.0, 112.0])
    late = train.TimeBudget(0.1, 100.0, torch.device('cpu'), False, said.append)
    args = SimpleNamespace(max_iters=10**9, decay_frac=0.5)
    late.after_step(50, args), late.after_step(100, args)
    assert args.max_iters == 100


@pytest.mark.usefixtures('cached_mnist')
def test_max_iters_then_a_config_files_time_budget_lets_the_budget_decide(tmp_path, capsys):
    """--max_iters=3 and then a config file with a time budget: the budget chooses (0.06 s,
    spent before step 100: 100 steps), and a resume keeps its choice."""
    out, budget_file = tmp_path / 'out', tmp_path / 'budget.py'
    budget_file.write_text('time_budget = 0.001  # minutes\n')
    args = TINY + QUIET + [f'--out_dir={out}', '--log_interval=1000', '--max_iters=3', str(budget_file)]
    train.main(args)
    progress = PROGRESS.findall(capsys.readouterr().out)
    assert [(int(m[0]), int(m[1])) for m in progress] == [(100, 100)]
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 100 and ckpt['args']['max_iters'] == 100 and ckpt['args']['time_budget'] == 0.001
    train.main(args + ['--init_from=resume'])  # nothing left to do
    assert PROGRESS.findall(capsys.readouterr().out) == []
    assert cli.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 100


@pytest.mark.usefixtures('cached_mnist')
def test_a_config_files_time_budget_then_max_iters_trains_max_iters(tmp_path, monkeypatch, capsys):
    """`python train.py config/mnist_cpu_long.py --max_iters=3`: the file's time budget is
    reset, and the run trains 3 steps."""
    config_file = str(REPO / 'config' / 'mnist_cpu_long.py')
    assert runpy.run_path(config_file)['time_budget'] > 0
    real, calls = data.get_batch, []

    def get_batch(*args, **kw):  # a run the budget would decide takes an hour: stop it (as Ctrl-C) after 20 steps
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(data, 'get_batch', get_batch)
    out = tmp_path / 'out'
    train.main([config_file, *TINY, *QUIET, f'--out_dir={out}', '--max_iters=3'])
    progress = PROGRESS.findall(capsys.readouterr().out)
    assert [(int(m[0]), int(m[1])) for m in progress] == [(1, 3), (2, 3), (3, 3)]
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 3 and ckpt['args']['max_iters'] == 3 and ckpt['args']['time_budget'] == 0.0
    assert ckpt['args']['ema_decay'] == runpy.run_path(config_file)['ema_decay']  # the rest of the file holds


@pytest.mark.usefixtures('cached_mnist')
def test_a_budget_run_stopped_before_it_chose_resumes_to_an_end(tmp_path, monkeypatch, capsys):
    """Stopped before its budget chose max_iters, a run saves the placeholder; the resumed run
    times its own warm steps and chooses then, so it has a real end."""
    real, calls = data.get_batch, []

    def get_batch(*args, **kw):
        calls.append(1)
        if len(calls) in (4, 4 + 110):  # Ctrl-C in step 4, then in step 110 of the resumed run
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(data, 'get_batch', get_batch)
    args = TINY + QUIET + [f'--out_dir={tmp_path / "out"}', '--time_budget=10']
    with pytest.raises(SystemExit):
        train.main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(args + ['--init_from=resume'])
    progress = PROGRESS.findall(capsys.readouterr().out)
    assert int(progress[0][0]) == 4 and int(progress[-1][0]) == 3 + 109
    assert int(progress[0][1]) == 10**9 and int(progress[-1][1]) < 10**9, progress  # chosen after 100 steps
    assert cli.load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['args']['max_iters'] < 10**9
