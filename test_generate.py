"""
Tests for generate.py (sampling from a checkpoint) and bench.py (the benchmark table).
Run with: python -m pytest -q test_generate.py

They use a tiny MNIST-shaped checkpoint (28px, patch 7 -> a 4x4 token grid, 4 row blocks
of 4 tokens, depth 1, width 16) written the way train.py writes one, with random weights:
a freshly initialized ACDiT outputs exactly zero (adaLN-Zero) and would sample the same
flat image for every seed and label. Most tests call main() in-process (fast); only the
exit-status checks run the scripts as subprocesses.
"""

import dataclasses
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import acdit
import bench
import generate
import train
from train import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parent
TINY = dict(dataset='mnist', patch_size=7, block_h=1, block_w=4, depth=1, width=16, n_heads=2,
            cfg_scale=1.5, sample_steps=4, sampler='ddim')  # sampling keys differ from train.py's defaults on purpose
TINY_MODEL = acdit.ACDiTConfig(img_size=28, in_channels=1, patch_size=7, block_h=1, block_w=4,
                               depth=1, width=16, n_heads=2,
                               min_snr_gamma=train.DEFAULTS['min_snr_gamma'])


def random_state(mcfg, seed):
    """The state dict of an ACDiT whose every parameter is random (no path is trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    model = acdit.ACDiT(mcfg)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}


def write_checkpoint(path, train_config, **overrides):
    """A checkpoint laid out as train.py saves one; overrides replace or drop (None) entries."""
    mcfg = train.model_config(train_config)
    ckpt = {'model': random_state(mcfg, 1), 'ema': random_state(mcfg, 2), 'optimizer': {},
            'config': train_config, 'model_config': dataclasses.asdict(mcfg), 'iter_num': 7,
            'world_size': 1, 'rng': {}}
    ckpt.update(overrides)
    train.save_checkpoint(str(path), {k: v for k, v in ckpt.items() if v is not None})
    return path


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp('run') / 'ckpt.pt', dict(train.DEFAULTS, **TINY))


def generate_npz(ckpt, tmp_path, *args):
    """Run generate.main in-process; return its result and the arrays it saved."""
    npz = tmp_path / f'samples{len(list(tmp_path.iterdir()))}.npz'
    result = generate.main([f'--ckpt={ckpt}', f'--out={npz.with_suffix(".png")}', f'--npz={npz}', *args])
    with np.load(npz) as f:
        return result, f['images'], f['labels']


def test_tiny_train_config_describes_the_tiny_model():
    assert train.model_config(dict(train.DEFAULTS, **TINY)) == TINY_MODEL
    assert (TINY_MODEL.n_blocks, TINY_MODEL.block_len) == (4, 4)


# -----------------------------------------------------------------------------
# outputs

def test_png_npz_and_gif(ckpt, tmp_path, capsys):
    png, npz, gif = tmp_path / 'grid.png', tmp_path / 'raw.npz', tmp_path / 'sub' / 'gen.gif'
    generate.main([f'--ckpt={ckpt}', '--labels=1,3,5', '--n_per_class=2', '--steps=3',
                   f'--out={png}', f'--npz={npz}', f'--gif={gif}'])
    out = capsys.readouterr().out
    assert 'network evaluations' in out and 'token-forwards' in out and 'KV cache' in out

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


def test_default_out_path_and_sampling_settings_match_train_py(ckpt, tmp_path, capsys):
    """With no options generate.py reads cfg_scale and sample_steps from the checkpoint and
    draws exactly the grid train.py's sample_grid draws (EMA weights, seed 0)."""
    generate.main([f'--ckpt={ckpt}'])
    assert 'ddim, 4 steps per block, cfg_scale 1.5' in capsys.readouterr().out
    ema, _ = generate.load_model(str(ckpt), 'ema')
    reference = tmp_path / 'train_samples.png'
    train.sample_grid(ema, str(reference), types.SimpleNamespace(**TINY), torch.device('cpu'))
    ours = ckpt.parent / 'samples.png'  # next to the checkpoint
    assert np.array_equal(np.array(Image.open(ours)), np.array(Image.open(reference)))


