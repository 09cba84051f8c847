"""
Train an ACDiT model on MNIST, CIFAR-10 or your own images, or on Moving MNIST videos.

    python train.py                                  # MNIST with the defaults below
    python train.py --data_dir=path/to/mnist         # offline: the four MNIST files are there
    python train.py config/cifar10.py --batch_size=64   # a config file overrides the defaults, --key=value both
    python train.py config/moving_mnist.py           # videos: one block per frame
    python train.py --dataset=folder --data_dir=pics # pics/train/<class>/*.jpg (and pics/test/...)
    torchrun --nproc_per_node=4 train.py config/cifar10.py   # one process per GPU
"""

import dataclasses
import datetime
import functools
import math
import os
import signal
import sys
import threading
import time

import torch

import acdit
import cli
import data
from cli import ConfigError

OPTIONS = {  # key: (default, what it does); config files and --key=value override the defaults
    # I/O
    'out_dir': ('out', 'the checkpoint, sample grids, log.csv (the progress) and loss.png (its plot) go here'),
    'init_from': ('scratch', "'scratch' (a new model) or 'resume' (from out_dir/ckpt.pt)"),
    'eval_interval': (1000, 'evaluate the test loss and save a checkpoint every this many steps'),
    'eval_iters': (20, 'test batches of 32 averaged per evaluation'),
    'log_interval': (200, 'print the training loss, and add it to log.csv, every this many steps (and at evals)'),
    'sample_interval': (6000, 'save a grid of samples every this many steps (after a short run: a smaller one)'),
    # data
    'dataset': ('mnist', "'mnist', 'cifar10', 'moving_mnist' (videos) or 'folder' (data_dir/train/<class>/*)"),
    'data_dir': ('data', 'where the dataset files are (MNIST and CIFAR-10 are downloaded there when missing)'),
    'img_size': (0, 'folder: crop and resize every image to this square size (0: their common size)'),
    'channels': (0, 'folder: 1 (gray) or 3 (RGB); 0: 1 if every image is gray, else 3'),
    'hflip': ('auto', "mirror a random half of each batch: 'auto' = photos (cifar10, folder), not digits; 'True', 'False'"),
    # model shape (0: follow the data)
    'patch_size': (0, 'tokens are patch_size^2-pixel patches; 0: the smallest giving at most 64 tokens an '
                      'image, 16 a video frame (4 for MNIST and CIFAR-10, 8 for Moving MNIST)'),
    'block_h': (0, 'a block (the unit of autoregression) is block_h x block_w patches; 0: 1 (a video: the frame)'),
    'block_w': (0, '0: the patch grid width, so a block is a row of patches (a video: the frame)'),
    'depth': (3, 'transformer layers (3 beat 4 in 20 CPU minutes: shallower, so more steps)'),
    'width': (128, 'model dimension'),
    'n_heads': (4, 'attention heads (width must be divisible by n_heads)'),
    'rope_base': (100.0, 'RoPE frequency base (100 beat 10000 on the 7x7 MNIST grid)'),
    'min_snr_gamma': (1.0, 'Min-SNR-gamma loss weights (1 beat 2 and 5); 0 = plain eps-MSE as in the paper'),
    'prediction': ('eps', "the network predicts 'eps' (the noise, as the paper) or 'x0' (the clean tokens)"),
    'noise_schedule': ('linear', "'linear' (DDPM's betas, as the paper) or 'cosine' (alpha-bar as cos^2 of t)"),
    'label_dropout': (0.1, 'drop the class label this often in training, for classifier-free guidance'),
    # training
    'max_iters': (24000, 'optimizer steps (18-20 minutes on a 2-core AVX-512 CPU with these defaults)'),
    'time_budget': (0.0, 'minutes; > 0: time warm steps, then set max_iters to end in about this long '
                         '(of max_iters and time_budget, the one set last wins)'),
    'batch_size': (8, 'images per optimizer step and process (8 did best in 20 CPU minutes)'),
    'learning_rate': (3e-3, 'peak AdamW learning rate; QK-norm and grad clipping keep it stable'),
    'warmup_iters': (800, 'linear warmup from ~0 to learning_rate over this many steps'),
    'decay_frac': (0.5, 'warmup-stable-decay: decay linearly during the last decay_frac of max_iters'),
    'min_lr_frac': (0.1, '...down to learning_rate * min_lr_frac'),
    'weight_decay': (0.0, 'AdamW weight decay'),
    'grad_clip': (1.0, 'clip the global gradient norm to this (0 disables clipping)'),
    'ema_decay': (0.999, 'exponential moving average of the weights, used for sampling'),
    # sampling (the grids; generate.py and evaluate.py default to these too)
    'cfg_scale': (2.0, 'classifier-free guidance scale (1 = none); higher: surer class, less variety'),
    'sampler': ('ddpm', "'ddpm' (ancestral), 'ddim' (deterministic) or 'dpm++' (DPM-Solver++(2M))"),
    'sample_steps': (50, 'denoising steps per block'),
    # system
    'seed': (1337, "every step's batch, timesteps and noise are drawn from (seed, process rank, step)"),
    'device': cli.DEVICE_OPTION,
    'dtype': ('bfloat16', "'float32' or 'bfloat16' (bfloat16 autocast on CUDA only; float32 elsewhere)"),
    'compile': (True, 'torch.compile the training step: ~45 s to start, then ~1.2x faster on a 2-core CPU'),
    'attn_backend': ('auto', "'auto' (flex on CUDA, else sdpa), 'flex' (FlexAttention) or 'sdpa' (dense mask)"),
}
CHOICES = {'dataset': data.DATASETS, 'channels': (0, 1, 3), 'hflip': ('auto', 'True', 'False'), 'init_from': ('scratch', 'resume'),
           'device': cli.DEVICES, 'dtype': ('float32', 'bfloat16'), 'attn_backend': ('auto', 'flex', 'sdpa'),
           'sampler': tuple(acdit.SAMPLERS), 'prediction': ('eps', 'x0'), 'noise_schedule': ('linear', 'cosine')}


