"""
Tests for cli.py, what every script shares: the config block and the command line
(--key=value, config files, --help), checkpoints, devices, one-line errors, and the
sampling settings generate.py and evaluate.py resolve from a checkpoint. Also that no
script imports another script. Run with: python -m pytest -q test_cli.py
"""

import ast
import importlib
import math
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import cli
import train
from cli import CheckpointError, ConfigError
from data import DataError

REPO = Path(__file__).resolve().parent
SCRIPTS = ('train', 'generate', 'bench', 'evaluate', 'tradeoff')
TRAIN_OPTIONS = cli.config_block(str(REPO / 'train.py'))
DEFAULTS = {k: v[0] for k, v in TRAIN_OPTIONS.items()}  # train.py's defaults


def parse(argv, choices={}):
    return cli.parse_config(argv, DEFAULTS, choices)


# -----------------------------------------------------------------------------
# the config block

SMALL_SCRIPT = '''"""A small script."""
import cli

x = 5  # before the block: not an option
# ----- config start
name = 'a#b'  # a '#' inside the string is not the comment
plain = 3
# --- numbers ---
rate = 1e-3  # a float # with a hash in the help
flag = True  # a bool
# --- words ---
words = "two words"  # a double-quoted string
# ----- config end
y = 6  # after the block: not an option
'''


def test_config_block_reads_defaults_help_and_groups(tmp_path):
    path = tmp_path / 'small.py'
    path.write_text(SMALL_SCRIPT)
    options = cli.config_block(str(path))
    assert options == {
        'name': ('a#b', "a '#' inside the string is not the comment", ''),
        'plain': (3, '', ''),  # a line without a comment
        'rate': (1e-3, 'a float # with a hash in the help', 'numbers'),
        'flag': (True, 'a bool', 'numbers'),
        'words': ('two words', 'a double-quoted string', 'words'),
    }
    assert list(options) == ['name', 'plain', 'rate', 'flag', 'words']  # source order
    assert type(options['plain'][0]) is int and type(options['flag'][0]) is bool


def test_config_block_non_ascii_value(tmp_path):
    """ast's column offsets count UTF-8 bytes, not characters: the help after a value with
    non-ASCII characters must still be read whole."""
    path = tmp_path / 'small.py'
    path.write_text("# config start\nname = 'ééééé'  # the help\n# config end\n", encoding='utf-8')
    assert cli.config_block(str(path)) == {'name': ('ééééé', 'the help', '')}


def test_format_help_lists_each_option_with_its_default_under_its_group(tmp_path):
    path = tmp_path / 'small.py'
    path.write_text(SMALL_SCRIPT)
    text = cli.format_help('A small script.\n\n    python small.py\n', cli.config_block(str(path)))
    lines = text.splitlines()
    assert lines[:3] == ['A small script.', '', '    python small.py']
    body = [line for line in lines[3:] if line]
    assert body[0] == 'options:'  # the options before the first group heading
    assert re.fullmatch(r"  --name='a#b'\s+a '#' inside the string is not the comment", body[1])
    assert body[2].rstrip() == '  --plain=3'  # no comment: nothing after the default
    assert body[3] == 'numbers:' and body[6] == 'words:'
    assert re.fullmatch(r'  --rate=0\.001\s+a float # with a hash in the help', body[4])
    assert re.fullmatch(r'  --flag=True\s+a bool', body[5])
    assert re.fullmatch(r"  --words='two words'\s+a double-quoted string", body[7])
    assert len(body) == 8


