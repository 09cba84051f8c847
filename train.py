"""
Train an ACDiT model on MNIST or CIFAR-10 images, or Moving MNIST videos.

    python train.py                                  # MNIST with the defaults below
    python train.py --data_dir=path/to/mnist         # offline: the four MNIST files are there
    python train.py config/mnist_gpu.py              # a config file overrides the defaults
    python train.py config/cifar10.py --batch_size=64   # ...and --key=value overrides both
    python train.py config/moving_mnist.py           # videos: one block per frame
    torchrun --nproc_per_node=4 train.py config/cifar10.py   # one process per GPU
    python train.py --help                           # every key with its default
"""

import dataclasses
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
from cli import CheckpointError, ConfigError

# ----------------------------------------------------------------------------- config start
# --- I/O ---
out_dir = 'out'  # the checkpoint and sample grids go here (progress is printed, not saved)
init_from = 'scratch'  # 'scratch' (new model) or 'resume' (from out_dir/ckpt.pt)
eval_interval = 1000  # evaluate the test loss (and save a checkpoint) every this many steps
eval_iters = 20  # test batches (of 32 images, whatever batch_size is) averaged per evaluation
log_interval = 200  # print the training loss every this many steps
sample_interval = 6000  # save a grid of samples every this many steps
# --- data ---
dataset = 'mnist'  # 'mnist', 'cifar10' or 'moving_mnist' (videos: see config/moving_mnist.py)
data_dir = 'data'  # where the dataset files are (downloaded there when missing)
# --- model shape ---
patch_size = 4  # each token is a patch_size x patch_size patch of pixels
block_h = 1  # a block (the unit of autoregression) is block_h x block_w patches...
block_w = 7  # ...so 1x7 patches of 4x4 pixels is one row of a 28x28 MNIST image
depth = 3  # transformer layers (3 beat 4 in 20 minutes on 2 CPU cores: shallower, so more steps)
width = 128  # model dimension
n_heads = 4  # attention heads (width must be divisible by n_heads)
rope_base = 100.0  # 2D RoPE frequency base (100 beat 10000 on the 7x7 MNIST grid: class accuracy 0.71 vs 0.62)
min_snr_gamma = 1.0  # Min-SNR-gamma loss weights (1 beat 2 and 5: class accuracy 0.64 -> 0.91 at CFG 2); 0 = plain eps-MSE as in the paper
label_dropout = 0.1  # drop the class label this often in training, for classifier-free guidance
# --- training ---
max_iters = 24000  # total optimizer steps (18-20 minutes on a 2-core AVX-512 CPU with these defaults)
time_budget = 0.0  # minutes; > 0: time the warm steps, then set max_iters so the run ends in about this long
batch_size = 8  # images per optimizer step and process (small batches, many steps: 8 did best in 20 CPU minutes)
learning_rate = 3e-3  # peak learning rate (AdamW); QK-norm and grad clipping keep this high lr stable
warmup_iters = 800  # linear warmup from ~0 to learning_rate over this many steps
decay_frac = 0.5  # warmup-stable-decay: decay linearly during the last decay_frac of max_iters
min_lr_frac = 0.1  # ...down to learning_rate * min_lr_frac
weight_decay = 0.0  # AdamW weight decay
grad_clip = 1.0  # clip the global gradient norm to this (0.0 disables clipping)
ema_decay = 0.999  # exponential moving average of the weights, used for sampling
# --- sampling ---
cfg_scale = 2.0  # classifier-free guidance scale (1.0 = no guidance); higher: surer class, less variety
sampler = 'ddpm'  # 'ddpm' (ancestral), 'ddim' (deterministic) or 'dpm++' (DPM-Solver++(2M)), for the grids
sample_steps = 50  # denoising steps per block when sampling
# --- system ---
seed = 1337  # every step's batch, timesteps and noise are drawn from (seed, process rank, step)
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'
dtype = 'bfloat16'  # 'float32' or 'bfloat16'; bfloat16 autocast is used on CUDA only, float32 elsewhere
compile = True  # torch.compile the training step: ~45 s to start, then ~1.2x faster on a 2-core CPU
attn_backend = 'auto'  # 'auto' (flex on CUDA, else sdpa), 'flex' (FlexAttention) or 'sdpa' (dense mask)
# ----------------------------------------------------------------------------- config end

