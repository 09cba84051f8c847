"""
The judge: a small CNN, independent of ACDiT, that reads the class of an image. It gives a model's samples a
class accuracy (how often it reads the class that was asked for) and an FID in its own penultimate features (lower
is better). evaluate.py and tradeoff.py use it. MNIST has its own judge; colour images (CIFAR-10, your own folders)
another. For Moving MNIST it reads every frame's digit, and `motion` measures how the digit moves.
"""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import acdit
import cli
import data


class Judge(nn.Module):
    """The MNIST judge: two conv layers and two linears, about 98% test accuracy after one epoch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x):                                        # (B, 1, 28, 28) in [-1, 1]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))                     # (B, 128)

    def forward(self, x):
        return self.fc2(self.features(x))


class PhotoJudge(nn.Module):
    """For colour images (CIFAR-10, a folder of your own): three stages of two 3x3 convolutions
    with batch norm, the size halved after each, then global average pooling and two linears."""

    def __init__(self, channels=3, n_classes=10, width=16):
        super().__init__()
        layers, c_in = [], channels
        for c in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.fc1 = nn.Linear(c_in, 128)
        self.fc2 = nn.Linear(128, n_classes)

    def features(self, x):                                        # (B, C, H, W) in [-1, 1]
        return F.relu(self.fc1(self.body(x).mean((2, 3))))         # (B, 128)

    def forward(self, x):
        return self.fc2(self.features(x))


PHOTO_EPOCHS = 8  # the photo judge's training: it then reads CIFAR-10's test set (JPEG copy) 0.79
DIGITS = ('mnist', 'moving_mnist')  # the datasets the MNIST judge reads (Moving MNIST: frame by frame)


def judged_split(dataset, data_dir, split, img_size=28, channels=1):
    """A split of the images the dataset's judge reads: MNIST's for the digits (of Moving MNIST too)."""
    return data.load_dataset('mnist' if dataset in DIGITS else dataset, data_dir, split, img_size, channels)


def get_judge(data_dir, path='auto', dataset='mnist', img_size=28, channels=1, n_classes=10):
    """The judge for a dataset's images (img_size x img_size, channels, n_classes), trained on first use (seeded)
    and cached at path ('auto': judge.pt for the digits, judge_<dataset or folder name>.pt else). Multithreaded CPU
    kernels make a retrained judge differ slightly: keep the file to compare numbers."""
    digits = dataset in DIGITS
    if path == 'auto':  # a folder's judge is named after the folder
        name = os.path.basename(os.path.abspath(data_dir)) if dataset == 'folder' else dataset
        path = 'judge.pt' if digits else f'judge_{name}.pt'
    torch.manual_seed(0)  # the initial weights too: every fresh judge starts the same
    judge = Judge() if digits else PhotoJudge(channels, n_classes)
    # a photo judge's file says what it read, so that it never judges other images
    trained_on = 'MNIST' if digits else f'{dataset} in {os.path.abspath(data_dir)}, {img_size}x{img_size}x{channels}'
    if os.path.exists(path):
        saved = cli.load_checkpoint(path)
        saved = saved if 'trained_on' in saved else {'trained_on': 'MNIST', 'weights': saved}
        cli.check(saved['trained_on'] == trained_on, f"{path} is a judge for {saved['trained_on']}, not for "
                                                     f"{trained_on}: pass --judge=another file (one is trained there)")
        try:
            judge.load_state_dict(saved['weights'])
        except RuntimeError:  # another model's weights (a train.py checkpoint, say)
            raise cli.ConfigError(f'{path} is not a judge for {trained_on}: pass --judge=another file') from None
        return judge.eval()
    print(f'training the judge classifier (once; cached as {path})', flush=True)
    x, y = judged_split(dataset, data_dir, 'train', img_size, channels)
    (train_mnist_judge if digits else train_photo_judge)(judge, x, y)
    cli.save_checkpoint(path, judge.state_dict() if digits else {'trained_on': trained_on, 'weights': judge.state_dict()})
    return judge.eval()


def train_mnist_judge(judge, x, y):
    """One epoch of Adam, batches of 128."""
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(128):
        loss = F.cross_entropy(judge(data.to_float(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_photo_judge(judge, x, y, batch=128):
    """PHOTO_EPOCHS of AdamW on a one-cycle learning rate; each batch mirrored in half its
    images and shifted by up to 2 pixels, so the judge reads objects, not their exact pixels."""
    gen, steps_per_epoch = torch.Generator().manual_seed(0), max(1, len(x) // batch)
    opt = torch.optim.AdamW(judge.parameters(), lr=4e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=PHOTO_EPOCHS * steps_per_epoch)
    judge.train()
    t0 = time.perf_counter()
    for epoch in range(PHOTO_EPOCHS):
        for _ in range(steps_per_epoch):
            xb, yb = data.get_batch(x, y, batch, gen, hflip=True)
            dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(F.pad(xb, (2, 2, 2, 2)), (dy, dx), (2, 3))[..., 2:-2, 2:-2]
            loss = F.cross_entropy(judge(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        print(f'  judge epoch {epoch + 1}/{PHOTO_EPOCHS}: loss {loss.item():.3f} '
              f'({time.perf_counter() - t0:.0f}s)', flush=True)


def frechet_distance(f1, f2):
    """FID between two feature sets (n, d): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    s1_half = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * cross).item()