def test_parse_args_help_defaults_and_overrides(tmp_path, capsys, monkeypatch):
    path = tmp_path / 'small.py'
    path.write_text(SMALL_SCRIPT)
    assert cli.parse_args(['--help'], str(path), 'Doc.') is None
    assert "--name='a#b'" in capsys.readouterr().out
    assert cli.parse_args(['--plain=1', '-h'], str(path), 'Doc.') is None  # help wins
    assert capsys.readouterr().out.startswith('Doc.\n')
    opt = cli.parse_args(['--plain=4', '--words=one'], str(path), 'Doc.')
    assert opt == types.SimpleNamespace(name='a#b', plain=4, rate=1e-3, flag=True, words='one')
    monkeypatch.setattr(sys, 'argv', ['small.py', '--rate=2'])  # argv=None: the command line
    assert cli.parse_args(None, str(path), 'Doc.').rate == 2.0
    with pytest.raises(ConfigError, match=re.escape("name='maybe' from '--name=maybe' is not one of 'a#b', 'b'")):
        cli.parse_args(['--name=maybe'], str(path), 'Doc.', {'name': ('a#b', 'b')})
    with pytest.raises(ConfigError, match="flag='maybe' .* expected bool"):
        cli.parse_args(['--flag=maybe'], str(path), 'Doc.')


def test_train_py_config_block():
    assert list(TRAIN_OPTIONS)[:2] == ['out_dir', 'init_from']
    groups = list(dict.fromkeys(g for _, _, g in TRAIN_OPTIONS.values()))
    assert groups == ['I/O', 'data', 'model shape', 'training', 'sampling', 'system']
    assert all(help_ for _, help_, _ in TRAIN_OPTIONS.values())  # every option is explained
    assert DEFAULTS['compile'] is True and isinstance(DEFAULTS['learning_rate'], float)


def test_sampling_defaults_are_train_py_defaults():
    assert cli.SAMPLING_DEFAULTS == {k: DEFAULTS[k] for k in ('cfg_scale', 'sampler', 'sample_steps')}


# -----------------------------------------------------------------------------
# --key=value and config files

def test_parse_config_overrides():
    d = DEFAULTS
    before = dict(d)
    c = parse(['--batch_size=48', '--learning_rate=1', '--compile=true', '--dataset=cifar10',
               '--out_dir=out-x', '--ema_decay=0.99'])
    assert c['batch_size'] == 48 != d['batch_size']
    assert c['learning_rate'] == 1.0 and isinstance(c['learning_rate'], float)  # int is fine for a float
    assert c['compile'] is True and c['dataset'] == 'cifar10' and c['out_dir'] == 'out-x'
    assert c['ema_decay'] == 0.99
    assert c['depth'] == d['depth']  # untouched keys keep their default
    assert parse(['--compile=False'])['compile'] is False
    assert parse(['--out_dir=123'])['out_dir'] == '123'  # a string key keeps a string
    assert DEFAULTS == before  # the defaults are not modified


def test_quoted_string_value_for_a_string_key():
    """--dtype="float32" (the shell passes the quotes when they are escaped or nested) is
    the Python literal 'float32', as it is in a config file; train.py's old parser took it
    so, and a string key only keeps the raw text when it is not a string literal."""
    assert parse(['--dtype="float32"'])['dtype'] == 'float32'
    assert parse(["--out_dir='out-x'"])['out_dir'] == 'out-x'
    assert parse(['--dtype="float32"'], train.CHOICES)['dtype'] == 'float32'


@pytest.mark.parametrize('arg, fragment', [
    ('--batch_size=3.5', "batch_size=3.5 from '--batch_size=3.5' has type float, expected int"),
    ('--batch_size=big', "batch_size='big'"),
    ('--compile=1', 'expected bool (True/False/true/false)'),
    ('--depth=True', 'expected int'),
    ('--learning_rate=fast', 'expected float'),
])
def test_parse_config_type_mismatch(arg, fragment):
    with pytest.raises(ConfigError) as e:
        parse([arg])
    assert fragment in str(e.value)
    assert 'valid keys: ' in str(e.value) and 'batch_size' in str(e.value) and 'attn_backend' in str(e.value)


