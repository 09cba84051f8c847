"""
What the scripts share: the command line (defaults, config files, --key=value, --help), the device, checkpoints.
User input is checked once, here or in the script owning the option: one line on stderr, exit status 2, nothing written.
"""

import os
import sys
import tempfile
import types
from contextlib import nullcontext

import torch

import acdit
from data import DataError


class ConfigError(ValueError):
    """A bad option, config file or input file: one line on stderr, exit status 2."""


def check(condition, message):
    if not condition:
        raise ConfigError(message)


def run_cli(main):
    """Run main(); a user's mistake becomes one line on stderr, not a traceback."""
    try:
        main()
    except (ConfigError, DataError, OSError) as e:  # OSError: a folder that cannot be made, a full disk
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)

# -----------------------------------------------------------------------------
# the command line: nanoGPT's configurator, typed


def parse_value(text, default):
    """--key=text as the type of default ('true'/'false' for a bool); None if it is not one."""
    if isinstance(default, bool):
        return {'true': True, 'false': False}.get(text.lower())
    try:
        return type(default)(text)
    except ValueError:
        return None


def parse_args(argv, doc, options, choices={}, exclusive=()):
    """The run's options as a namespace: the defaults of `options` {key: (default, help)}, then
    config files (plain Python assigning keys) and --key=value arguments in the order given. Of
    each `exclusive` pair of keys the one set later wins (setting one resets the other)."""
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:  # print the script's docstring and options, and exit
        print(doc.strip() + '\n\noptions (config files and --key=value override them):')
        print('\n'.join(f'  --{k}={d!r}'.ljust(32) + f'  {h}' for k, (d, h) in options.items()))
        sys.exit(0)
    defaults = {k: d for k, (d, _) in options.items()}
    args = dict(defaults)

    def put(key, value, source):
        check(key in args, f"unknown option '{key}' from {source}; the options are: {', '.join(args)}")
        default = defaults[key]
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        check(type(value) is type(default), f'{source}: {key} must be of type {type(default).__name__}, like its default {default!r}')
        if key in choices:
            check(value in choices[key], f"{key}={value!r} from {source}: choose one of {', '.join(map(repr, choices[key]))}")
        args[key] = value
        for pair in exclusive:  # (a 0, such as time_budget=0, turns a setting off and resets nothing)
            if key in pair and value:
                other = pair[1 - pair.index(key)]
                args[other] = defaults[other]

    for arg in argv:
        if arg.startswith('--') and '=' in arg:
            key, text = arg[2:].split('=', 1)
            put(key, parse_value(text, defaults.get(key, '')), f"'{arg}'")
        elif arg.endswith('.py'):
            check(os.path.isfile(arg), f"config file '{arg}' not found")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), namespace)
            except Exception as e:  # a syntax error, or the file ran and failed
                raise ConfigError(f"config file '{arg}': {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if not key.startswith('_') and not callable(value) and not isinstance(value, types.ModuleType):
                    put(key, value, f"config file '{arg}'")
        else:
            raise ConfigError(f"unexpected argument '{arg}': use --key=value or a config file ending in .py")
    return types.SimpleNamespace(**args)

# -----------------------------------------------------------------------------
# device


DEVICE_OPTION = ('auto', "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'")  # every script's --device
DEVICES = ('auto', 'cpu', 'cuda', 'mps')


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; otherwise the device asked for, if it is there."""
    has = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True}
    if name == 'auto':
        return torch.device(next(d for d in has if has[d]))
    check(has.get(name), f"device={name!r} is not available here; use --device=auto or --device=cpu")
    return torch.device(name)


def autocast_context(device, dtype):
    """bfloat16 autocast on CUDA when asked for; plain float32 elsewhere (slow or patchy there)."""
    if device.type == 'cuda' and dtype == 'bfloat16' and torch.cuda.is_bf16_supported():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def sync(device):
    """Wait for queued GPU work, so that a clock measures the work and not its launch."""
    if device.type in ('cuda', 'mps'):  # (cuda: the current device, which train.py sets under torchrun)
        getattr(torch, device.type).synchronize()

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, obj):
    """torch.save obj to path atomically (a temp file beside it, flushed, renamed over it): a crash
    or a full disk mid-save keeps the old file."""
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
        os.remove(tmp)
        raise


def load_checkpoint(path, device='cpu'):
    """torch.load with weights_only=True (tensors, dicts, lists, numbers and strings only);
    a missing, truncated or foreign file is a ConfigError naming it."""
    check(os.path.isfile(path), f'no checkpoint at {path} (train.py writes one to out_dir/ckpt.pt)')
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise ConfigError(f'could not read checkpoint {path} ({type(e).__name__}: {first}): '
                          f'is it a complete torch.save file?') from None


def load_model(path, weights='ema', device='cpu'):
    """(the ACDiT of a train.py checkpoint with its 'ema' or 'model' weights, the checkpoint)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and 'config' in ckpt and 'args' not in ckpt:  # train.py before 3eb02f4
        ckpt['args'] = ckpt.pop('config')
    check(isinstance(ckpt, dict) and {'model_config', 'args', weights} <= set(ckpt) and isinstance(ckpt['args'], dict)
          and {'dataset', 'cfg_scale', 'sampler', 'sample_steps'} <= set(ckpt['args']),
          f"{path} is not a train.py checkpoint with {weights!r} weights")
    try:
        # sdpa whatever it trained with: sampling attends with no mask (cached) or the dense one
        model = acdit.ACDiT(acdit.ACDiTConfig(**dict(ckpt['model_config'], attn_backend='sdpa')))
        model.load_state_dict(ckpt[weights])
    except (AssertionError, TypeError, RuntimeError) as e:
        raise ConfigError(f'checkpoint {path} does not fit this ACDiT: {str(e).splitlines()[-1].strip()}') from None
    return model.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# sampling from a checkpoint: the options generate.py and evaluate.py share

SAMPLING_OPTIONS = {
    'ckpt': ('out/ckpt.pt', 'checkpoint written by train.py'),
    'weights': ('ema', "'ema' (the averaged weights train.py samples with) or 'model' (the raw ones)"),
    'cfg_scale': ('auto', "classifier-free guidance (1 = none); 'auto' = what the run drew its grids with"),
    'sampler': ('auto', "'ddpm' (ancestral), 'ddim' (deterministic), 'dpm++' (DPM-Solver++(2M)); 'auto' as above"),
    'steps': ('auto', "denoising steps per block; 'auto' as above"),
    'seed': (0, 'seeds the noise: the same seed gives the same samples, cached or not'),
    'n_frames': (0, 'video models: frames per video (0 = the trained length; more slides the cache window)'),
    'device': DEVICE_OPTION,
}
SAMPLING_CHOICES = {'weights': ('ema', 'model'), 'device': DEVICES}


def sampling_settings(args, ckpt):
    """(cfg_scale, steps, sampler) from SAMPLING_OPTIONS, 'auto' meaning what the checkpoint's run
    drew its grids with; seed and n_frames checked too."""
    run = ckpt['args']
    sampler = run['sampler'] if args.sampler == 'auto' else args.sampler
    try:
        cfg_scale = float(run['cfg_scale'] if args.cfg_scale == 'auto' else args.cfg_scale)
        steps = int(run['sample_steps'] if args.steps == 'auto' else args.steps)
    except ValueError:
        raise ConfigError(f"cfg_scale={args.cfg_scale!r}, steps={args.steps!r}: expected a number and an integer, "
                          f"or 'auto'") from None
    T = ckpt['model_config']['n_timesteps']
    check(abs(cfg_scale) < float('inf'), f'cfg_scale={cfg_scale} must be finite')
    check(1 <= steps <= T, f'steps={steps} must be in 1..{T} (the diffusion timesteps)')
    check(sampler in acdit.SAMPLERS, f"sampler={sampler!r}: choose one of {', '.join(acdit.SAMPLERS)}")
    check(0 <= args.seed < 2**62, f'seed={args.seed} must be in [0, 2**62)')
    check(args.n_frames == 0 or ckpt['model_config'].get('n_frames', 1) > 1, f'n_frames={args.n_frames}: only for video models')
    return cfg_scale, steps, sampler
