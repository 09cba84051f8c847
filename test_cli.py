"""
Tests for cli.py, what every script shares: the command line (OPTIONS defaults, config
files, --key=value, --help, pairs of options where the one set last wins), one-line
errors, checkpoints, devices, and the sampling settings generate.py and evaluate.py
resolve from a checkpoint. Also that no script imports another, that importing one does
nothing, and that the shipped config files build their models.
Run with: python -m pytest -q test_cli.py
"""

import ast
import dataclasses
import importlib
import os
import runpy
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import acdit
import cli
import train
from cli import ConfigError
from data import DataError

REPO = Path(__file__).resolve().parent
SCRIPTS = ('train', 'generate', 'bench', 'evaluate', 'tradeoff')
WITH_OPTIONS = ('train', 'generate', 'evaluate', 'bench')  # tradeoff.py passes its flags on to train.py

# a small script's options, to test the parser apart from any real script
OPTIONS = {
    'name': ('a', 'a string with choices'),
    'count': (3, 'an int'),
    'rate': (1e-3, 'a float'),
    'flag': (True, 'a bool'),
    'out': ('out', 'a free string'),
    'steps': (100, 'steps, or ...'),
    'minutes': (0.0, '... a time budget: the one set last wins'),
}
CHOICES = {'name': ('a', 'b')}
PAIRS = [('steps', 'minutes')]


def parse(argv, options=OPTIONS, choices=CHOICES, exclusive=PAIRS):
    return cli.parse_args(argv, 'Doc.', options, choices, exclusive)


def write(path, text):
    path.write_text(text)
    return str(path)


# -----------------------------------------------------------------------------
# the command line

def test_defaults_and_typed_overrides():
    before = {k: v for k, v in OPTIONS.items()}
    args = parse([])
    assert args == types.SimpleNamespace(**{k: d for k, (d, _) in OPTIONS.items()})
    args = parse(['--count=7', '--rate=2', '--flag=false', '--name=b', '--out=123', '--minutes=1.5'])
    assert args.count == 7 and type(args.count) is int
    assert args.rate == 2.0 and type(args.rate) is float  # an int will do for a float
    assert args.flag is False and parse(['--flag=TRUE']).flag is True
    assert args.name == 'b' and args.out == '123'  # a string option keeps the text as it is
    assert args.minutes == 1.5
    assert parse(['--out=a=b']).out == 'a=b'  # split at the first '='
    assert OPTIONS == before  # the defaults are not changed


def test_argv_none_reads_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['small.py', '--count=9'])
    assert parse(None).count == 9


def test_help_lists_each_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('Doc.')
    lines = out.splitlines()
    for key, (default, help_) in OPTIONS.items():
        line = next((ln for ln in lines if ln.startswith(f'  --{key}={default!r} ')), None)
        assert line is not None and help_ in line, (key, out)
    with pytest.raises(SystemExit) as e:
        parse(['--count=bad', '-h'])  # help wins over anything else given
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith('Doc.')


@pytest.mark.parametrize('argv, name', [
    (['--cuont=4'], 'cuont'),                   # an unknown option
    (['--count=3.5'], 'count'),                 # not an int
    (['--count=many'], 'count'),
    (['--count=True'], 'count'),                # a bool is no int
    (['--flag=1'], 'flag'),                     # a bool is true or false
    (['--rate=fast'], 'rate'),
    (['--name=c'], 'name'),                     # not one of the choices
    (['--count', '4'], '--count'),              # --key value, not --key=value
    (['count=4'], 'count=4'),
])
def test_bad_command_line_names_the_option(argv, name):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert name in str(e.value) and '\n' not in str(e.value)


def test_config_files_and_overrides_in_the_order_given(tmp_path):
    path = write(tmp_path / 'my_config.py',
                 'import math\n'                       # modules, helpers and _private names are not options
                 'def twice(x):\n    return 2 * x\n'
                 '_private = "ignored"\n'
                 'count = twice(4)\n'
                 'rate = 1  # an int for a float\n'
                 'name = "b"\n')
    args = parse([path])
    assert (args.count, args.rate, args.name) == (8, 1.0, 'b') and type(args.rate) is float
    assert parse([path, '--count=5']).count == 5   # the later one wins
    assert parse(['--count=5', path]).count == 8