def check_args(args):
    """Every number checked before anything is loaded: a bad one fails in the first second, not in the optimizer."""
    for key in ('max_iters', 'batch_size', 'eval_interval', 'eval_iters', 'log_interval', 'sample_interval',
                'depth', 'width', 'n_heads'):
        cli.check(getattr(args, key) >= 1, f'{key}={getattr(args, key)} must be at least 1')
    for key in ('patch_size', 'block_h', 'block_w', 'img_size'):
        cli.check(getattr(args, key) >= 0, f'{key}={getattr(args, key)} must be at least 0 (0: from the data)')
    cli.check(args.dataset == 'folder' or not (args.img_size or args.channels),
              f'img_size and channels are for --dataset=folder; {args.dataset} has its own')
    cli.check(args.hflip != 'True' or args.dataset not in data.VIDEO_FRAMES, 'hflip=True: for images, not videos')
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    cli.check(args.init_from == 'resume' or not os.path.exists(ckpt_path), f'{ckpt_path} exists and a new run '
              f'would overwrite it: continue it with --init_from=resume, use another --out_dir, or delete it')
    cli.check(1 <= args.sample_steps <= 1000, f'sample_steps={args.sample_steps} must be in 1..1000')
    cli.check(0 <= args.seed < 2**63, f'seed={args.seed} must be in [0, 2**63)')
    for key, ok in (('learning_rate', args.learning_rate > 0), ('time_budget', args.time_budget >= 0),
                    ('warmup_iters', args.warmup_iters >= 0), ('decay_frac', 0 <= args.decay_frac <= 1),
                    ('min_lr_frac', 0 <= args.min_lr_frac <= 1), ('weight_decay', args.weight_decay >= 0),
                    ('grad_clip', args.grad_clip >= 0), ('ema_decay', 0 <= args.ema_decay < 1),
                    ('label_dropout', 0 <= args.label_dropout < 1), ('min_snr_gamma', args.min_snr_gamma >= 0),
                    ('rope_base', args.rope_base > 1), ('cfg_scale', math.isfinite(args.cfg_scale))):
        cli.check(ok and math.isfinite(getattr(args, key)), f'{key}={getattr(args, key)} is out of range')