def test_fallback_settings_without_a_train_config(tmp_path, capsys):
    path = write_checkpoint(tmp_path / 'ckpt.pt', dict(train.DEFAULTS, **TINY), config=None)
    with pytest.raises(ConfigError, match='steps=2000'):  # reaches the sampler only if options load
        generate.main([f'--ckpt={path}', '--steps=2000'])
    generate.main([f'--ckpt={path}', '--labels=0', '--n_per_class=1', '--steps=1'])
    assert f"cfg_scale {train.DEFAULTS['cfg_scale']}" in capsys.readouterr().out


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
    cfg, batch, steps = TINY_MODEL, 6, 3
    assert cached.token_forwards == bench.sample_token_forwards(cfg, batch, steps, cached=True)
    assert uncached.token_forwards == bench.sample_token_forwards(cfg, batch, steps, cached=False)
    assert cached.evals == cfg.n_blocks * steps + cfg.n_blocks - 1  # steps + commits
    assert uncached.evals == cfg.n_blocks * steps
    # the cache ends holding k and v of N-1 blocks, every layer, one copy shared by CFG's halves
    per_element = torch.finfo(torch.float32).bits // 8
    assert cached.kv_bytes == 2 * cfg.depth * (cfg.n_blocks - 1) * cfg.block_len * cfg.width * batch * per_element
    assert uncached.kv_bytes == 0


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm'])
def test_seed_decides_the_images(ckpt, tmp_path, sampler):
    args = ['--labels=2,4', '--n_per_class=1', '--steps=2', f'--sampler={sampler}']
    _, a, _ = generate_npz(ckpt, tmp_path, *args, '--seed=1')
    _, b, _ = generate_npz(ckpt, tmp_path, *args, '--seed=1')
    _, c, _ = generate_npz(ckpt, tmp_path, *args, '--seed=2')
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_weights_option_picks_ema_or_raw_model(ckpt, tmp_path):
    args = ['--labels=3', '--n_per_class=2', '--steps=2']
    _, ema, _ = generate_npz(ckpt, tmp_path, *args)
    _, raw, _ = generate_npz(ckpt, tmp_path, *args, '--weights=model')
    assert not np.array_equal(ema, raw)


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
    ('--sampler=euler', "sampler='euler': choose one of ddim, ddpm"),
    ('--weights=best', "weights='best'"),
    ('--out=grid.txt', 'needs an image extension'),
    ('--bogus=1', "unknown config key 'bogus'"),
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
    config = dict(train.DEFAULTS, **TINY)
    if content == 'a list':
        train.save_checkpoint(str(path), [1, 2, 3])
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
    data = ckpt.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    out = f'--out={tmp_path / "x.png"}'
    cases = {  # arguments -> exit status: 1 for a file that cannot be used, 2 for a bad option
        (f'--ckpt={tmp_path / "nothing-here.pt"}', out): 1,
        (f'--ckpt={truncated}', out): 1,
        (f'--ckpt={ckpt}', out, '--labels=10'): 2,
        (f'--ckpt={ckpt}', out, '--steps=0'): 2,
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
    generate.main(['--help'])
    out = capsys.readouterr().out
    assert all(f'--{k}=' in out for k in generate.DEFAULTS)
    bench.main(['-h'])
    out = capsys.readouterr().out
    assert all(f'--{k}=' in out for k in bench.DEFAULTS)


# -----------------------------------------------------------------------------
# bench.py

def test_token_forward_counts_from_the_definition():
    cfg = acdit.ACDiTConfig()  # 7 blocks of 7 tokens
    # cached: 2*B rows x Bl tokens per step, plus B x Bl per commit of blocks 0..5
    assert bench.sample_token_forwards(cfg, 1, 10, cached=True) == 2 * 10 * 7 * 7 + 6 * 7
    # uncached: block i reruns (i+1)*Bl tokens every step: 7 * (1+2+...+7) = 196 per row and step
    assert bench.sample_token_forwards(cfg, 1, 10, cached=False) == 2 * 10 * 196
    # with many steps the cache saves a factor of (N+1)/2 in token-forwards
    ratio = bench.sample_token_forwards(cfg, 1, 10 ** 6, False) / bench.sample_token_forwards(cfg, 1, 10 ** 6, True)
    assert ratio == pytest.approx((7 + 1) / 2, rel=1e-4)


def test_bench_quick_prints_the_table(capsys):
    rows = bench.main(['--quick=True', '--device=cpu'])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith('|')]
    assert 'ratio' in table[0] and 'ideal' in table[0] and 'time (ms)' in table[0]
    assert set(table[1]) <= set('|-: ')  # the Markdown header rule
    body = '\n'.join(table[2:])
    for name in ('sampling', 'training step', 'KV cache', 'uncached', 'DiT (1 block)', 'ACDiT, sdpa',
                 '7 blocks x 7', '16 blocks x 16'):
        assert name in body
    assert len(table) == 2 + len(rows) == 2 + 8  # flex rows only on CUDA
    assert 'FlexAttention rows skipped' in out and 'torch' in out
    for line in table[2:]:
        ratio = line.split('|')[-3].strip()
        assert ratio.endswith('x') and float(ratio[:-1]) > 0


