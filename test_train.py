"""Tests of train.py: the training loop end to end with a tiny model on the real MNIST,
exact resume, checkpoints, stopping (NaN, Ctrl-C, torchrun), and bad input. The data,
the command line and checkpoint I/O have tests of their own (test_data.py, test_cli.py)."""

import contextlib
import os
import re
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

import cli
import data
import train
from cli import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parent
MNIST_DIR = REPO.parent / 'shared' / 'data' / 'mnist'  # the real dataset, when this checkout has it
ALL_MNIST = [n for pair in data.MNIST_FILES.values() for n in pair]
have_real_mnist = all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + '.gz')).exists() for n in ALL_MNIST)
needs_real_mnist = pytest.mark.skipif(not have_real_mnist, reason=f'real MNIST not found in {MNIST_DIR}')


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Make any download attempt fail at once, locally, instead of reaching the internet."""
    nowhere = (tmp_path / 'no-such-mirror').as_uri()
    monkeypatch.setattr(data, 'MNIST_MIRRORS', [nowhere + '/'])
    monkeypatch.setattr(data, 'CIFAR10_URLS', [nowhere + '/cifar-10-python.tar.gz'])


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


def test_step_seed_depends_on_seed_rank_and_iteration_only():
    g = torch.Generator()
    draws = {}
    for key in [(1, 0, 5), (1, 0, 5), (1, 1, 5), (1, 0, 6), (2, 0, 5)]:
        train.seed_step(*key, g)
        draws.setdefault(key, []).append((torch.rand(3), torch.rand(3, generator=g)))
    (a, ga), (b, gb) = draws[(1, 0, 5)]
    assert torch.equal(a, b) and torch.equal(ga, gb)  # the same step draws the same numbers
    others = [draws[k][0] for k in [(1, 1, 5), (1, 0, 6), (2, 0, 5)]]
    assert all(not torch.equal(a, o[0]) and not torch.equal(ga, o[1]) for o in others)


def test_main_help_and_bad_config(capsys):
    train.main(['-h'])
    assert '--width=128' in capsys.readouterr().out
    with pytest.raises(ConfigError):
        train.main(['--width=wide'])


@pytest.mark.parametrize('arg, message', [
    ('--learning_rate=-1', 'learning_rate=-1.0 must be positive'),
    ('--ema_decay=1.0', 'ema_decay=1.0 must be in [0, 1)'),
    ('--decay_frac=1.5', 'decay_frac=1.5 must be in [0, 1]'),
    ('--grad_clip=-1', 'grad_clip=-1.0 must be >= 0'),
    ('--warmup_iters=-5', 'warmup_iters=-5 must be >= 0'),
    ('--cfg_scale=nan', "could not"),
    ('--sample_steps=1001', 'sample_steps=1001 is more than the 1000 diffusion timesteps'),
    ('--sampler=euler', "sampler='euler' from '--sampler=euler' is not one of"),
])
def test_bad_training_numbers_fail_up_front(tmp_path, arg, message):
    out = tmp_path / 'out'
    if arg == '--cfg_scale=nan':  # not a literal: the text 'nan' is not a float
        with pytest.raises(ConfigError, match="cfg_scale='nan'"):
            train.main([arg, f'--out_dir={out}'])
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            train.main([arg, f'--out_dir={out}'])
    assert not out.exists()


def test_a_run_that_fails_before_training_leaves_no_out_dir(tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(data.DataError, match='could not download'):
        train.main([f'--data_dir={tmp_path / "nowhere"}', f'--out_dir={out}', '--compile=False'])
    assert not out.exists() and not (tmp_path / 'nowhere').exists()


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
    """data.load_dataset reading the real MNIST once per test session (it takes ~0.5 s)."""
    if not have_real_mnist:
        pytest.skip(f'real MNIST not found in {MNIST_DIR}')
    real = data.load_dataset

    def load(name, data_dir, split):
        key = (name, str(data_dir), split)
        if key not in _mnist_cache:
            _mnist_cache[key] = real(name, data_dir, split)
        return _mnist_cache[key]
    monkeypatch.setattr(data, 'load_dataset', load)


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
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    # no random state: every step is seeded from (seed, rank, iteration)
    assert ckpt.keys() == {'model', 'ema', 'optimizer', 'config', 'model_config', 'iter_num'}
    assert ckpt['iter_num'] == 3
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
    ca, cb = (cli.load_checkpoint(str(d / 'ckpt.pt')) for d in (a, b))
    assert ca['iter_num'] == cb['iter_num'] == 6
    for key in ('model', 'ema', 'optimizer'):
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
    assert cli.load_checkpoint(str(tmp_path / 'fallback' / 'ckpt.pt'))['iter_num'] == 3


@pytest.mark.skipif(cli.compile_problem(torch.device('cpu')) is not None,
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
    # another rope_base in the checkpoint's config
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['model_config']['rope_base'] == cli.config_block('train.py')['rope_base'][0]  # the config reached the model
    ckpt['config']['rope_base'] = 10000.0
    torch.save(ckpt, out / 'ckpt.pt')
    with pytest.raises(CheckpointError, match=r'checkpoint has rope_base=10000.0, .*--rope_base=10000.0'):
        train.main(args + ['--max_iters=2', '--init_from=resume'])
    (out / 'ckpt.pt').write_bytes(before)
    # other training settings may change on resume, but the run says so
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    ckpt['config']['min_snr_gamma'] = 0.0
    torch.save(ckpt, out / 'ckpt.pt')
    capsys.readouterr()
    train.main(args + ['--max_iters=2', '--init_from=resume', '--min_snr_gamma=1.0', '--learning_rate=2e-3'])
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert note == ["note: this run changes the checkpoint's training settings: min_snr_gamma 0.0 -> 1.0, "
                    "max_iters 1 -> 2, learning_rate 0.001 -> 0.002 (pass the checkpoint's values to "
                    "continue the same run)"]
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
        (losses[gamma],) = train.estimate_loss([model], images, labels, 2, contextlib.nullcontext(), data.get_batch)
        torch.manual_seed(1)
        x, y = data.get_batch(images, labels, 8, torch.Generator().manual_seed(2))
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
    assert 'not finite at iter 3 (loss nan)' in text and str(out / 'ckpt.pt') in text
    assert 'error: the gradients are not finite' in captured.err  # an error goes to stderr
    assert len(calls) == 4
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
    assert 'interrupted at iter 3' in text
    assert re.search(r'resume with: python train\.py .*--init_from=resume', text)
    assert cli.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3
    monkeypatch.setattr(data, 'get_batch', real)
    train.main(common + [f'--out_dir={out}', '--init_from=resume'])
    out_b = capsys.readouterr().out
    assert 'resumed from' in out_b and {**losses(text), **losses(out_b)} == losses(out_a)
    ca, cb = (cli.load_checkpoint(str(tmp_path / d / 'ckpt.pt')) for d in 'ab')
    for key in ('model', 'ema', 'optimizer'):
        assert_same_state(ca[key], cb[key], key)


@pytest.mark.usefixtures('cached_mnist')
def test_keyboard_interrupt_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    def get_batch(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, 'get_batch', get_batch)
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
    assert 'interrupted at iter 4' in capsys.readouterr().out
    assert cli.load_checkpoint(str(tmp_path / 'once' / 'ckpt.pt'))['iter_num'] == 4
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
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == k and ckpt['config']['max_iters'] == 100000

    rc, text = torchrun(*args, f'--max_iters={k + 2}', '--init_from=resume')
    assert rc == 0, text[-3000:]
    assert text.count(f'resumed from {out / "ckpt.pt"} at iter {k}') == 1
    assert [int(m[0]) for m in PROGRESS.findall(text)] == [k + 1, k + 2]
    assert text.count('eval @ ') == 1 + k % 2 and text.count('done: ') == 1
    assert [p.name for p in out.glob('*.png')] == [f'samples_{k + 2:06d}.png']
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == k + 2


def test_time_budget_chooses_max_iters_from_the_warm_step_time(monkeypatch):
    """After 50 steps the clock starts; after 100, max_iters is what fits in the time left, less
    the 5% reserve. A fake clock makes the numbers exact."""
    clock = iter([110.0, 112.0])  # step 50 at t = 110 s, step 100 at t = 112 s: 40 ms a step
    monkeypatch.setattr(train.time, 'time', lambda: next(clock))
    budget = train.TimeBudget(2.0, 100.0, torch.device('cpu'), ddp=False)  # launched at t = 100 s
    assert [budget.after_step(it, 10**9) for it in (1, 49, 50, 51)] == [None] * 4
    chosen = budget.after_step(100, 10**9)
    assert budget.step_seconds == pytest.approx(0.04) and budget.elapsed == pytest.approx(12.0)
    assert chosen == 100 + int((120 - 12) * 0.95 / 0.04)  # 2565
    # checked again every 500 steps until the decay starts, from the mean step since step 100:
    # steps 100..500 took 24 s (60 ms each, evals included), so fewer steps fit in the 84 s left
    assert [budget.after_step(it, 1300) for it in (101, 499)] == [None, None]
    clock = iter([136.0])
    assert budget.after_step(500, 1300) == 500 + int((120 - 36) * 0.95 / 0.06)  # 1830
    assert budget.step_seconds == pytest.approx(0.06)
    assert budget.after_step(1500, 1300) is None  # the decay has started: the choice stays
    # a budget already spent by the start-up stops right there
    clock = iter([110.0, 112.0])
    late = train.TimeBudget(0.1, 100.0, torch.device('cpu'), ddp=False)
    late.after_step(50, 10**9)
    assert late.after_step(100, 10**9) == 100


@pytest.mark.usefixtures('cached_mnist')
def test_time_budget_run_trains_the_chosen_steps_and_a_resume_keeps_them(tmp_path, capsys):
    out = tmp_path / 'out'
    args = TINY[:-1] + [f'--out_dir={out}', '--eval_interval=100000', '--sample_interval=100000',
                        '--log_interval=1000', '--compile=False']
    train.main(args + ['--time_budget=0.001'])  # 0.06 s: spent before step 100, so 100 steps
    text = capsys.readouterr().out
    assert re.search(r'time_budget 0.001 min: a warm step takes [\d.]+ ms and \S+ have passed, so max_iters=100 ', text)
    assert 'done: 100 iters' in text
    ckpt = cli.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 100 and ckpt['config']['max_iters'] == 100
    train.main(args + ['--time_budget=0.001', '--init_from=resume'])
    text = capsys.readouterr().out
    assert "keeping the checkpoint's max_iters=100" in text and 'nothing to do: the checkpoint is at iter 100' in text
    with pytest.raises(ConfigError, match='time_budget=-1.0 must be >= 0'):
        train.main(args + ['--time_budget=-1', f'--out_dir={tmp_path / "neg"}'])