def model_config(args, img_size=None, channels=None, n_classes=10):
    """The model this run describes, for images (or video frames) of img_size x img_size x channels (None: the
    dataset's known shape; a folder's comes from its images). A shape option left at 0 follows the data: the smallest
    patch giving at most 64 tokens an image (16 a video frame, as frames add up), a block a row (a video's: a frame)."""
    img_size, channels = (img_size, channels) if img_size else data.DATASET_SHAPES[args.dataset]
    n_frames = data.VIDEO_FRAMES.get(args.dataset, 1)
    max_tokens = 64 if n_frames == 1 else 16
    patch = args.patch_size or next(p for p in range(1, img_size + 1) if img_size % p == 0 and (img_size // p) ** 2 <= max_tokens)
    grid = img_size // patch
    try:
        return acdit.ACDiTConfig(img_size=img_size, in_channels=channels, n_frames=n_frames, patch_size=patch,
            block_h=args.block_h or (1 if n_frames == 1 else grid), block_w=args.block_w or grid,
            depth=args.depth, width=args.width, n_heads=args.n_heads, n_classes=n_classes, rope_base=args.rope_base,
            label_dropout=args.label_dropout, min_snr_gamma=args.min_snr_gamma, prediction=args.prediction,
            noise_schedule=args.noise_schedule, attn_backend=args.attn_backend)
    except AssertionError as e:  # the model's invariants, said in the terms of these options
        raise ConfigError(f'{args.dataset} ({img_size}x{img_size}): {e}') from None


def get_lr(it, args):
    """Warmup-stable-decay: linear warmup, flat, then a linear decay to learning_rate * min_lr_frac
    over the last decay_frac of the run. The flat phase does not depend on max_iters, so a run
    can be extended (or its max_iters chosen late, by the time budget) and only the decay redone."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    decay_start = decay_start_iter(args)
    progress = min(1.0, max(0, it - decay_start) / max(1, args.max_iters - decay_start))
    return args.learning_rate * (1 - progress * (1 - args.min_lr_frac))


def decay_start_iter(args):
    return args.max_iters - int(args.decay_frac * args.max_iters)


@torch.no_grad()
def update_ema(ema, model, it, ema_decay):
    """EMA of the weights, warmed up: over at most ~it/10 steps early on, so that a short run's
    EMA model is not its random initialization."""
    decay = min(ema_decay, (1.0 + it) / (10.0 + it))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def mix64(x):
    """SplitMix64's finalizer: nearby inputs (step 7, step 8) give unrelated 64-bit outputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
    return x ^ (x >> 31)


def seed_step(seed, rank, it):
    """Seed one step from (seed, rank, iteration) alone and return the generator of its batch: a resumed run draws
    exactly the batches, timesteps and noise the uninterrupted run drew, with no random state to save."""
    x = mix64(mix64(mix64(seed) + rank) + it)  # chained, so no two (seed, rank, it) collide by a sum
    torch.manual_seed(x % 2**32)  # the model's timesteps, noise and label dropout, on every device
    return torch.Generator().manual_seed(x >> 32)  # the batch indices, from the other half: unrelated streams


class TrainingLoss(torch.nn.Module):
    """model.training_loss as forward(), which DDP and torch.compile both act on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs, labels):
        return self.model.training_loss(imgs, labels)


@torch.no_grad()
def estimate_loss(models, images, labels, eval_iters, ctx, get_batch):
    """Each model's plain eps-MSE on eval_iters fixed test batches of 32, with fixed timesteps,
    noise and label dropout: comparable between evals and between runs of any batch_size or
    loss weighting. (It draws from torch's seeded generator; the next step reseeds it.)"""
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(images, labels, 32, gen) for _ in range(eval_iters)]
    losses = []
    for m in models:
        torch.manual_seed(0)
        with ctx:
            losses.append(sum(m.training_loss(x, y, weighted=False).item() for x, y in batches) / eval_iters)
    return losses


def sample_grid(model, path, args, dev, n_steps):
    """Samples with a fixed seed (comparable across evals): a row of 10 per class (the first 10 classes), or for video
    one video per class, a row of its frames. A short run's has fewer a row, then fewer steps, to cost at most a tenth of
    the n_steps it trained: n images at s steps cost about n * s / (3 * batch_size) steps (RESULTS.md). Returns both."""
    video, n_rows = model.config.n_frames > 1, min(10, model.config.n_classes)
    budget = 0.1 * 3 * args.batch_size * n_steps / n_rows                  # image-steps a row
    per_row = max(1, min(1 if video else 10, int(budget / args.sample_steps)))
    steps = max(1, min(args.sample_steps, int(budget / per_row)))
    labels = torch.arange(n_rows, device=dev).repeat_interleave(per_row)
    imgs = acdit.sample(model, labels, cfg_scale=args.cfg_scale, sampler=args.sampler, steps=steps,
                        generator=torch.Generator(device=dev).manual_seed(0))
    data.save_grid(imgs.flatten(0, 1) if video else imgs, path, nrow=model.config.n_frames if video else per_row)
    return per_row, steps


class StopRequest:
    """Ctrl-C asks the loop to stop between two steps, so a checkpoint never holds half a step;
    a second Ctrl-C quits at once (one process). Under torchrun the ranks agree at the next log
    interval (an all-reduce of a flag) and all stop after the same step."""

    def __init__(self, ddp, device):
        self.ddp, self.device, self.presses, self.abrupt, self.old = ddp, device, 0, False, None

    def __enter__(self):  # handlers can only be set from the main thread
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def on_sigint(self, signum, frame):
        self.presses += 1
        if self.presses > 1 and not self.ddp:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)

    def exit(self, save, it, ckpt_path, world, argv, log):
        """Save after the last whole step (unless stopped mid-step or before any), say how to resume, exit 130."""
        if self.abrupt:
            log(f'\ninterrupted again: exiting without saving (the last checkpoint, if any, is {ckpt_path})')
        elif save:  # stopped between two steps: `it` is the next step to run
            log(f'\ninterrupted at iter {it}; saving a checkpoint before exiting')
            save(it)
            log(f"resume with: {f'torchrun --nproc_per_node={world}' if self.ddp else 'python'} train.py "
                f"{' '.join(a for a in argv if not a.startswith('--init_from='))} --init_from=resume")
        sys.exit(130)

    def now(self, it, every):
        """Stop before step it? Under DDP asked only every `every` steps."""
        if not self.ddp or it % every:
            return self.presses > 0 and not self.ddp
        flag = torch.tensor([float(self.presses > 0)], device=self.device)
        torch.distributed.all_reduce(flag)  # a sum: does any rank want to stop?
        return flag.item() > 0


def setup_processes(args):
    """(ddp, rank, world size, device). torchrun sets RANK and WORLD_SIZE: one process per GPU
    with nccl, or per CPU worker with gloo."""
    ddp = 'RANK' in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    if ddp and args.device in ('auto', 'cuda') and torch.cuda.is_available():
        dev = torch.device(f'cuda:{local_rank}')
        torch.cuda.set_device(dev)
    else:
        dev = cli.pick_device('cpu' if ddp and args.device == 'auto' else args.device)
    cli.check(args.attn_backend != 'flex' or dev.type == 'cuda', f"attn_backend='flex' cannot train on {dev.type}"
              f" (FlexAttention has no backward there): use --attn_backend=sdpa or auto")
    if ddp:
        torch.distributed.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return ddp, rank, world, dev


def compiled(step_model, dev, log):
    """torch.compile step_model, if it works here: compiling a two-op function first finds a
    missing C++ compiler (CPU) or Triton (CUDA) in seconds, and then the eager model trains."""
    try:
        torch.compile(lambda x: (x * 2.0).sin(), dynamic=False)(torch.ones(4, device=dev))
    except Exception as e:  # whatever the toolchain raises; its first line says what is missing
        torch._dynamo.reset()
        log(f"warning: torch.compile does not work here ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
            f"training without it, about 1.2x slower on a CPU. Install gcc or clang, or pass --compile=False")
        return step_model
    log(f"compiling the model (the first steps are slow{': about 45 s on a 2-core CPU' if dev.type == 'cpu' else ''})...")
    return torch.compile(step_model)


def make_model(config, args, dev, log):
    """A new model (seeded), its EMA copy and the optimizer."""
    torch.manual_seed(args.seed)
    model = acdit.ACDiT(config).to(dev)
    log(f'model: {model.num_params() / 1e6:.2f}M parameters, {config.n_blocks} blocks of {config.block_len} tokens, '
        f'training sequence {config.seq_len} tokens, attention: {model.backend(dev)}, predicting {config.prediction} '
        f'({config.noise_schedule} noise schedule), loss: eps-MSE'
        + (f' with Min-SNR-{config.min_snr_gamma:g} weights (eval: the plain eps-MSE)' if config.min_snr_gamma else '')
        + ('; x0 is scored as the eps it implies, whose error near t = 0 is 100x that of x0, so an early '
           'test loss far above the training loss is expected' if config.prediction == 'x0' else ''))
    ema = acdit.ACDiT(config).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    # fused AdamW: one kernel for all parameters (the per-tensor loop costs ~8% of a CPU step at batch 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay, fused=dev.type in ('cpu', 'cuda') or None)
    return model, ema, optimizer


def resume(path, args, config, model, ema, optimizer, log):
    """Load a checkpoint of the same model into model, EMA and optimizer; return its step and log rows."""
    ckpt = cli.load_checkpoint(path, next(model.parameters()).device)
    cli.check(isinstance(ckpt, dict) and {'model', 'ema', 'optimizer', 'args', 'model_config', 'iter_num'} <= set(ckpt),
              f'{path} is not a checkpoint train.py can resume: start anew in another --out_dir')
    saved = dict(dataclasses.asdict(acdit.ACDiTConfig()), **ckpt['model_config'])  # a field it predates: the default
    diffs = [f'{k}={v!r} (this run: {getattr(config, k, None)!r})' for k, v in saved.items()
             if k not in ('min_snr_gamma', 'label_dropout', 'attn_backend') and v != getattr(config, k, None)]
    cli.check(not diffs, f"cannot resume from {path}: its model has {', '.join(diffs)}; resume with its "
                         f"options, or start anew in another --out_dir")
    fused = optimizer.param_groups[0]['fused']
    try:
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f'checkpoint {path} does not fit this model: {str(e).strip().splitlines()[-1]}') from None
    for group in optimizer.param_groups:  # the saved choice may come from another device
        group['fused'] = fused
    log(f"resumed from {path} at iter {ckpt['iter_num']}")
    if args.time_budget > 0:  # the budget was spent on choosing max_iters: keep that choice, if made
        args.max_iters = ckpt['args']['max_iters']
        if args.max_iters != TimeBudget.UNCHOSEN:
            log(f"time_budget: keeping the checkpoint's max_iters={args.max_iters}")
    changed = [f'{k} {v!r} -> {getattr(args, k)!r}' for k, v in ckpt['args'].items()
               if k not in ('init_from', 'time_budget') and v != getattr(args, k, v)]
    if changed:
        log(f"note: this run changes the checkpoint's options: {', '.join(changed)}")
    return ckpt['iter_num'], ckpt.get('log', [])  # (no rows: a checkpoint from before log.csv)