@pytest.mark.parametrize('text, name', [
    ('cuont = 4\n', 'cuont'),                   # every top-level name is an option
    ('flag = "yes"\n', 'flag'),                 # of the default's type
    ('count = 2.0\n', 'count'),
    ('name = "c"\n', 'name'),                   # and one of its choices
    ('count = = 3\n', 'SyntaxError'),           # a file that does not parse
    ('count = 2\nrate = undefined\n', 'undefined'),   # or fails when run
    ('count = 1 / 0\n', 'ZeroDivisionError'),
])
def test_bad_config_file_is_one_line_naming_the_file_and_the_problem(tmp_path, text, name):
    path = write(tmp_path / 'bad.py', text)
    with pytest.raises(ConfigError) as e:
        parse([path])
    assert name in str(e.value) and 'bad.py' in str(e.value) and '\n' not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match='missing.py'):
        parse([str(tmp_path / 'missing.py')])


def test_of_a_pair_the_option_set_last_wins(tmp_path):
    """train.py's (max_iters, time_budget): setting one puts the other back to its default,
    on the command line, from a config file, or inside one file."""
    budget = write(tmp_path / 'budget.py', 'minutes = 30.0\n')
    args = parse([budget, '--steps=3'])
    assert (args.steps, args.minutes) == (3, 0.0)        # the file's budget is reset
    args = parse(['--steps=3', budget])
    assert (args.steps, args.minutes) == (100, 30.0)     # the budget decides
    args = parse(['--minutes=5', '--steps=7', '--minutes=6'])
    assert (args.steps, args.minutes) == (100, 6.0)
    both = write(tmp_path / 'both.py', 'minutes = 30.0\nsteps = 9\n')
    assert (parse([both]).steps, parse([both]).minutes) == (9, 0.0)   # in a file: the later assignment
    assert parse(['--count=1', '--steps=3', '--minutes=0.5'], exclusive=()).steps == 3   # no pairs, no reset
    args = parse([budget, '--count=2'])   # an option outside the pair resets nothing
    assert (args.count, args.minutes) == (2, 30.0)


def test_check_and_run_cli(capsys):
    cli.check(True, 'never shown')
    with pytest.raises(ConfigError):
        cli.check(False, 'out of range')
    for error in (ConfigError('bad option'), DataError('bad data')):
        def main():
            raise error
        with pytest.raises(SystemExit) as e:
            cli.run_cli(main)
        assert e.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == '' and captured.err.count('\n') == 1 and str(error) in captured.err
    cli.run_cli(lambda: None)  # a run without a mistake just returns
    with pytest.raises(ZeroDivisionError):  # a bug in the code is not dressed up as a user's mistake
        cli.run_cli(lambda: 1 / 0)


# -----------------------------------------------------------------------------
# the scripts' command lines

def run_main(name, argv, capsys):
    """module.main(argv) as `python name.py argv` runs it: (exit status, stdout, stderr)."""
    module = importlib.import_module(name)
    try:
        cli.run_cli(lambda: module.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize('name', WITH_OPTIONS)
def test_every_script_lists_its_options_with_defaults(name, capsys):
    module = importlib.import_module(name)
    code, out, err = run_main(name, ['--help'], capsys)
    assert code == 0 and err == ''
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    assert len(module.OPTIONS) >= 5
    lines = out.splitlines()
    for key, (default, help_) in module.OPTIONS.items():
        assert help_, key  # every option is explained
        line = next((ln for ln in lines if ln.startswith(f'  --{key}={default!r} ')), None)
        assert line is not None and help_ in line, key


def test_tradeoff_help_and_the_options_generate_and_evaluate_share(capsys):
    code, out, _ = run_main('tradeoff', ['--help'], capsys)  # its other flags go to train.py
    assert code == 0 and '--root=DIR' in out and 'train.py' in out
    gen, ev = (importlib.import_module(n) for n in ('generate', 'evaluate'))
    for key in ('ckpt', 'cfg_scale', 'sampler', 'steps', 'seed', 'weights', 'device'):
        assert gen.OPTIONS[key][0] == ev.OPTIONS[key][0], key
        assert gen.CHOICES.get(key) == ev.CHOICES.get(key), key


def test_tradeoff_passes_a_bad_option_to_train_and_stops_with_its_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / 'tradeoff.py'), '--bogus=1', f'--root={tmp_path / "runs"}'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count('\n') == 1 and "unknown option 'bogus'" in run.stderr
    assert list(tmp_path.iterdir()) == []                       # nothing written