def test_parse_config_unknown_key():
    with pytest.raises(ConfigError) as e:
        parse(['--batch_sise=32'])
    msg = str(e.value)
    assert "unknown config key 'batch_sise'" in msg and 'did you mean batch_size' in msg
    assert 'valid keys: attn_backend, batch_size' in msg
    with pytest.raises(ConfigError) as e:
        parse(['--zzzzzz=1'])
    assert "unknown config key 'zzzzzz'" in str(e.value) and 'did you mean' not in str(e.value)


def test_parse_config_other_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="is not one of 'mnist', 'cifar10'"):
        parse(['--dataset=imagenet'], train.CHOICES)
    with pytest.raises(ConfigError, match='expected --key=value'):
        parse(['--batch_size', '32'])
    with pytest.raises(ConfigError, match='unexpected argument'):
        parse(['batch_size=32'])
    with pytest.raises(ConfigError, match='not found'):
        parse([str(tmp_path / 'missing.py')])


def test_parse_config_file(tmp_path):
    path = tmp_path / 'my_config.py'
    path.write_text("import math\n"
                    "batch_size = 2 * batch_size  # files see the config so far\n"
                    "depth = 6\n"
                    "learning_rate = 1  # an int for a float key\n"
                    "_private = 'ignored'\n")
    c = parse([str(path), '--depth=8'])
    assert c['batch_size'] == 2 * DEFAULTS['batch_size'] and c['learning_rate'] == 1.0
    assert c['depth'] == 8  # later arguments win
    assert parse(['--depth=8', str(path)])['depth'] == 6

    path.write_text('detph = 6\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'detph' from config file .*did you mean depth"):
        parse([str(path)])
    path.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match='compile'):
        parse([str(path)])
    path.write_text('depth = = 3\n')
    with pytest.raises(ConfigError, match='line 1'):
        parse([str(path)])


@pytest.mark.parametrize('name', sorted(p.name for p in (REPO / 'config').glob('*.py')))
def test_shipped_config_files_parse(name):
    c = parse([str(REPO / 'config' / name)], train.CHOICES)
    assert c['dataset'] in ('mnist', 'cifar10', 'moving_mnist')
    assert c['width'] % c['n_heads'] == 0
    size = {'mnist': 28, 'cifar10': 32, 'moving_mnist': 32}[c['dataset']]
    assert size % c['patch_size'] == 0
    tokens_per_side = size // c['patch_size']
    assert tokens_per_side % c['block_h'] == 0 and tokens_per_side % c['block_w'] == 0
    if c['dataset'] == 'moving_mnist':  # a video block is a whole frame
        assert c['block_h'] == c['block_w'] == tokens_per_side
    train.check_config(types.SimpleNamespace(**c))  # the model it describes can be built


def test_check_and_run_cli_exit_statuses(capsys):
    cli.check(True, 'never shown')
    with pytest.raises(ConfigError, match='^out of range$'):
        cli.check(False, 'out of range')
    for error, status in ((ConfigError('bad option'), 2), (CheckpointError('bad file'), 1),
                          (DataError('bad data'), 1), (FileNotFoundError('no such file'), 1)):
        def main():
            raise error
        with pytest.raises(SystemExit) as e:
            cli.run_cli(main)
        assert e.value.code == status
        captured = capsys.readouterr()
        assert captured.out == '' and captured.err == f'error: {error}\n'
    cli.run_cli(lambda: None)  # a run without a mistake just returns
    with pytest.raises(ZeroDivisionError):  # a bug in the code is not dressed up as a user's mistake
        cli.run_cli(lambda: 1 / 0)


# -----------------------------------------------------------------------------
# the scripts from the command line

def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_bad_key_is_a_one_line_error():
    r = run_script('train.py', '--bogus=1')
    assert r.returncode == 2
    assert r.stdout == ''
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'bogus'")
    assert 'Traceback' not in r.stderr


def test_cli_help():
    r = run_script('train.py', '--help')
    assert r.returncode == 0
    assert f"--batch_size={DEFAULTS['batch_size']}" in r.stdout and '--dataset=' in r.stdout and 'model shape:' in r.stdout
    assert all(f'--{k}=' in r.stdout for k in DEFAULTS)