CHOICES = {'dataset': data.DATASETS, 'init_from': ('scratch', 'resume'),
           'device': ('auto', 'cpu', 'cuda', 'mps'), 'dtype': ('float32', 'bfloat16'),
           'attn_backend': ('auto', 'flex', 'sdpa'), 'sampler': tuple(acdit.SAMPLERS)}
# A checkpoint can only be resumed by a run whose model has the same shape and data.
MODEL_KEYS = ('dataset', 'patch_size', 'block_h', 'block_w', 'depth', 'width', 'n_heads', 'rope_base')
# Keys a resumed run may change (say, a longer max_iters); it is told, since it no longer
# continues the same run.
TRAINING_KEYS = ('min_snr_gamma', 'label_dropout', 'max_iters', 'batch_size', 'learning_rate',
                 'warmup_iters', 'decay_frac', 'min_lr_frac', 'weight_decay', 'grad_clip', 'ema_decay')


def check_config(c):
    """The model config this run describes, after checking every number up front: a bad
    value fails in the first second with a ConfigError, not later in the optimizer."""
    for key in ('max_iters', 'batch_size', 'eval_interval', 'eval_iters', 'log_interval',
                'sample_interval', 'sample_steps'):
        cli.check(getattr(c, key) >= 1, f'{key}={getattr(c, key)} must be at least 1')
    cli.check(0 <= c.seed < 2**62, f'seed={c.seed} must be in [0, 2**62)')
    for key, ok, rule in (('learning_rate', c.learning_rate > 0, 'positive'),
                          ('time_budget', c.time_budget >= 0, '>= 0 (0: train max_iters steps)'),
                          ('warmup_iters', c.warmup_iters >= 0, '>= 0'),
                          ('decay_frac', 0 <= c.decay_frac <= 1, 'in [0, 1]'),
                          ('min_lr_frac', 0 <= c.min_lr_frac <= 1, 'in [0, 1]'),
                          ('weight_decay', c.weight_decay >= 0, '>= 0'),
                          ('grad_clip', c.grad_clip >= 0, '>= 0 (0 disables clipping)'),
                          ('ema_decay', 0 <= c.ema_decay < 1, 'in [0, 1)'),
                          ('cfg_scale', math.isfinite(c.cfg_scale), 'a finite number')):
        cli.check(ok and math.isfinite(getattr(c, key)), f'{key}={getattr(c, key)} must be {rule}')
    img_size, channels = data.DATASET_SHAPES[c.dataset]
    try:
        mcfg = acdit.ACDiTConfig(
            img_size=img_size, in_channels=channels, n_frames=data.VIDEO_FRAMES.get(c.dataset, 1),
            patch_size=c.patch_size, block_h=c.block_h,
            block_w=c.block_w, depth=c.depth, width=c.width, n_heads=c.n_heads, rope_base=c.rope_base,
            label_dropout=c.label_dropout, min_snr_gamma=c.min_snr_gamma, attn_backend=c.attn_backend)
    except ValueError as e:
        hint = ' (config/moving_mnist.py is a working start)' if c.dataset in data.VIDEO_FRAMES else ''
        raise ConfigError(str(e) + hint) from None
    cli.check(c.sample_steps <= mcfg.n_timesteps,
              f'sample_steps={c.sample_steps} is more than the {mcfg.n_timesteps} diffusion timesteps')
    return mcfg


def get_lr(it, c):
    """Warmup-stable-decay: linear warmup, flat at learning_rate, then a linear decay to
    learning_rate * min_lr_frac over the last decay_frac of the run. Unlike cosine the flat
    phase does not depend on max_iters, so a run can be extended and only the decay redone."""
    decay_start = decay_start_iter(c)
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    progress = min(1.0, max(0, it - decay_start) / max(1, c.max_iters - decay_start))
    return c.learning_rate * (1 - progress * (1 - c.min_lr_frac))


def decay_start_iter(c):
    """The step where warmup-stable-decay's decay begins."""
    return c.max_iters - int(c.decay_frac * c.max_iters)