class TimeBudget:
    """--time_budget: time the steps after the first WARMUP (compiling), and from step 2 * WARMUP on, every RECHECK
    steps until the decay starts, choose max_iters from their mean time (evals included) so that the run ends about
    `minutes` after launch, RESERVE of the time left kept for evals and grids: a machine that slows down still ends
    on time. Warmup and stable learning rates do not depend on max_iters (UNCHOSEN until the first choice)."""
    WARMUP, RECHECK, RESERVE, UNCHOSEN = 50, 500, 0.05, 10**9

    def __init__(self, minutes, t_launch, dev, ddp, log, start=0):
        self.seconds, self.t_launch, self.dev, self.ddp, self.log = minutes * 60, t_launch, dev, ddp, log
        self.start = start  # steps count from here (a run stopped before the budget chose starts again)

    def after_step(self, it, args):
        """Set args.max_iters after step it, if it is a step to choose at."""
        n = it - self.start
        if not (n == self.WARMUP or n == 2 * self.WARMUP or (n > 2 * self.WARMUP and n % self.RECHECK == 0
                                                             and it < decay_start_iter(args))):
            return
        cli.sync(self.dev)
        now = time.time()
        if n == self.WARMUP:
            self.t_warm = now
            return
        step_seconds = (now - self.t_warm) / (n - self.WARMUP)
        chosen = [max(it, it + int((self.seconds - now + self.t_launch) * (1 - self.RESERVE) / step_seconds))]
        if self.ddp:  # every rank runs rank 0's number of steps
            torch.distributed.broadcast_object_list(chosen, src=0)
        if abs(chosen[0] - args.max_iters) > 0.01 * min(chosen[0], args.max_iters):
            self.log(f'time_budget: {step_seconds * 1000:.1f} ms a step, {fmt_time(now - self.t_launch)} '
                     f'gone, so max_iters={chosen[0]} (checked every {self.RECHECK} steps until the decay)')
        args.max_iters = chosen[0]


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))  # h:mm:ss