@pytest.mark.parametrize('name', ['train', 'generate', 'evaluate', 'bench'])
def test_every_script_lists_its_options_with_defaults(name, capsys):
    """train.py, generate.py, evaluate.py and bench.py --help (in-process: test_cli_help runs
    train.py's as a command): the docstring, then every option of the script's config block
    with its default and its meaning, under its group's heading."""
    module = importlib.import_module(name)
    assert module.main(['--help']) is None
    captured = capsys.readouterr()
    assert captured.err == ''
    options = cli.config_block(str(REPO / f'{name}.py'))
    assert len(options) >= 5
    assert captured.out.startswith(module.__doc__.strip().splitlines()[0])
    lines = captured.out.splitlines()
    for key, (default, help_, group) in options.items():
        line = next((ln for ln in lines if ln.startswith(f'  --{key}=')), None)
        assert line is not None, key
        assert line.startswith(f'  --{key}={default!r} ') and line.rstrip().endswith(help_), line
        heading = f'{group}:' if group else 'options:'
        assert heading in lines[:lines.index(line)], (key, heading)


def test_tradeoff_help_and_shared_sampling_options(capsys):
    import tradeoff
    tradeoff.main(['--help'])  # no config block: every other flag goes to train.py
    out = capsys.readouterr().out
    assert '--root=DIR' in out and 'train.py' in out
    # the options generate.py and evaluate.py share mean the same in both
    gen, ev = (cli.config_block(str(REPO / f'{n}.py')) for n in ('generate', 'evaluate'))
    for key in ('ckpt', 'cfg_scale', 'sampler', 'steps', 'seed', 'weights', 'device'):
        assert gen[key][0] == ev[key][0], key


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
    probe = REPO / 'test_cli.py'
    assert {'ast', 'cli', 'train', 'data'} <= imports_of(probe)


def test_import_has_no_side_effects(tmp_path):
    modules = ', '.join(['train', 'generate', 'bench', 'evaluate', 'tradeoff', 'cli', 'judge', 'data'])
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(REPO)!r}); import {modules}'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r.stderr
    assert list(tmp_path.iterdir()) == []  # no out/ or data/ or judge.pt created


# -----------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip(tmp_path):
    obj = {'model': {'w': torch.randn(3, 4), 'b': torch.arange(3)}, 'iter_num': 7,
           'config': dict(DEFAULTS), 'best_loss': 0.25, 'rng': torch.Generator().manual_seed(3).get_state()}
    path = tmp_path / 'run' / 'ckpt.pt'  # the directory does not exist yet
    cli.save_checkpoint(str(path), obj)
    cli.save_checkpoint(str(path), obj)  # overwriting is fine too
    assert os.listdir(path.parent) == ['ckpt.pt']  # no temp files left behind
    back = cli.load_checkpoint(str(path))
    assert torch.equal(back['model']['w'], obj['model']['w']) and torch.equal(back['model']['b'], obj['model']['b'])
    assert back['iter_num'] == 7 and back['config'] == DEFAULTS and back['best_loss'] == 0.25
    assert torch.equal(back['rng'], obj['rng'])


def test_save_checkpoint_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.save_checkpoint('ckpt.pt', {'iter_num': 3})  # no directory part
    assert os.listdir(tmp_path) == ['ckpt.pt'] and cli.load_checkpoint('ckpt.pt') == {'iter_num': 3}


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    cli.save_checkpoint(str(path), {'iter_num': 1})
    with pytest.raises(Exception):
        cli.save_checkpoint(str(path), {'iter_num': 2, 'oops': lambda: None})  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ['ckpt.pt']
    assert cli.load_checkpoint(str(path))['iter_num'] == 1