def ema_decay_at(it, ema_decay):
    """EMA warm-up: average over at most ~it/10 steps early on, so the EMA model of a short
    run is not dominated by its random initialization."""
    return min(ema_decay, (1.0 + it) / (10.0 + it))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def seed_step(seed, rank, it, batch_gen):
    """Seed one step from (seed, rank, iteration) alone (CPython hashes a tuple of ints the
    same in every run): a resumed run draws exactly the batches, timesteps and noise the
    uninterrupted run drew, with no random state to save."""
    s = hash((seed, rank, it)) % 2**62
    torch.manual_seed(s)  # the model's timesteps, noise and label dropout, on every device
    batch_gen.manual_seed(s)  # the batch indices


class TrainingLoss(torch.nn.Module):
    """model.training_loss as forward(), which DDP and torch.compile both act on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs, labels):
        return self.model.training_loss(imgs, labels)


EVAL_BATCH_SIZE = 32


@torch.no_grad()
def estimate_loss(models, images, labels, eval_iters, ctx, get_batch):
    """Each model's plain eps-MSE on eval_iters fixed test batches with fixed timesteps, noise
    and label dropout: comparable between evals and between runs of any batch_size or loss
    weighting. (It draws from torch's seeded generator; the next step reseeds it.)"""
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(images, labels, EVAL_BATCH_SIZE, gen) for _ in range(eval_iters)]
    out = []
    for m in models:
        m.eval()
        torch.manual_seed(0)
        with ctx:
            out.append(sum(m.training_loss(x, y, weighted=False).item() for x, y in batches) / eval_iters)
        m.train()
    return out


def sample_grid(model, path, c, dev, n_per_class=10):
    """A grid of samples, one row per class, with a fixed seed (comparable across evals); for
    video one video per class, a row of its frames."""
    video = model.cfg.n_frames > 1
    labels = torch.arange(10, device=dev).repeat_interleave(1 if video else n_per_class)
    imgs = acdit.sample(model, labels, cfg_scale=c.cfg_scale, sampler=c.sampler, steps=c.sample_steps,
                        generator=torch.Generator(device=dev).manual_seed(0))
    if video:
        imgs, n_per_class = imgs.flatten(0, 1), model.cfg.n_frames           # (10*T, C, H, W)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    data.save_grid(imgs, path, nrow=n_per_class)


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop between two steps, so the checkpoint it saves
    never holds a half-applied step; a second Ctrl-C quits at once (one process). Under
    torchrun each rank gets the signal at another point of its step, so the ranks agree at
    the next log interval (one all-reduce of a flag) and all stop after the same step."""

    def __init__(self, ddp, device):
        self.ddp, self.device, self.presses, self.abrupt, self.old = ddp, device, 0, False, None

    def _on_sigint(self, signum, frame):
        self.presses += 1
        if self.presses > 1 and not self.ddp:
            raise KeyboardInterrupt

    def __enter__(self):  # handlers can only be set from the main thread
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)

    def now(self, it, every):
        """Should the loop stop before step it? Under DDP asked only every `every` steps."""
        if not self.ddp:
            return self.presses > 0
        if it % every:
            return False
        flag = torch.tensor([float(self.presses > 0)], device=self.device)
        torch.distributed.all_reduce(flag)  # a sum: does any rank want to stop?
        return flag.item() > 0


def setup_processes(c):
    """(ddp, rank, world size, device). torchrun sets RANK and WORLD_SIZE: one process per
    GPU with nccl, or per CPU worker with gloo."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, cli.pick_device(c.device)
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if c.device in ('auto', 'cuda') and torch.cuda.is_available():
        dev = torch.device(f'cuda:{local_rank}')
        torch.cuda.set_device(dev)
    else:
        dev = cli.pick_device('cpu' if c.device == 'auto' else c.device)
    torch.distributed.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return True, rank, world, dev


def make_model(mcfg, c, dev):
    """A new model (seeded), its EMA copy and the optimizer."""
    torch.manual_seed(c.seed)
    model = acdit.ACDiT(mcfg).to(dev)
    ema = acdit.ACDiT(mcfg).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    # fused AdamW: one kernel for all parameters (at batch 8 on a 2-core CPU the per-tensor
    # loop costs ~5 ms a step, about 8% of it; the fused one ~1 ms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=c.weight_decay, fused=dev.type in ('cpu', 'cuda') or None)
    return model, ema, optimizer


