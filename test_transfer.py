"""transfer.py: the clean path as an encoder is causal block by block, equals the clean rows of
the training forward, fine-tunes, and refuses what it cannot read with one line."""
import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import acdit
import transfer
from cli import ConfigError
from data import DataError
from test_acdit import randomized
from test_data import write_folder
from test_generate import TRAIN_DEFAULTS, write_checkpoint

REPO = Path(__file__).resolve().parent
CONFIG = acdit.ACDiTConfig(img_size=8, in_channels=1, patch_size=2, block_h=1, block_w=4, depth=3,
                           width=16, n_heads=2, n_classes=3)   # 4 row blocks of 4 tokens


@pytest.mark.parametrize("bh, bw", [(1, 4), (2, 2), (1, 1)])
def test_a_blocks_features_ignore_every_later_block(bh, bw):
    config = dataclasses.replace(CONFIG, block_h=bh, block_w=bw)
    model, Bl = randomized(acdit.ACDiT(config)), config.block_len
    imgs = torch.rand(2, 1, 8, 8) * 2 - 1
    tokens = acdit.patchify(imgs, config)
    with torch.no_grad():
        before = transfer.clean_features(model, imgs)
        for i in range(config.n_blocks - 1):
            changed = tokens.clone()
            changed[:, (i + 1) * Bl:] = torch.randn_like(changed[:, (i + 1) * Bl:])   # blocks after i
            after = transfer.clean_features(model, acdit.unpatchify(changed, config))
            for a, b in zip(before, after):
                assert torch.equal(a[:, :(i + 1) * Bl], b[:, :(i + 1) * Bl]), i
                assert not torch.allclose(a[:, (i + 1) * Bl:], b[:, (i + 1) * Bl:], atol=1e-3), i  # later ones see it


def test_features_are_the_clean_rows_of_the_training_forward():
    """Each layer's output on the clean path equals the clean rows c_0..c_{N-2} of the SCAM
    training forward, caught with forward hooks, whatever the noised half holds."""
    model, N, Bl = randomized(acdit.ACDiT(CONFIG)), CONFIG.n_blocks, CONFIG.block_len
    imgs = torch.rand(3, 1, 8, 8) * 2 - 1
    x0 = acdit.patchify(imgs, CONFIG)
    caught = []
    hooks = [b.register_forward_hook(lambda mod, args, out: caught.append(out)) for b in model.blocks]
    with torch.no_grad():
        model(torch.randn_like(x0), torch.randint(0, 1000, (3, N)), torch.tensor([0, 1, 3]), clean=x0[:, :(N - 1) * Bl])
        for h in hooks:
            h.remove()
        features = transfer.clean_features(model, imgs)
    assert len(caught) == len(features) == CONFIG.depth
    for layer, (train_rows, f) in enumerate(zip(caught, features)):
        assert torch.allclose(train_rows[:, :(N - 1) * Bl], f[:, :(N - 1) * Bl], atol=1e-5), layer
    assert features[-1].abs().mean() > 0.1


def test_fine_tuning_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    classifier = transfer.Classifier(randomized(acdit.ACDiT(CONFIG)).train(), 3)
    imgs, labels = torch.rand(12, 1, 8, 8) * 2 - 1, torch.arange(12) % 3
    opt = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(classifier(imgs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_fine_tuning_trains_every_weight_of_the_clean_path_and_head():
    classifier = transfer.Classifier(randomized(acdit.ACDiT(CONFIG)).train(), 3)
    before = {n: p.clone() for n, p in classifier.named_parameters()}
    args = types.SimpleNamespace(learning_rate=1e-2, cpu_minutes=0.003, batch_size=8, seed=0)
    imgs, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 3
    transfer.finetune(classifier, args, imgs, labels, imgs, labels, hflip=False)
    on_path = [n for n, p in classifier.named_parameters() if not any(k in n for k in ('adaLN', 'final', 't_embed', 'y_embed'))]
    assert len(on_path) == 2 + 10 * CONFIG.depth + 4   # patch embedding; per layer qkv, proj, q/k norms, mlp; head
    for name in on_path:
        assert not torch.equal(dict(classifier.named_parameters())[name], before[name]), name


def test_pooling_is_each_blocks_mean_side_by_side():
    x = torch.arange(2 * 8 * 3, dtype=torch.float).view(2, 8, 3)   # 2 blocks of 4 tokens
    assert torch.equal(transfer.pooled(x, 4), torch.cat([x[:, :4].mean(1), x[:, 4:].mean(1)], 1))


def checkpoint(path, config, dataset='folder'):
    """A train.py checkpoint of config whose run read dataset from a folder that is not there."""
    return write_checkpoint(path, dict(TRAIN_DEFAULTS, dataset=dataset, data_dir=str(path.parent / 'nowhere')), config)


def test_probe_and_fine_tune_run_on_a_folder(tmp_path, capsys):
    ckpt, folder = checkpoint(tmp_path / 'ckpt.pt', CONFIG), tmp_path / 'pics'
    for split in ('train', 'test'):  # 16x16 RGB, read at the model's shape: 8x8, gray
        write_folder(folder / split, ['ant', 'bee'], n=4, size=(16, 16), mode='RGB')
    transfer.main([f'--ckpt={ckpt}', f'--data_dir={folder}', '--n_train=100'])
    out = capsys.readouterr().out
    assert out.count('linear probe, layer') == CONFIG.depth and 'all layers' in out and 'raw pixels' in out
    transfer.main([f'--ckpt={ckpt}', f'--data_dir={folder}', '--mode=finetune', '--init=random',
                   '--cpu_minutes=0.002', '--batch_size=4'])
    assert 'fine-tuned (random' in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path):
    """A dataset of another shape, a video model, an impossible option: one line naming it."""
    ckpt = checkpoint(tmp_path / 'ckpt.pt', CONFIG)
    video = checkpoint(tmp_path / 'video.pt', dataclasses.replace(CONFIG, n_frames=2, block_h=4, block_w=4), 'moving_mnist')
    cases = {  # arguments -> what the line must name
        (f'--ckpt={ckpt}', '--dataset=mnist'): 'reads',            # 28x28 digits for an 8x8 model
        (f'--ckpt={ckpt}', f'--data_dir={tmp_path / "nowhere"}'): 'nowhere',
        (f'--ckpt={video}',): 'video model',
        (f'--ckpt={ckpt}', '--batch_size=0'): 'batch_size',
        (f'--ckpt={ckpt}', '--cpu_minutes=0'): 'cpu_minutes',
        (f'--ckpt={tmp_path / "missing.pt"}',): 'missing.pt',
    }
    for case, name in cases.items():
        with pytest.raises((ConfigError, DataError)) as e:
            transfer.main(list(case))
        assert name in str(e.value) and '\n' not in str(e.value), (case, str(e.value))
    # and from the command line: that line on stderr, exit status 2
    p = subprocess.run([sys.executable, 'transfer.py', f'--ckpt={video}'], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith('error: ') and len(p.stderr.strip().splitlines()) == 1, p.stderr