def test_truncated_or_missing_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    cli.save_checkpoint(str(path), {'w': torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f'could not read checkpoint {re.escape(str(path))}.*truncated or corrupt'):
        cli.load_checkpoint(str(path))
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='could not read checkpoint'):
        cli.load_checkpoint(str(path))
    path.write_bytes(b'')
    with pytest.raises(CheckpointError, match='could not read checkpoint'):
        cli.load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=f'no checkpoint at {re.escape(str(tmp_path / "other.pt"))}'):
        cli.load_checkpoint(str(tmp_path / 'other.pt'))
    # a complete zip archive that is not torch.save's: read, refused, named
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('notes.txt', 'hello')
    with pytest.raises(CheckpointError, match=f'could not read checkpoint {re.escape(str(path))} .*truncated or corrupt'):
        cli.load_checkpoint(str(path))


class NotATensor:  # a custom class: torch's safe loader (weights_only=True) refuses it
    pass


def test_checkpoint_with_unsafe_object(tmp_path):
    path = tmp_path / 'ckpt.pt'
    cli.save_checkpoint(str(path), {'thing': NotATensor()})
    with pytest.raises(CheckpointError, match='holds an object that torch.load.weights_only=True. refuses'):
        cli.load_checkpoint(str(path))


# -----------------------------------------------------------------------------
# device, dtype, compiler

def test_pick_device():
    assert cli.pick_device('cpu') == torch.device('cpu')
    assert cli.pick_device('auto').type in ('cpu', 'cuda', 'mps')
    with pytest.raises(ConfigError, match='unknown device'):
        cli.pick_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda' is not available"):
            cli.pick_device('cuda')
        assert cli.pick_device('auto') != torch.device('cuda')


def test_autocast_context_is_float32_on_cpu():
    with cli.autocast_context(torch.device('cpu'), 'bfloat16'):
        y = torch.randn(2, 3) @ torch.randn(3, 2)
    assert y.dtype == torch.float32