@torch.no_grad()
def judge_images(judge, images, labels, test_x):
    """uint8 images (n, C, H, W) asked for as labels (n,) -> (accuracy, FID against test_x,
    confusion), confusion[i, j] counting images of class i that the judge read as j."""
    x = data.to_float(images)
    logits = judge(x)
    read, n = logits.argmax(1), logits.shape[1]
    confusion = torch.zeros(n, n, dtype=torch.long).index_put_((labels, read), torch.ones_like(read), accumulate=True)
    fid = frechet_distance(judge.features(x), judge.features(data.to_float(test_x)))
    return confusion.trace().item() / len(labels), fid, confusion


@torch.no_grad()
def sample_images(model, n_per_class, cfg_scale, steps, sampler, seed=0, batch=250, n_frames=None):
    """n_per_class uint8 samples of each class (as saved to a PNG; videos for a video model, of
    n_frames frames if given), their labels, and the seconds."""
    dev = next(model.parameters()).device
    labels = torch.arange(model.config.n_classes).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    imgs = torch.cat([acdit.sample(model, labels[i:i + batch].to(dev), cfg_scale=cfg_scale, sampler=sampler,
                                   steps=steps, generator=torch.Generator(dev).manual_seed(seed + i),
                                   n_frames=n_frames).cpu()
                      for i in range(0, len(labels), batch)])
    return data.to_uint8(imgs), labels, time.perf_counter() - t0


def misreadings(confusion, top=4):
    """The most frequent confusions as text, e.g. '5 read as 3: 13/100'."""
    off = confusion.clone().fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)  # ties: lower classes first
    per_class = confusion.sum(1)
    n = len(confusion)
    return ', '.join(f'{i // n} read as {i % n}: {c}/{per_class[i // n]}'
                     for c, i in zip(counts[:top].tolist(), flat[:top].tolist()) if c > 0) or 'none'


# -----------------------------------------------------------------------------
# video: the judge reads each frame's digit, and the digit's motion is measured

def center_of_mass(frames):
    """Pixels (..., H, W) -> the intensity-weighted (row, col) of each frame, (..., 2)."""
    f = frames.float()
    mass = f.sum((-2, -1)).clamp(min=1e-6)
    rows = (f.sum(-1) * torch.arange(f.shape[-2], device=f.device)).sum(-1) / mass
    cols = (f.sum(-2) * torch.arange(f.shape[-1], device=f.device)).sum(-1) / mass
    return torch.stack([rows, cols], dim=-1)


def frame_digits(videos, size=14):
    """uint8 videos (B, T, 1, H, W) -> every frame's digit as the judge reads digits: the
    size x size window around the frame's center of mass (where a Moving MNIST digit is),
    scaled up to 28x28. (B*T, 1, 28, 28) uint8, frame by frame."""
    frames = videos.flatten(0, 2)                                 # (B*T, H, W)
    H, W = frames.shape[-2:]
    com = center_of_mass(frames).round().long()
    top, left = (com[:, 0] - size // 2).clamp(0, H - size), (com[:, 1] - size // 2).clamp(0, W - size)
    rows, cols = top[:, None] + torch.arange(size), left[:, None] + torch.arange(size)
    crops = frames[torch.arange(len(frames))[:, None, None], rows[:, :, None], cols[:, None, :]]
    up = F.interpolate(crops[:, None].float(), size=(28, 28), mode='bilinear', align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def motion(videos):
    """How steadily the digit moves in uint8 videos (B, T >= 3, 1, H, W): the frame-to-frame
    displacement of its center of mass, |d_t| in pixels. Returns (mean speed, spread): the mean
    of |d_t| and the mean over videos of its standard deviation over t. A Moving MNIST digit
    keeps its speed except at bounces; a frozen digit has speed 0, a jittering one a large spread."""
    assert videos.shape[1] >= 3, "two displacements at least"
    com = center_of_mass(videos[:, :, 0])                         # (B, T, 2)
    speed = (com[:, 1:] - com[:, :-1]).norm(dim=-1)               # (B, T-1)
    return speed.mean().item(), speed.std(dim=1).mean().item()