# -----------------------------------------------------------------------------
# evaluate.py: the FID formula against its closed form for diagonal covariances

def test_frechet_distance_matches_the_diagonal_closed_form():
    import evaluate
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64) + 1.0
    va, vb = a.var(0), b.var(0)  # the sample covariances are nearly diagonal; use the sample values
    closed = ((a.mean(0) - b.mean(0)) ** 2).sum() + (va + vb - 2 * (va * vb).sqrt()).sum()
    assert abs(evaluate.frechet_distance(a, b) - closed.item()) < 0.05 * closed.item()
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6


def test_evaluate_rejects_bad_options_before_any_work(tmp_path):
    import evaluate
    with pytest.raises(ConfigError, match='n_per_class=0 must be at least 1'):
        evaluate.main(['--n_per_class=0'])
    with pytest.raises(CheckpointError, match='no checkpoint at'):
        evaluate.main([f'--ckpt={tmp_path / "missing.pt"}'])
    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='not a complete torch.save archive'):
        evaluate.main([f'--ckpt={tmp_path / "notes.txt"}'])
    # a bad sampling option or weights name is caught before the (missing) checkpoint is read
    missing = f'--ckpt={tmp_path / "missing.pt"}'
    for bad, message in [('--sampler=euler', "sampler='euler': choose one of ddim, ddpm"),
                         ('--cfg_scale=strong', 'cfg_scale=strong must be a number'),
                         ('--steps=0', 'steps=0 must be an integer >= 1'),
                         ('--weights=best', "weights='best': choose 'ema' or 'model'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate.main([missing, bad])


@pytest.mark.parametrize('args, expected', [
    ([], (1.5, 4, 'ddim')),  # 'auto': how the checkpoint's run sampled (TINY)
    (['--cfg_scale=3', '--steps=10', '--sampler=ddpm'], (3.0, 10, 'ddpm')),
])
def test_evaluate_samples_as_the_checkpoint_did_unless_told(ckpt, monkeypatch, capsys, args, expected):
    import evaluate
    seen = {}

    def fake_judge_model(model, judge, test_x, n_per_class, cfg_scale, steps, sampler, seed):
        seen['settings'] = (cfg_scale, steps, sampler)
        return 1.0, 0.0, 0.0, torch.eye(10, dtype=torch.long) * n_per_class
    monkeypatch.setattr(evaluate, 'judge_model', fake_judge_model)
    monkeypatch.setattr(evaluate, 'get_judge', lambda data_dir, path: None)
    monkeypatch.setattr(train, 'load_dataset', lambda *a: (None, None))
    evaluate.main([f'--ckpt={ckpt}'] + args)
    assert seen['settings'] == expected
    assert f'{expected[2]} {expected[1]} steps/block, CFG {expected[0]}' in capsys.readouterr().out


def test_judge_model_counts_what_the_judge_reads(ckpt):
    """accuracy and the confusion matrix come from the judge's readings of the samples asked
    for: a judge that reads 'class 3' for every image is right exactly on the 3s."""
    import evaluate

    class ReadsThree(evaluate.Judge):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()
    model, _ = generate.load_model(str(ckpt), 'ema')
    test_x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    acc, fid, _, confusion = evaluate.judge_model(model, ReadsThree(), test_x, n_per_class=3, steps=2)
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected[:, 3] = 3
    assert torch.equal(confusion, expected) and acc == pytest.approx(0.1) and fid > 0
    assert evaluate.misreadings(confusion, top=2) == '0 read as 3: 3/3, 1 read as 3: 3/3'
