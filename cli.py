"""
What every script here shares: its command line (defaults and --help from a nanoGPT-style
config block of `key = value  # help` lines, then config files and --key=value overrides,
type-checked), the device, dtype and compiler a run can use (or a clear error), and
checkpoints: saved atomically, read with torch's safe loader, made into a model to sample.
"""

import ast
import difflib
import math
import os
import re
import sys
import tempfile
import traceback
import types
import zipfile
from contextlib import nullcontext

import torch

import acdit
from data import DataError

# What train.py draws its sample grids with, and so what generate.py and evaluate.py use for
# a checkpoint that does not record its own settings (train.py's config block says the same).
SAMPLING_DEFAULTS = {'cfg_scale': 2.0, 'sampler': 'ddpm', 'sample_steps': 50}


class ConfigError(ValueError):
    """A bad command line or config file: shown as one line, exit status 2."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit: shown as one line, exit status 1."""

# -----------------------------------------------------------------------------
# the config block and the command line


def config_block(path):
    """{key: (default, help, group)} from the `key = literal  # help` lines of the script at path between
    the comments ending in 'config start' and 'config end'; a '# --- name ---' line starts a group."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('#') and line.endswith('config start'))
    end = next(i for i, line in enumerate(lines) if line.startswith('#') and line.endswith('config end'))
    block, options, group = lines[start + 1:end], {}, ''
    nodes = {node.lineno - 1: node for node in ast.parse('\n'.join(block)).body}
    for i, line in enumerate(block):
        if heading := re.match(r'^# --- (.*) ---$', line):
            group = heading.group(1)
        elif node := nodes.get(i):
            comment = line.encode()[node.end_col_offset:].decode().strip().lstrip('#').strip()  # offsets count bytes
            options[node.targets[0].id] = (ast.literal_eval(node.value), comment, group)
    return options


def format_help(doc, options):
    """--help: the script's docstring, then each option with its default and meaning."""
    lines, group = [doc.strip(), ''], None
    for key, (default, comment, g) in options.items():
        if g != group:
            group = g
            lines.append(f'{g}:' if g else 'options:')
        lines.append((f'  --{key}={default!r}'.ljust(34) + f'  {comment}').rstrip())
    return '\n'.join(lines)


def _set(config, key, value, source, choices):
    """Store value in config[key] if it has the type of the default (an int will do for a float)."""
    valid = 'valid keys: ' + ', '.join(sorted(config))
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ''
        raise ConfigError(f"unknown config key '{key}' from {source}{hint}; {valid}")
    default = config[key]
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    # a bool only for a bool: True is also an int in Python, and --compile=1 or --depth=True are mistakes
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, type(default)):
        want = type(default).__name__ + (' (True/False/true/false)' if isinstance(default, bool) else '')
        raise ConfigError(f"{key}={value!r} from {source} has type {type(value).__name__}, expected {want} "
                          f"like the default {key}={default!r}; {valid}")
    if key in choices and value not in choices[key]:
        raise ConfigError(f"{key}={value!r} from {source} is not one of {', '.join(map(repr, choices[key]))}")
    config[key] = value


def parse_config(argv, defaults, choices={}):
    """Apply config files (arguments ending in .py) and --key=value arguments, in the order
    given, to a copy of defaults. Anything wrong raises ConfigError."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"expected --key=value, got '{arg}'; valid keys: {', '.join(sorted(config))}")
            try:  # a Python literal (3, 1e-3, True, 'x') where it parses as one ...
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # ... but a string key takes other text as it is: --out_dir=1 is a folder
            _set(config, key, value, f"'{arg}'", choices)
        elif arg.endswith('.py'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            namespace = dict(config)  # plain Python, with the config so far as globals to compute from
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), namespace)
            except SyntaxError as e:
                raise ConfigError(f"config file '{arg}' line {e.lineno}: {e.msg}") from None
            except Exception as e:  # the file ran and failed: say where, as for a syntax error
                line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__))
                             if fr.filename == arg), '?')
                raise ConfigError(f"config file '{arg}' line {line}: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue  # Python's own __builtins__, modules, helper functions and classes
                if key not in config or value is not config[key]:
                    _set(config, key, value, f"config file '{arg}'", choices)
        else:
            raise ConfigError(f"unexpected argument '{arg}': use --key=value or a config file ending in .py")
    return config


def parse_args(argv, path, doc, choices={}):
    """The script at path's options from argv (default sys.argv[1:]), or None once --help is printed."""
    argv = sys.argv[1:] if argv is None else argv
    options = config_block(path)
    if '-h' in argv or '--help' in argv:
        print(format_help(doc, options))
        return None
    return types.SimpleNamespace(**parse_config(argv, {k: v[0] for k, v in options.items()}, choices))


