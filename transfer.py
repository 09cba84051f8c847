"""
Transfer: does a generatively trained ACDiT read images? (The paper fine-tunes it on ImageNet.)
The encoder is the clean path: every block clean, block-causal, no timestep, no label.

    python transfer.py --ckpt=weights/mnist.pt --data_dir=path/to/mnist     # linear probes (--init=random: a new model)
    python transfer.py --ckpt=weights/cifar10.pt --data_dir=path/to/cifar10 --mode=finetune --cpu_minutes=10

Fine-tuning counts this process's CPU time: two runs side by side with OMP_NUM_THREADS=1 get equal shares.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import acdit
import cli
import data

OPTIONS = {
    'ckpt': ('weights/mnist.pt', 'a train.py checkpoint or shipped weights: the encoder (its EMA weights)'),
    'init': ('pretrained', "'pretrained' (the checkpoint's weights) or 'random' (a new model of its config)"),
    'dataset': ('', "'mnist', 'cifar10' or 'folder' (its images read at the checkpoint's size and channels); '' = the checkpoint's"),
    'data_dir': ('', "where the dataset is; '' = the checkpoint's"),
    'mode': ('probe', "'probe' (linear probes on frozen features) or 'finetune' (encoder + linear head)"),
    'n_train': (10000, 'probe: training images used (drawn at random with the seed)'),
    'cpu_minutes': (10.0, 'finetune: CPU minutes of training steps (the four test evaluations not counted)'),
    'batch_size': (64, 'finetune: images per step'),
    'learning_rate': (1e-3, 'finetune: peak AdamW learning rate (warmup 5%, then linear decay to 0)'),
    'seed': (0, 'seeds the random init, the batches and the held-out split'),
    'device': cli.DEVICE_OPTION,
}
CHOICES = {'init': ('pretrained', 'random'), 'dataset': ('', 'mnist', 'cifar10', 'folder'), 'mode': ('probe', 'finetune'),
           'device': cli.DEVICES}


def clean_features(model, imgs):
    """The clean path, as the sampler's commit runs it: every layer's output (B, N*Bl, D) for
    imgs (B, C, H, W) in [-1, 1], all N blocks clean and block-causal, identity modulation."""
    config, Bl = model.config, model.config.block_len
    pos = torch.arange(config.n_blocks * Bl, device=imgs.device)
    mask = acdit.scam_mask_mod(config.n_blocks + 1, Bl)(None, None, pos[:, None], pos[None, :])  # clean rows
    rotation = acdit.rope(config, pos)
    x = model.patch_embed(acdit.patchify(imgs, config))           # (B, N*Bl, D)
    no_cond = x.new_zeros(len(x), 0, config.width)                 # no noised blocks, so no condition
    layers = []
    for block in model.blocks:
        x = block(x, no_cond, config.n_blocks, rotation, mask)
        layers.append(x)
    return layers


def pooled(x, block_len):
    """A layer's tokens (B, N*Bl, D) -> (B, N*D): each block's mean, side by side. (It beat the mean
    over all tokens and over the last block's, an AR model's last token: RESULTS.md.)"""
    return x.unflatten(1, (-1, block_len)).mean(2).flatten(1)


@torch.no_grad()
def features(model, images, batch=500):
    """Pooled features of every layer, (n, depth, N*D), for uint8 images."""
    return torch.cat([torch.stack([pooled(x, model.config.block_len) for x in clean_features(model, data.to_float(b))], 1)
                      for b in images.split(batch)])


def linear_probe(train_f, train_y, test_f, test_y, n_classes, seed):
    """Test accuracy of a logistic regression on standardized features; its L2 weight is the best
    of three on a held-out tenth of the training set, then it is refit on all of it."""
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd

    def fit(x, y, l2):
        head = nn.Linear(x.shape[1], n_classes)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=100, history_size=20, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return head

    accuracy = lambda head, x, y: (head(x).argmax(1) == y).float().mean().item()
    held, rest = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(seed)).tensor_split([len(train_f) // 10])
    l2 = max((1e-4, 1e-3, 1e-2), key=lambda l2: accuracy(fit(train_f[rest], train_y[rest], l2), train_f[held], train_y[held]))
    return accuracy(fit(train_f, train_y, l2), test_f, test_y)


class Classifier(nn.Module):
    """The clean path, pooled after its last layer, then a norm and a linear head."""

    def __init__(self, model, n_classes):
        super().__init__()
        self.encoder, width = model, model.config.width * model.config.n_blocks
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_classes))

    def forward(self, imgs):
        return self.head(pooled(clean_features(self.encoder, imgs)[-1], self.encoder.config.block_len))


def finetune(classifier, args, train_x, train_y, test_x, test_y, hflip):
    """AdamW (weight decay 0.05) for args.cpu_minutes of this process's CPU time; the learning rate
    follows the budget spent (5% warmup, then linear to 0). Returns the final test accuracy."""
    opt = torch.optim.AdamW(classifier.parameters(), weight_decay=0.05)  # (the noised path's weights, unused, only decay)
    budget, spent, step = args.cpu_minutes * 60, 0.0, 0
    gen = torch.Generator().manual_seed(args.seed)
    while spent < budget:
        t0, progress = time.process_time(), spent / budget
        opt.param_groups[0]['lr'] = args.learning_rate * min(progress / 0.05, (1 - progress) / 0.95)
        x, y = data.get_batch(train_x, train_y, args.batch_size, gen, hflip)
        loss = F.cross_entropy(classifier(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        quarter, spent, step = int(4 * spent / budget), spent + time.process_time() - t0, step + 1
        if int(4 * spent / budget) > quarter:  # a test at each quarter of the budget, the last at its end
            with torch.no_grad():
                accuracy = sum((classifier(data.to_float(x)).argmax(1) == y).sum().item()
                               for x, y in zip(test_x.split(500), test_y.split(500))) / len(test_y)
            print(f'step {step} | {spent / 60:.1f} CPU min | train loss {loss.item():.3f} | test accuracy {accuracy:.4f}', flush=True)
    return accuracy


def main(argv=None):
    args = cli.parse_args(argv, __doc__, OPTIONS, CHOICES)
    for key in ('n_train', 'cpu_minutes', 'batch_size', 'learning_rate'):
        cli.check(getattr(args, key) > 0, f'{key}={getattr(args, key)} must be positive')
    dev = cli.pick_device(args.device)
    model, ckpt = cli.load_model(args.ckpt, 'ema', dev)
    config = model.config
    cli.check(config.n_frames == 1, f'{args.ckpt} is a video model; transfer reads images')
    dataset, data_dir = args.dataset or ckpt['args']['dataset'], args.data_dir or ckpt['args']['data_dir']
    size = (config.img_size, config.in_channels)  # a folder's images are read at this shape
    cli.check(dataset == 'folder' or data.DATASET_SHAPES.get(dataset) == size,
              f'{dataset} images are {data.DATASET_SHAPES.get(dataset)} (size, channels); {args.ckpt} reads {size}')
    train_x, train_y = data.load_dataset(dataset, data_dir, 'train', *size)
    test_x, test_y = data.load_dataset(dataset, data_dir, 'test', *size)
    torch.manual_seed(args.seed)
    model = acdit.ACDiT(config).to(dev) if args.init == 'random' else model   # random: the same config, new weights
    n_classes = int(train_y.max()) + 1
    print(f'{args.init} encoder: {config.depth} layers of width {config.width}, {config.n_blocks} blocks of '
          f'{config.block_len} tokens; {dataset}, {n_classes} classes')
    torch.manual_seed(args.seed)  # the head's initial weights: the same for either init
    if args.mode == 'probe':
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.n_train]
        train_x, train_y = train_x[pick], train_y[pick]               # a folder's files come sorted by class
        train_f, test_f = features(model, train_x.to(dev)), features(model, test_x.to(dev))
        probe = lambda a, b: linear_probe(a.cpu(), train_y, b.cpu(), test_y, n_classes, args.seed)
        for layer in range(config.depth):
            print(f'linear probe, layer {layer + 1}: test accuracy {probe(train_f[:, layer], test_f[:, layer]):.4f}', flush=True)
        print(f'linear probe, all layers: test accuracy {probe(train_f.flatten(1), test_f.flatten(1)):.4f}')
        print(f'linear probe, raw pixels: test accuracy {probe(train_x.flatten(1).float(), test_x.flatten(1).float()):.4f}')
    else:
        classifier = Classifier(model.float().train(), n_classes).to(dev)
        hflip = dataset in ('cifar10', 'folder')  # as train.py mirrors photos, not digits
        accuracy = finetune(classifier, args, train_x.to(dev), train_y.to(dev), test_x.to(dev), test_y.to(dev), hflip)
        print(f'fine-tuned ({args.init}, {args.cpu_minutes:g} CPU min): test accuracy {accuracy:.4f}')


if __name__ == '__main__':
    cli.run_cli(main)