BAD_OPTIONS = {'train': ['--batch_size=many', '--dataset=imagenet'], 'generate': ['--n_per_class=many'],
               'evaluate': ['--n_per_class=many'], 'bench': ['--reps=many']}


@pytest.mark.parametrize('name, arg', [(n, a) for n in WITH_OPTIONS
                                       for a in ['--bogus_option=1', '--device=tpu', *BAD_OPTIONS[n]]])
def test_a_bad_option_is_one_line_exit_2_and_nothing_written(name, arg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(name, [arg], capsys)
    assert code == 2 and out == ''
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and arg[2:].split('=')[0] in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_from_the_command_line_a_bad_option_is_one_line_exit_2():
    r = subprocess.run([sys.executable, 'train.py', '--bogus=1'], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ''
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'bogus' in lines[0], r.stderr


def imports_of(path):
    """Every module a file imports, at the top or inside a function, by its first name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
        elif isinstance(node, ast.Call) and getattr(node.func, 'id', getattr(node.func, 'attr', None)) in (
                '__import__', 'import_module') and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split('.')[0])
    return names


def test_no_script_imports_another_script():
    for name in SCRIPTS:
        imported = imports_of(REPO / f'{name}.py')
        assert 'cli' in imported, name  # the shared command line
        assert not imported & set(SCRIPTS), (name, sorted(imported & set(SCRIPTS)))
    for name in ('cli', 'data', 'judge', 'acdit'):  # nor does a shared module
        assert not imports_of(REPO / f'{name}.py') & set(SCRIPTS), name
    # the check itself sees the usual forms
    assert {'ast', 'cli', 'train', 'data'} <= imports_of(REPO / 'test_cli.py')


def test_import_has_no_side_effects(tmp_path):
    modules = ', '.join(['train', 'generate', 'bench', 'evaluate', 'tradeoff', 'cli', 'judge', 'data'])
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(REPO)!r}); import {modules}'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r.stderr
    assert list(tmp_path.iterdir()) == []  # no out/ or data/ or judge.pt created


@pytest.mark.parametrize('name', sorted(p.name for p in (REPO / 'config').glob('*.py')))
def test_shipped_config_files_parse_and_build_their_models(name):
    path = str(REPO / 'config' / name)
    args = cli.parse_args([path], train.__doc__, train.OPTIONS, train.CHOICES)
    written = {k: v for k, v in runpy.run_path(path).items() if not k.startswith('_')}
    assert written and all(getattr(args, k) == v for k, v in written.items())  # every value reached args
    config = train.model_config(args)  # its numbers pass train.py's checks and the model's invariants
    with torch.device('meta'):  # the shape only: no memory, no time
        model = acdit.ACDiT(config)
    assert model.num_params() > 0 and model.config.depth == args.depth and model.config.width == args.width


# -----------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip(tmp_path):
    obj = {'model': {'w': torch.randn(3, 4), 'b': torch.arange(3)}, 'iter_num': 7,
           'args': {'depth': 3, 'rate': 1e-3, 'name': 'x', 'flag': True}, 'test_loss': 0.25,
           'rng': torch.Generator().manual_seed(3).get_state()}
    path = tmp_path / 'run' / 'ckpt.pt'  # the directory does not exist yet
    cli.save_checkpoint(str(path), obj)
    cli.save_checkpoint(str(path), obj)  # overwriting is fine too
    assert os.listdir(path.parent) == ['ckpt.pt']  # no temp files left behind
    back = cli.load_checkpoint(str(path))
    assert torch.equal(back['model']['w'], obj['model']['w']) and torch.equal(back['model']['b'], obj['model']['b'])
    assert back['iter_num'] == 7 and back['args'] == obj['args'] and back['test_loss'] == 0.25
    assert torch.equal(back['rng'], obj['rng'])


def test_save_checkpoint_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.save_checkpoint('ckpt.pt', {'iter_num': 3})  # no directory part
    assert os.listdir(tmp_path) == ['ckpt.pt'] and cli.load_checkpoint('ckpt.pt') == {'iter_num': 3}


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    cli.save_checkpoint(str(path), {'iter_num': 1})
    with pytest.raises(Exception):
        cli.save_checkpoint(str(path), {'iter_num': 2, 'oops': lambda: None})  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ['ckpt.pt'] and cli.load_checkpoint(str(path))['iter_num'] == 1
    # killed (Ctrl-C) in the middle of writing: half a file was written, but not to path
    real_save = torch.save

    def interrupted_save(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cli.save_checkpoint(str(path), {'iter_num': 3})
    monkeypatch.setattr(torch, 'save', real_save)
    assert os.listdir(tmp_path) == ['ckpt.pt'] and cli.load_checkpoint(str(path))['iter_num'] == 1


class NotATensor:  # a custom class: torch's safe loader (weights_only=True) refuses it
    pass


def bad_checkpoint(path, kind):
    """Write a checkpoint gone wrong to path."""
    cli.save_checkpoint(str(path), {'w': torch.randn(100, 100)})
    whole = path.read_bytes()
    if kind == 'truncated':
        path.write_bytes(whole[:len(whole) // 2])
    elif kind == 'garbage':
        path.write_bytes(b'not a checkpoint at all')
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'other zip':  # a complete zip archive that is not torch.save's
        path.unlink()
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('notes.txt', 'hello')
    elif kind == 'unsafe object':
        cli.save_checkpoint(str(path), {'thing': NotATensor()})
    elif kind == 'missing':
        path.unlink()


@pytest.mark.parametrize('kind', [
    'truncated', 'garbage', 'other zip', 'unsafe object', 'missing',
    'empty',
])
def test_unreadable_checkpoint_is_a_config_error_naming_it(tmp_path, kind):
    path = tmp_path / 'ckpt.pt'
    bad_checkpoint(path, kind)
    with pytest.raises(ConfigError) as e:
        cli.load_checkpoint(str(path))
    assert str(path) in str(e.value)


def tiny_checkpoint(path, **changes):
    """A train.py-style checkpoint of a tiny model; returns (model, ema) as saved."""
    config = acdit.ACDiTConfig(img_size=28, patch_size=7, block_h=1, block_w=4, depth=1, width=16, n_heads=2)
    torch.manual_seed(0)
    model, ema = acdit.ACDiT(config), acdit.ACDiT(config)
    with torch.no_grad():
        for p in list(model.parameters()) + list(ema.parameters()):
            p.normal_(0, 0.1)
    args = {k: d for k, (d, _) in train.OPTIONS.items()}
    ckpt = {'model': model.state_dict(), 'ema': ema.state_dict(), 'args': args,
            'model_config': dataclasses.asdict(config), 'iter_num': 5, **changes}
    cli.save_checkpoint(str(path), {k: v for k, v in ckpt.items() if v is not None})
    return model, ema


def test_load_model_gives_the_chosen_weights_in_eval_mode(tmp_path):
    path = tmp_path / 'ckpt.pt'
    saved = dict(zip(('model', 'ema'), tiny_checkpoint(path)))
    for weights in ('ema', 'model'):
        model, ckpt = cli.load_model(str(path), weights)
        assert not model.training and ckpt['iter_num'] == 5
        assert model.config.attn_backend == 'sdpa'  # whatever it trained with
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, saved[weights].state_dict()[name]), (weights, name)


@pytest.mark.parametrize('change, named', [
    ({'ema': None}, 'ema'),                                 # no such weights
    ({'model_config': None, 'args': None}, 'ckpt.pt'),      # not train.py's
    ({'model_config': {'patch_size': 5}}, 'ckpt.pt'),       # a model that cannot be built
    ({'model_config': {'bogus_field': 1}}, 'ckpt.pt'),      # nor built by this ACDiT
    ({'ema': {'w': torch.zeros(3)}}, 'ckpt.pt'),            # weights of another model
])
def test_load_model_refuses_a_checkpoint_that_does_not_fit(tmp_path, change, named):
    path = tmp_path / 'ckpt.pt'
    if change.get('model_config'):
        good = tiny_checkpoint(tmp_path / 'good.pt')[0].config
        change = {'model_config': dict(dataclasses.asdict(good), **change['model_config'])}
    tiny_checkpoint(path, **change)
    with pytest.raises(ConfigError) as e:
        cli.load_model(str(path), 'ema')
    assert named in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ConfigError, match='nowhere.pt'):
        cli.load_model(str(tmp_path / 'nowhere.pt'))


# -----------------------------------------------------------------------------
# devices

def test_pick_device():
    assert cli.pick_device('cpu') == torch.device('cpu')
    assert cli.pick_device('auto').type in ('cpu', 'cuda', 'mps')
    with pytest.raises(ConfigError, match='tpu'):
        cli.pick_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match='cuda'):
            cli.pick_device('cuda')
        assert cli.pick_device('auto') != torch.device('cuda')
    cli.sync(torch.device('cpu'))  # nothing to wait for on a CPU


def test_autocast_context_is_float32_on_cpu():
    with cli.autocast_context(torch.device('cpu'), 'bfloat16'):
        y = torch.randn(2, 3) @ torch.randn(3, 2)
    assert y.dtype == torch.float32


# -----------------------------------------------------------------------------
# sampling settings: 'auto' means what the checkpoint's run drew its grids with

def opts(cfg_scale='auto', steps='auto', sampler='auto', seed=0, n_frames=0):
    return types.SimpleNamespace(cfg_scale=cfg_scale, steps=steps, sampler=sampler, seed=seed, n_frames=n_frames)


def run_ckpt(cfg_scale=1.5, sample_steps=4, sampler='ddim', n_timesteps=1000):
    return {'args': {'cfg_scale': cfg_scale, 'sample_steps': sample_steps, 'sampler': sampler},
            'model_config': {'n_timesteps': n_timesteps}}


def test_sampling_settings_auto_reads_the_checkpoint():
    settings = cli.sampling_settings(opts(), run_ckpt())
    assert settings == (1.5, 4, 'ddim') and [type(v) for v in settings] == [float, int, str]
    assert cli.sampling_settings(opts(sampler='dpm++'), run_ckpt()) == (1.5, 4, 'dpm++')  # one told, the rest auto
    settings = cli.sampling_settings(opts('3', '10', 'ddpm'), run_ckpt())
    assert settings == (3.0, 10, 'ddpm') and [type(v) for v in settings] == [float, int, str]
    assert cli.sampling_settings(opts(steps='20'), run_ckpt(n_timesteps=20))[1] == 20  # every timestep


@pytest.mark.parametrize('option, named', [
    (dict(cfg_scale='strong'), 'cfg_scale'),
    (dict(cfg_scale='nan'), 'cfg_scale'),
    (dict(cfg_scale='inf'), 'cfg_scale'),
    (dict(steps='0'), 'steps'),
    (dict(steps='-3'), 'steps'),
    (dict(steps='2.5'), 'steps'),
    (dict(steps='many'), 'steps'),
    (dict(steps='1001'), 'steps'),      # more than the model's 1000 timesteps
    (dict(sampler='euler'), 'sampler'),
])
def test_sampling_settings_reject_bad_values(option, named):
    with pytest.raises(ConfigError) as e:
        cli.sampling_settings(opts(**option), run_ckpt())
    assert named in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('recorded, named', [
    (dict(sampler='euler'), 'sampler'), (dict(sample_steps=0), 'steps'), (dict(cfg_scale=float('inf')), 'cfg_scale'),
    (dict(sample_steps=50, n_timesteps=20), 'steps'),
])
def test_sampling_settings_reject_a_bad_recorded_value(recorded, named):
    with pytest.raises(ConfigError) as e:
        cli.sampling_settings(opts(), run_ckpt(**recorded))
    assert named in str(e.value)