def test_compile_problem_is_one_line(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError('InvalidCxxCompiler: No working C++ compiler found\nmore detail\n')
    monkeypatch.setattr(torch, 'compile', broken_compile)
    assert cli.compile_problem(torch.device('cpu')) == \
        'RuntimeError: InvalidCxxCompiler: No working C++ compiler found'
    cli.sync(torch.device('cpu'))  # nothing to wait for on a CPU


# -----------------------------------------------------------------------------
# sampling settings: 'auto' means what the checkpoint's run sampled with

def opts(cfg_scale='auto', steps='auto', sampler='auto'):
    return types.SimpleNamespace(cfg_scale=cfg_scale, steps=steps, sampler=sampler)


def test_sampling_settings_auto_reads_the_checkpoint():
    ckpt = {'config': dict(DEFAULTS, cfg_scale=1.5, sample_steps=4, sampler='ddim')}
    settings = cli.sampling_settings(opts(), ckpt)
    assert settings == (1.5, 4, 'ddim')
    assert [type(v) for v in settings] == [float, int, str]
    assert cli.sampling_settings(opts(sampler='dpm++'), ckpt) == (1.5, 4, 'dpm++')  # one told, the rest auto
    assert cli.sampling_settings(opts('3', '10', 'ddpm'), ckpt) == (3.0, 10, 'ddpm')
    assert type(cli.sampling_settings(opts(cfg_scale='3'), ckpt)[0]) is float
    # before the checkpoint is loaded only the values given are checked and returned
    assert cli.sampling_settings(opts()) == (None, None, None)
    assert cli.sampling_settings(opts(steps='7')) == (None, 7, None)


@pytest.mark.parametrize('ckpt', [{}, {'config': None}, {'config': {}}, {'config': {'cfg_scale': 1.25}}],
                         ids=['no config', 'config None', 'empty config', 'only cfg_scale'])
def test_sampling_settings_fall_back_to_the_defaults(ckpt):
    d = cli.SAMPLING_DEFAULTS
    expected = ((ckpt.get('config') or {}).get('cfg_scale', d['cfg_scale']), d['sample_steps'], d['sampler'])
    assert cli.sampling_settings(opts(), ckpt) == expected


@pytest.mark.parametrize('option, message', [
    (dict(cfg_scale='strong'), 'cfg_scale=strong must be a number'),
    (dict(cfg_scale='nan'), 'cfg_scale=nan must be a number'),
    (dict(cfg_scale='inf'), 'cfg_scale=inf must be a number'),
    (dict(steps='0'), 'steps=0 must be an integer >= 1'),
    (dict(steps='-3'), 'steps=-3 must be an integer >= 1'),
    (dict(steps='2.5'), 'steps=2.5 must be an integer >= 1'),
    (dict(steps='many'), 'steps=many must be an integer >= 1'),
    (dict(sampler='euler'), "sampler='euler': choose one of ddim, ddpm, dpm++ or 'auto'"),
])
def test_sampling_settings_reject_bad_values(option, message):
    for ckpt in (None, {'config': DEFAULTS}):  # before and after the checkpoint loads
        with pytest.raises(ConfigError, match=re.escape(message)):
            cli.sampling_settings(opts(**option), ckpt)


def test_per_block_cfg_scale_is_one_number_per_block():
    ckpt = {'config': DEFAULTS}
    assert cli.sampling_settings(opts(cfg_scale='1,3,2.5'), ckpt) == ((1.0, 3.0, 2.5), 50, 'ddpm')
    assert cli.sampling_settings(opts(cfg_scale='1,3,2.5'), ckpt, n_blocks=3)[0] == (1.0, 3.0, 2.5)
    assert cli.sampling_settings(opts(cfg_scale='2'), ckpt, n_blocks=3)[0] == 2.0   # one number: every block
    with pytest.raises(ConfigError, match=re.escape("cfg_scale=1,3: 2 scales, but per-block guidance needs "
                                                    "one for each of the model's 7 blocks")):
        cli.sampling_settings(opts(cfg_scale='1,3'), ckpt, n_blocks=7)
    for bad in ('1,nan', '1,,2', '2,strong'):
        with pytest.raises(ConfigError, match=re.escape(f"cfg_scale={bad} must be a number, one number per block")):
            cli.sampling_settings(opts(cfg_scale=bad), ckpt)


def test_sampling_settings_reject_a_bad_recorded_value():
    with pytest.raises(ConfigError, match=re.escape("sampler='euler'")):
        cli.sampling_settings(opts(), {'config': {'sampler': 'euler'}})
    with pytest.raises(ConfigError, match="must be an integer >= 1 or 'auto' .the checkpoint's sample_steps"):
        cli.sampling_settings(opts(), {'config': {'sample_steps': 0}})
    assert math.isfinite(cli.sampling_settings(opts(), {'config': {'cfg_scale': 1}})[0])


def test_parse_cfg_interval():
    assert cli.parse_cfg_interval('') is None
    assert cli.parse_cfg_interval('200,800') == (200, 800)
    for bad, words in (('800,200', 'need 0 <= lo <= hi'), ('200', "expected two timesteps"),
                       ('a,b', "expected two timesteps"), ('-1,5', 'need 0 <= lo <= hi')):
        with pytest.raises(cli.ConfigError, match=words):
            cli.parse_cfg_interval(bad)


def test_config_file_that_fails_when_run_is_a_one_line_error(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('depth = 2\nwidth = undefined_name\n')
    with pytest.raises(cli.ConfigError, match=r"config file '.*bad.py' line 2: NameError"):
        cli.parse_config([str(bad)], {'depth': 4, 'width': 128})
    helper = tmp_path / 'helper.py'  # a helper function in a config file is not a config key
    helper.write_text('def twice(x):\n    return 2 * x\ndepth = twice(3)\n')
    assert cli.parse_config([str(helper)], {'depth': 4, 'width': 128}) == {'depth': 6, 'width': 128}