def check(condition, message):
    """Raise ConfigError(message) unless condition: for option values out of range."""
    if not condition:
        raise ConfigError(message)


def run_cli(main):
    """Run main(); a user's mistake becomes one line on stderr, not a traceback: exit
    status 2 for a bad option (as argparse does), 1 for a file that cannot be used."""
    try:
        main()
    except (ConfigError, CheckpointError, DataError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)

# -----------------------------------------------------------------------------
# device, dtype, compiler


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; otherwise exactly the device asked for, with a
    clear error (not a crash inside the first .to()) if it is missing."""
    has = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available()}
    if name == 'auto':
        return torch.device(next(d for d in ('cuda', 'mps', 'cpu') if has[d]))
    check(name in has, f"unknown device {name!r}, expected one of 'auto', 'cpu', 'cuda', 'mps'")
    check(has[name], f"device={name!r} is not available with this PyTorch ({torch.__version__}) on this "
                     f"machine; use --device=auto or --device=cpu")
    return torch.device(name)


def autocast_context(device, dtype):
    """bfloat16 autocast on CUDA when asked for (and supported); plain float32 elsewhere,
    where bf16 autocast is slow (CPU) or patchy (MPS)."""
    if device.type == 'cuda' and dtype == 'bfloat16' and torch.cuda.is_bf16_supported():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def compile_problem(device):
    """None if torch.compile works on device, else why not, in one line. Compiling a two-op
    function finds a missing C++ compiler (CPU) or Triton (CUDA) in seconds, before training."""
    try:
        torch.compile(lambda x: (x * 2.0).sin(), dynamic=False)(torch.ones(4, device=device))
        return None
    except Exception as e:  # whatever the toolchain raises; its message says what is missing
        torch._dynamo.reset()
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f'{type(e).__name__}: {first_line[:300]}'


def sync(device):
    """Wait for queued GPU work, so that a clock measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, obj):
    """torch.save obj to path atomically: a temp file in the same directory, flushed to
    disk, then renamed over path. A crash or a full disk mid-save keeps the old file."""
    directory = os.path.dirname(path) or '.'
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic, as both names are on one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True (tensors, dicts, lists, numbers, strings only);
    every way that fails becomes a CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the very end
        raise CheckpointError(f"could not read checkpoint {path}: not a complete torch.save archive, so "
                              f"it is probably truncated or corrupt (or not a checkpoint at all). Delete "
                              f"or replace it (to train anew: --init_from=scratch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [''])[0]
        advice = ('It holds an object that torch.load(weights_only=True) refuses: save only tensors, dicts, '
                  'lists, numbers and strings in checkpoints' if 'Weights only load failed' in str(e) else
                  'It is probably truncated or corrupt: delete it, or start with --init_from=scratch')
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {first_line}). {advice}") from e