def training_step(model, c, dev, ddp, log):
    """model.training_loss as a module, compiled if asked (and possible), wrapped for DDP."""
    step_model = TrainingLoss(model)
    if c.compile:
        problem = cli.compile_problem(dev)
        if problem is None:
            log(f"compiling the model (the first steps are slow{': about 45 s on a 2-core CPU' if dev.type == 'cpu' else ''})...")
            step_model = torch.compile(step_model)
        else:  # a missing compiler should not stop a laptop run: the eager model trains the same
            log(f'warning: torch.compile does not work here ({problem}); training without it, '
                f'about 1.2x slower on a CPU. Install a C++ compiler (gcc or clang) to use it, '
                f'or pass --compile=False to skip this check.')
    if ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[dev.index] if dev.type == 'cuda' else None)
    return step_model


def resume(path, config, model, ema, optimizer, log):
    """Load a checkpoint into model, EMA and optimizer; return its iteration."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: init_from='resume' needs one; "
                              f"start with --init_from=scratch or point --out_dir at an earlier run")
    ckpt = cli.load_checkpoint(path, map_location=next(model.parameters()).device)
    saved = ckpt.get('config', {}) if isinstance(ckpt, dict) else {}
    diffs = [k for k in MODEL_KEYS if saved.get(k) != config[k]]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: " + '; '.join(
                f"checkpoint has {k}={saved.get(k, '<missing>')!r}, this run asks {k}={config[k]!r}" for k in diffs) +
            f". Run with the checkpoint's values ({' '.join(f'--{k}={saved[k]!r}' for k in diffs if k in saved)}), "
            f"or train a new model with --init_from=scratch (and another --out_dir to keep this one)")
    fused = optimizer.param_groups[0]['fused']
    try:
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
        start = int(ckpt['iter_num'])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f'checkpoint {path} does not fit this model: {str(e).splitlines()[0]}') from None
    for group in optimizer.param_groups:  # the saved choice may come from another device
        group['fused'] = fused
    log(f"resumed from {path} at iter {start}")
    if config['time_budget'] > 0:  # the budget was spent on deciding max_iters: keep that decision
        config['max_iters'] = saved.get('max_iters', config['max_iters'])
        log(f"time_budget: keeping the checkpoint's max_iters={config['max_iters']}")
    changed = [f'{k} {saved[k]!r} -> {config[k]!r}' for k in TRAINING_KEYS if saved.get(k, config[k]) != config[k]]
    if changed:
        log(f"note: this run changes the checkpoint's training settings: {', '.join(changed)} "
            f"(pass the checkpoint's values to continue the same run)")
    return start


class TimeBudget:
    """--time_budget: after WARMUP steps (compiling) time the next WARMUP, then choose max_iters
    so the run ends about `minutes` after launch, RESERVE of the time left kept for evals,
    checkpoints and grids (they took 5.5% of the CPU recipe). Then, every RECHECK steps until
    the decay starts, choose again from the mean time of all steps since (evals included), so a
    machine that slows down or speeds up still ends on time. Warmup and stable learning rates
    do not depend on max_iters, so choosing it again changes nothing done (max_iters is 10**9
    until the first choice). A run stopped before step 2 * WARMUP resumes with max_iters as
    given; a resumed run keeps the last choice."""
    WARMUP, RECHECK, RESERVE = 50, 500, 0.05

    def __init__(self, minutes, t_launch, dev, ddp):
        self.seconds, self.t_launch, self.dev, self.ddp = minutes * 60, t_launch, dev, ddp

    def after_step(self, it, decay_start):
        """max_iters chosen after step it (at it == 2 * WARMUP, then at multiples of RECHECK
        before decay_start, the current choice's decay start), else None."""
        first = it == 2 * self.WARMUP
        if not (it == self.WARMUP or first or (it > 2 * self.WARMUP and it % self.RECHECK == 0 and it < decay_start)):
            return None
        cli.sync(self.dev)
        now = time.time()
        if it == self.WARMUP:
            self.t_warm = now
            return None
        if first:
            self.step_seconds, self.t_first = (now - self.t_warm) / self.WARMUP, now
        else:  # every step since the first choice, evals and grids included
            self.step_seconds = (now - self.t_first) / (it - 2 * self.WARMUP)
        self.elapsed = now - self.t_launch
        left = self.seconds - self.elapsed
        chosen = [max(it, it + int(left * (1 - self.RESERVE) / self.step_seconds))]
        if self.ddp:  # every rank runs rank 0's number of steps
            torch.distributed.broadcast_object_list(chosen, src=0)
        return chosen[0]


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def main(argv=None):
    t_launch = time.time()  # a time budget counts from here: loading and compiling are part of it
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_args(argv, __file__, __doc__, CHOICES)
    if c is None:
        return  # --help was printed
    config = vars(c).copy()  # saved in the checkpoint
    mcfg = check_config(c)
    ddp, rank, world, dev = setup_processes(c)  # before touching the disk: a bad --device changes nothing
    cli.check(c.attn_backend != 'flex' or dev.type == 'cuda',
              f"attn_backend='flex' cannot train on {dev.type}: FlexAttention has no backward there. "
              f"Use --attn_backend=sdpa (or auto)")
    ckpt_path = os.path.join(c.out_dir, 'ckpt.pt')
    cli.check(c.init_from == 'resume' or not os.path.exists(ckpt_path),  # never lose a run by accident
              f'{ckpt_path} already exists and a new run would overwrite it: continue that run with '
              f'--init_from=resume (with a larger --max_iters to train longer), start anew in another '
              f'--out_dir, or delete the file')
    master = rank == 0  # only rank 0 prints and writes files
    log = (lambda *a, **k: print(*a, **k, flush=True)) if master else (lambda *a, **k: None)
    ctx = cli.autocast_context(dev, c.dtype)
    log(f'device: {dev}{f" x{world} processes" if ddp else ""}, '
        f'dtype: {"bfloat16 autocast" if isinstance(ctx, torch.autocast) else "float32"}')

    # the whole dataset lives on the device as uint8 (47 MB for MNIST, 150 MB for CIFAR-10):
    # a batch is then an index, with no DataLoader and no host-to-device copies
    train_images, train_labels = (t.to(dev) for t in data.load_dataset(c.dataset, c.data_dir, 'train'))
    test_images, test_labels = (t.to(dev) for t in data.load_dataset(c.dataset, c.data_dir, 'test'))
    hflip = c.dataset == 'cifar10'  # mirror half the photos; digits are not symmetric
    get_batch = data.moving_mnist_batch if c.dataset in data.VIDEO_FRAMES else \
        functools.partial(data.get_batch, hflip=hflip)
    batch_gen = torch.Generator()

    model, ema, optimizer = make_model(mcfg, c, dev)
    start = resume(ckpt_path, config, model, ema, optimizer, log) if c.init_from == 'resume' else 0
    c.max_iters = config['max_iters']
    budget = TimeBudget(c.time_budget, t_launch, dev, ddp) if c.time_budget > 0 and c.init_from == 'scratch' \
        else None  # a resumed run keeps the max_iters its budget chose
    if budget:  # until the budget chooses: no end in sight, so no decay either
        c.max_iters = 10**9
    log(f'model: {model.num_params() / 1e6:.2f}M parameters, {mcfg.n_blocks} blocks of {mcfg.block_len} '
        f'tokens, training sequence {mcfg.seq_len} tokens, attention: {model.backend(dev)}')
    log('loss: eps-MSE' + (f' with Min-SNR-{mcfg.min_snr_gamma:g} weights (the logged loss is weighted; '
                           f'eval reports the plain eps-MSE)' if mcfg.min_snr_gamma else ' (unweighted)'))

    step_model = training_step(model, c, dev, ddp, log)

    def save(it):
        if master:
            cli.save_checkpoint(ckpt_path, {'model': model.state_dict(), 'ema': ema.state_dict(),
                                            'optimizer': optimizer.state_dict(), 'config': config,
                                            'model_config': dataclasses.asdict(mcfg), 'iter_num': it})
            log(f'saved {ckpt_path} (iter {it})')

    if start >= c.max_iters:
        log(f'nothing to do: the checkpoint is at iter {start}, max_iters={c.max_iters}')
    t_start = t_log = time.time()
    it = it_log = start
    with StopRequest(ddp, dev) as stop:
        try:
            while it < c.max_iters and not stop.now(it, c.log_interval):
                seed_step(c.seed, rank, it, batch_gen)
                lr = get_lr(it, c)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                x, y = get_batch(train_images, train_labels, c.batch_size, batch_gen)
                with ctx:
                    loss = step_model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                try:  # a non-finite gradient would poison the weights: stop before the update (a GPU sync)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip or math.inf,
                                                   error_if_nonfinite=True)
                except RuntimeError:
                    print(f'error: the gradients are not finite at iter {it} (loss {loss.item():.4g}); '
                          f'stopping without saving. The last good checkpoint (if any) is {ckpt_path}: '
                          f'resume from it with a lower --learning_rate', file=sys.stderr, flush=True)
                    sys.exit(1)
                optimizer.step()
                update_ema(ema, model, ema_decay_at(it, c.ema_decay))
                it += 1
                if budget and (chosen := budget.after_step(it, decay_start_iter(c))):
                    if it == 2 * budget.WARMUP:
                        log(f'time_budget {c.time_budget:g} min: a warm step takes {budget.step_seconds * 1000:.1f} ms '
                            f'and {fmt_time(budget.elapsed)} have passed, so max_iters={chosen} '
                            f'({budget.RESERVE:.0%} of the rest kept for evals and grids; checked again until the '
                            f'decay starts; a resume keeps it)')
                    elif abs(chosen - c.max_iters) > 0.01 * c.max_iters:
                        log(f'time_budget: steps have taken {budget.step_seconds * 1000:.1f} ms on average, so '
                            f'max_iters {c.max_iters} -> {chosen}')
                    c.max_iters = config['max_iters'] = chosen

                if it % c.log_interval == 0 or it == c.max_iters:  # loss.item() waits for a GPU only here
                    now = time.time()
                    dt = (now - t_log) / max(1, it - it_log)
                    t_log, it_log = now, it
                    log(f'iter {it}/{c.max_iters} | loss {loss.item():.4f} | lr {lr:.2e} | '
                        f'{dt * 1000:.0f} ms/it | {c.batch_size * world / dt:.0f} img/s | '
                        f'elapsed {fmt_time(now - t_start)} | eta {fmt_time(dt * (c.max_iters - it))}')
                if it % c.eval_interval == 0 or it == c.max_iters:
                    if master:
                        raw, avg = estimate_loss([model, ema], test_images, test_labels, c.eval_iters, ctx, get_batch)
                        log(f'eval @ {it}: test loss {raw:.4f}, ema {avg:.4f}')
                    save(it)
                if master and (it % c.sample_interval == 0 or it == c.max_iters):
                    path = os.path.join(c.out_dir, f'samples_{it:06d}.png')
                    t0 = time.time()
                    sample_grid(ema, path, c, dev)
                    log(f'wrote {path} ({time.time() - t0:.1f}s)')
        except KeyboardInterrupt:  # our handler's second Ctrl-C, or one from elsewhere (a first press)
            stop.abrupt, stop.presses = stop.presses > 1, max(stop.presses, 1)
        finally:
            if ddp:
                # Free DDP (which holds the process group) before the group: the other order can
                # deadlock at exit, gloo's threads joined while this one holds the GIL (torch 2.13)
                del step_model
                torch.distributed.destroy_process_group()
    if stop.presses:
        if stop.abrupt:  # maybe in the middle of a step
            log(f'\ninterrupted again: exiting without saving (the last checkpoint, if any, is {ckpt_path})')
        elif it > start:  # stopped between two steps: `it` is the next step to run
            log(f'\ninterrupted at iter {it}; saving a checkpoint before exiting')
            save(it)
            launcher = f'torchrun --nproc_per_node={world}' if ddp else 'python'
            log(f"resume with: {launcher} train.py {' '.join(a for a in argv if not a.startswith('--init_from='))} "
                f"--init_from=resume")
        sys.exit(130)
    if it > start:
        log(f'done: {it} iters in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}')


if __name__ == '__main__':
    cli.run_cli(main)