def main(argv=None):
    t_launch = time.time()  # a time budget counts from here: loading and compiling are part of it
    args = cli.parse_args(argv, __doc__, OPTIONS, CHOICES, exclusive=[('max_iters', 'time_budget')])
    check_args(args)
    config = model_config(args) if args.dataset != 'folder' else None  # a folder's shape: once it is read
    ddp, rank, world, dev = setup_processes(args)  # before touching the disk: a bad --device changes nothing
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    master = rank == 0  # only rank 0 prints and writes files
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    ctx = cli.autocast_context(dev, args.dtype)
    # the whole dataset lives on the device as uint8: a batch is an index, no DataLoader
    train_x, train_y = data.load_dataset(args.dataset, args.data_dir, 'train', args.img_size, args.channels)
    config = config or model_config(args, train_x.shape[-1], train_x.shape[1], int(train_y.max()) + 1)
    test_x, test_y = data.load_dataset(args.dataset, args.data_dir, 'test', config.img_size, config.in_channels)
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))
    hflip = args.hflip == 'True' or (args.hflip == 'auto' and args.dataset in ('cifar10', 'folder'))
    get_batch = data.moving_mnist_batch if args.dataset in data.VIDEO_FRAMES else \
        functools.partial(data.get_batch, hflip=hflip)  # mirror photos, not digits
    classes = data.class_names(args.dataset, args.data_dir)  # saved with the model: generate.py names its rows
    log(f'device: {dev}{f" x{world} processes" if ddp else ""}, dtype: {"bfloat16 autocast" if isinstance(ctx, torch.autocast) else "float32"}; '
        f'training on {args.dataset} ({len(classes)} classes: {", ".join(classes)}){", half of each batch mirrored" if hflip else ""}'
        + (f'; warning: warmup_iters={args.warmup_iters} >= max_iters={args.max_iters}, so the learning rate never leaves '
           f'warmup' if args.warmup_iters >= args.max_iters and not args.time_budget else ''))  # a budget's: chosen later
    model, ema, optimizer = make_model(config, args, dev, log)
    start, log_rows = resume(ckpt_path, args, config, model, ema, optimizer, log) if args.init_from == 'resume' else (0, [])
    budget = TimeBudget(args.time_budget, t_launch, dev, ddp, log, start) \
        if args.time_budget > 0 and (not start or args.max_iters == TimeBudget.UNCHOSEN) else None
    if budget:  # until the budget chooses, no end in sight and so no decay
        args.max_iters = TimeBudget.UNCHOSEN
        log(f'time_budget={args.time_budget:g} min chooses max_iters (a later --max_iters would win instead)')
    step_model = compiled(TrainingLoss(model), dev, log) if args.compile else TrainingLoss(model)
    if ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[dev.index] if dev.type == 'cuda' else None)

    def save(it, **extra):
        if master:
            cli.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'ema': ema.state_dict(),
                                            'optimizer': optimizer.state_dict(), 'args': vars(args), 'classes': classes,
                                            'model_config': dataclasses.asdict(config), 'iter_num': it, 'log': log_rows, **extra})
            log(f'saved {ckpt_path} (iter {it})')

    t_start = t_log = time.time()
    it = it_log = start
    with StopRequest(ddp, dev) as stop:
        try:
            while it < args.max_iters and not stop.now(it, args.log_interval):
                batch_gen = seed_step(args.seed, rank, it)
                lr = get_lr(it, args)
                optimizer.param_groups[0]['lr'] = lr  # the one group: every parameter
                with ctx:
                    loss = step_model(*get_batch(train_x, train_y, args.batch_size, batch_gen))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
                if not torch.isfinite(grad_norm):  # it would poison the weights: stop before the update
                    print(f'error: the gradients are not finite at iter {it} (loss {loss.item():.4g}); stopping without saving. '
                          f'Resume from the last good {ckpt_path}, if any, with a lower --learning_rate', file=sys.stderr, flush=True)
                    sys.exit(1)
                optimizer.step()
                update_ema(ema, model, it, args.ema_decay)
                it += 1
                if budget:
                    budget.after_step(it, args)
                evaluate = it % args.eval_interval == 0 or it == args.max_iters
                if master and (evaluate or it % args.log_interval == 0):  # loss.item() syncs a GPU only here
                    now = time.time()
                    dt, t_log, it_log = (now - t_log) / max(1, it - it_log), now, it
                    log(f'iter {it}/{args.max_iters} | loss {loss.item():.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/it | '
                        f'{args.batch_size * world / dt:.0f} img/s | elapsed {fmt_time(now - t_start)} | '
                        f'eta {fmt_time(dt * (args.max_iters - it))}')
                    row = dict(iter=it, loss=loss.item(), lr=lr, ms_per_step=round(dt * 1000, 1), elapsed_s=round(now - t_start, 1))
                    if evaluate:
                        row['test_loss'], row['ema_test_loss'] = estimate_loss([model, ema], test_x, test_y, args.eval_iters, ctx, get_batch)
                        log(f"eval @ {it}: test loss {row['test_loss']:.4f}, ema {row['ema_test_loss']:.4f}")
                    log_rows.append(row)  # the checkpoint's rows end at its iter (log.csv's may not: see write_log)
                    data.write_log(args.out_dir, log_rows, new=not start and len(log_rows) == 1)
                    if evaluate:
                        save(it, test_loss=row['test_loss'], ema_test_loss=row['ema_test_loss'])
                if master and (it % args.sample_interval == 0 or it == args.max_iters):
                    t0, path = time.time(), os.path.join(args.out_dir, f'samples_{it:06d}.png')
                    per_row, steps = sample_grid(ema, path, args, dev, it - start)
                    log(f'wrote {path} ({per_row} a class at {steps} steps a block: {time.time() - t0:.1f}s)')
        except KeyboardInterrupt:  # our handler's second Ctrl-C (maybe mid-step), or a first from elsewhere
            stop.abrupt, stop.presses = stop.presses > 1, max(stop.presses, 1)
        finally:
            if ddp:  # free DDP before its process group: the other order can deadlock at exit (gloo)
                del step_model
                torch.distributed.destroy_process_group()
    if stop.presses:
        stop.exit(it > start and save, it, ckpt_path, world, sys.argv[1:] if argv is None else argv, log)
    log(f'done: {it - start} iters{f" (iter {start} to {it})" if start else ""} in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}' if it > start else
        f'nothing to do: the checkpoint is at iter {start}, max_iters={args.max_iters}')


if __name__ == '__main__':
    cli.run_cli(main)