def load_model(path, weights='ema', device='cpu'):
    """The ACDiT of a train.py checkpoint with its `weights` ('ema' or 'model'), in eval mode
    on device, and the checkpoint. Anything unusable raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}: train one with `python train.py` '
                              f'(it writes <out_dir>/ckpt.pt) or point --ckpt at one')
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model_config'), dict):
        raise CheckpointError(f"{path} is not a train.py checkpoint: expected a dict with a "
                              f"'model_config' entry, found {type(ckpt).__name__}"
                              + (f" with keys {', '.join(map(str, ckpt))}" if isinstance(ckpt, dict) else ''))
    if weights not in ckpt:
        raise CheckpointError(f"{path} has no {weights!r} weights; try --weights="
                              f"{'model' if weights == 'ema' else 'ema'}")
    try:
        # sdpa whatever it trained with: sampling attends with no mask (cached) or the dense one
        model = acdit.ACDiT(acdit.ACDiTConfig(**dict(ckpt['model_config'], attn_backend='sdpa')))
        model.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError) as e:
        # load_state_dict says 'Error(s) in loading state_dict for ACDiT:', then a line per problem
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ['']
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(':') else lines[0]
        more = f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''
        raise CheckpointError(f'checkpoint {path} does not fit an ACDiT model: {detail}{more}') from None
    return model.to(device).eval(), ckpt


def sampling_settings(opt, ckpt=None, n_blocks=None):
    """(cfg_scale, steps, sampler) from a script's options, where 'auto' means what the checkpoint's
    run sampled with (else SAMPLING_DEFAULTS). Called once before the checkpoint loads (ckpt=None:
    'auto' gives None, and only the values given are checked) and once after, with n_blocks, the
    blocks the model will make (per-block guidance needs a scale for each)."""
    recorded = {**SAMPLING_DEFAULTS, **((ckpt or {}).get('config') or {})}
    settings = []
    for key, ckpt_key, kind in (('cfg_scale', 'cfg_scale', guidance_scale), ('steps', 'sample_steps', int),
                                ('sampler', 'sampler', str)):
        text = getattr(opt, key)
        if text == 'auto' and ckpt is None:
            settings.append(None)
            continue
        text = recorded[ckpt_key] if text == 'auto' else text
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), from a checkpoint
            value = math.nan
        if kind is str:
            check(value in acdit.SAMPLERS, f"{key}={text!r}: choose one of {', '.join(acdit.SAMPLERS)} or 'auto'")
        elif kind is int:
            check(math.isfinite(value) and value >= 1,
                  f"{key}={text} must be an integer >= 1 or 'auto' (the checkpoint's {ckpt_key})")
        else:
            check(all(map(math.isfinite, value if isinstance(value, tuple) else [value])),
                  f"{key}={text} must be a number, one number per block ('w0,w1,...'), or 'auto' "
                  f"(the checkpoint's {ckpt_key})")
        settings.append(value)
    scale = settings[0]
    if n_blocks is not None and isinstance(scale, tuple):
        check(len(scale) == n_blocks, f"cfg_scale={opt.cfg_scale}: {len(scale)} scales, but per-block "
                                      f"guidance needs one for each of the model's {n_blocks} blocks")
    return tuple(settings)


def guidance_scale(text):
    """--cfg_scale: '2' -> 2.0; 'w0,w1,...' -> a tuple, one scale per block (acdit.sample's
    per-block guidance)."""
    values = tuple(float(v) for v in str(text).split(','))
    return values[0] if len(values) == 1 else values


def parse_cfg_interval(text):
    """--cfg_interval: '' -> None (guide every step), 'lo,hi' -> (lo, hi), the timesteps whose
    steps get guidance (acdit.sample's cfg_interval)."""
    if text == '':
        return None
    try:
        lo, hi = (int(v) for v in str(text).split(','))
    except ValueError:
        raise ConfigError(f"cfg_interval={text!r}: expected two timesteps 'lo,hi', e.g. 200,800, or ''") from None
    check(0 <= lo <= hi, f'cfg_interval={text!r}: need 0 <= lo <= hi')
    return lo, hi


def check_sampling_options(opt):
    """The option checks generate.py and evaluate.py share, all before the checkpoint loads so
    that a typo fails at once. Returns the parsed cfg_interval."""
    check(opt.weights in ('ema', 'model'), f"weights={opt.weights!r}: choose 'ema' or 'model'")
    check(opt.n_per_class >= 1, f'n_per_class={opt.n_per_class} must be at least 1')
    check(0 <= opt.seed < 2**63, f'seed={opt.seed} must be in [0, 2**63)')
    sampling_settings(opt)
    return parse_cfg_interval(opt.cfg_interval)
