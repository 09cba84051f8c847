"""Proofs that the pieces of acdit.py agree with each other and with the definitions.

Each reference here is written independently from the paper's definition (plain loops),
not by calling the code under test. Equivalence tests randomize *all* weights first:
adaLN-Zero init makes a fresh model output exactly zero, which would pass trivially.
"""
import itertools
import math

import pytest
import torch

import acdit
from acdit import ACDiT, ACDiTConfig, KVCache, dense_scam_mask, patchify, unpatchify


def tiny_config(**kw):
    base = dict(img_size=8, in_channels=1, patch_size=2, block_h=1, block_w=4,
                depth=2, width=16, n_heads=2, n_classes=3)
    base.update(kw)
    return ACDiTConfig(**base)


def randomized(model, seed=0, dtype=torch.float32):
    """Give every parameter a random value so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def reference_scam(n_blocks, block_len):
    """SCAM from its definition, one (query, key) pair at a time."""
    tokens = [("clean", b) for b in range(n_blocks - 1) for _ in range(block_len)] + \
             [("noised", b) for b in range(n_blocks) for _ in range(block_len)]
    L = len(tokens)
    m = torch.zeros(L, L, dtype=torch.bool)
    for qi, (qk, qb) in enumerate(tokens):
        for ki, (kk, kb) in enumerate(tokens):
            if qk == "clean" and kk == "clean":
                m[qi, ki] = kb <= qb
            elif qk == "noised" and kk == "clean":
                m[qi, ki] = kb < qb
            elif qk == "noised" and kk == "noised":
                m[qi, ki] = kb == qb
    return m


# --- config --------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(patch_size=3), ["patch_size=3", "img_size=8"]),
    (dict(block_w=3), ["block 1x3", "4x4"]),
    (dict(width=18, n_heads=4), ["width=18", "n_heads=4"]),
    (dict(width=12, n_heads=2), ["head dim", "6"]),
    (dict(attn_backend="cuda"), ["attn_backend='cuda'"]),
    (dict(depth=0), ["depth=0"]),
    (dict(label_dropout=1.0), ["label_dropout=1.0"]),
    (dict(rope_base=1.0), ["rope_base=1.0"]),
    (dict(min_snr_gamma=-1.0), ["min_snr_gamma=-1.0"]),
])
def test_bad_config_names_the_values(kw, words):
    with pytest.raises(ValueError) as e:
        tiny_config(**kw)
    for w in words:
        assert w in str(e.value)


def test_derived_sizes():
    cfg = ACDiTConfig()  # the MNIST default: 28px, patch 4 -> 7x7 grid, 7 row strips
    assert (cfg.grid, cfg.n_blocks, cfg.block_len, cfg.patch_dim) == (7, 7, 7, 16)
    assert cfg.seq_len == 13 * 7


# --- patchify ------------------------------------------------------------------------

@pytest.mark.parametrize("bh, bw", [(1, 1), (1, 4), (2, 2), (4, 1), (2, 4), (4, 4)])
def test_patchify_round_trip_and_block_major_order(bh, bw):
    cfg = tiny_config(in_channels=3, block_h=bh, block_w=bw)
    imgs = torch.randn(2, 3, 8, 8)
    tokens = patchify(imgs, cfg)
    assert tokens.shape == (2, cfg.n_blocks * cfg.block_len, 2 * 2 * 3)
    assert torch.equal(unpatchify(tokens, cfg), imgs)
    # independent order: blocks in raster order, patches in raster order inside each block
    p, g = cfg.patch_size, cfg.grid
    i = 0
    for by, bx in itertools.product(range(g // bh), range(g // bw)):
        for r, c in itertools.product(range(bh), range(bw)):
            row, col = by * bh + r, bx * bw + c
            patch = imgs[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (B, C, p, p)
            assert torch.equal(tokens[:, i], patch.permute(0, 2, 3, 1).reshape(2, -1))
            i += 1


# --- SCAM ----------------------------------------------------------------------------

MASK_SHAPES = [(1, 1), (1, 5), (2, 1), (2, 3), (3, 7), (4, 4), (5, 1), (7, 7), (6, 13), (16, 9)]


@pytest.mark.parametrize("n_blocks, block_len", MASK_SHAPES)
def test_dense_mask_matches_definition(n_blocks, block_len):
    m = dense_scam_mask(n_blocks, block_len)
    assert m.dtype == torch.bool and m.shape == ((2 * n_blocks - 1) * block_len,) * 2
    assert torch.equal(m, reference_scam(n_blocks, block_len))


@pytest.mark.parametrize("n_blocks, block_len", [(4, 3), (7, 7), (1, 6)])
def test_mask_structure(n_blocks, block_len):
    m = dense_scam_mask(n_blocks, block_len)
    nc = (n_blocks - 1) * block_len
    assert not m[:nc, nc:].any(), "clean tokens must never see noised tokens"
    for i in range(n_blocks):
        rows = m[nc + i * block_len: nc + (i + 1) * block_len]
        seen_clean = rows[:, :nc]
        seen_noised = rows[:, nc:]
        assert seen_clean[:, :i * block_len].all() and not seen_clean[:, i * block_len:].any()
        own = torch.zeros(n_blocks * block_len, dtype=torch.bool)
        own[i * block_len:(i + 1) * block_len] = True
        assert torch.equal(seen_noised, own.expand_as(seen_noised))
    # n_0 sees only itself
    assert m[nc:nc + block_len].sum() == block_len * block_len


def test_print_scam_staircase(capsys):
    acdit.print_scam(3)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["c0", "c1", "n0", "n1", "n2"]
    rows = {line.split()[0]: "".join(line.split()[1:]) for line in out[1:]}
    assert rows == {"c0": "#....", "c1": "##...", "n0": "..#..", "n1": "#..#.", "n2": "##..#"}


@pytest.mark.parametrize("n_blocks, block_len", MASK_SHAPES + [(9, 17), (3, 64)])
def test_flex_mask_equals_dense_at_token_level(n_blocks, block_len):
    from torch.nn.attention.flex_attention import create_mask
    L = (2 * n_blocks - 1) * block_len
    mod = acdit.scam_mask_mod(n_blocks, block_len)
    flex = create_mask(mod, None, None, L, L, device="cpu")[0, 0]
    assert torch.equal(flex, reference_scam(n_blocks, block_len))
    bm = acdit.flex_scam_mask(n_blocks, block_len, device="cpu")
    assert bm.shape[-2:] == (L, L)


@pytest.mark.parametrize("n_blocks, block_len", [(4, 5), (7, 7), (5, 33), (1, 9)])
def test_flex_attention_equals_sdpa_with_dense_mask(n_blocks, block_len):
    # lengths 35, 91, 297, 9: none a multiple of FlexAttention's 128 tile
    L = (2 * n_blocks - 1) * block_len
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out_flex = acdit.attend(q, k, v, acdit.flex_scam_mask(n_blocks, block_len, "cpu"))
    # independent reference: softmax over allowed keys only
    allowed = reference_scam(n_blocks, block_len)
    scores = (q @ k.transpose(-1, -2)) / 16 ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = scores.softmax(-1) @ v
    assert torch.allclose(out_flex, ref, atol=1e-5)
    assert torch.allclose(acdit.attend(q, k, v, dense_scam_mask(n_blocks, block_len)), ref, atol=1e-5)


def test_model_forward_agrees_between_backends():
    cfg_f, cfg_s = tiny_config(attn_backend="flex"), tiny_config(attn_backend="sdpa")
    mf, ms = randomized(ACDiT(cfg_f)), randomized(ACDiT(cfg_s))
    x0 = torch.randn(3, cfg_s.n_blocks * cfg_s.block_len, cfg_s.patch_dim)
    xt = torch.randn_like(x0)
    t = torch.randint(0, 1000, (3, cfg_s.n_blocks))
    y = torch.tensor([0, 1, 3])
    clean = x0[:, :(cfg_s.n_blocks - 1) * cfg_s.block_len]
    with torch.no_grad():
        a, b = mf(xt, t, y, clean=clean), ms(xt, t, y, clean=clean)
    assert a.abs().mean() > 0.1
    assert torch.allclose(a, b, atol=1e-4)


def test_flex_refuses_to_train_on_cpu():
    m = ACDiT(tiny_config(attn_backend="flex")).train()
    with pytest.raises(RuntimeError, match="no backward"):
        m.training_loss(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))


def test_auto_backend_is_sdpa_on_cpu():
    assert ACDiT(tiny_config()).backend(torch.device("cpu")) == "sdpa"


# --- the model -----------------------------------------------------------------------

def test_rope_scores_depend_only_on_2d_offset():
    cfg = ACDiTConfig(img_size=8, patch_size=1, block_h=2, block_w=4, width=32, n_heads=2)
    rope = acdit.RoPE(cfg)
    coords = acdit.token_coords(cfg)
    where = {tuple(rc): i for i, rc in enumerate(coords.tolist())}
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(a, b):  # rotated q at patch a . rotated k at patch b
        qa = acdit.apply_rope(q, *rope(torch.tensor([where[a]])))
        kb = acdit.apply_rope(k, *rope(torch.tensor([where[b]])))
        return (qa * kb).sum()

    assert torch.allclose(score((1, 2), (3, 5)), score((4, 0), (6, 3)), atol=1e-5)
    assert torch.allclose(score((0, 0), (0, 0)), score((7, 7), (7, 7)), atol=1e-5)
    assert not torch.allclose(score((1, 2), (3, 5)), score((1, 2), (5, 3)), atol=1e-3)


def test_fresh_model_is_adaln_zero():
    m = ACDiT(tiny_config())
    x = torch.randn(2, 16, 4)
    out = m(x, torch.randint(0, 1000, (2, 4)), torch.tensor([0, 1]), clean=x[:, :12])
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_scam_dependencies_through_the_whole_model(kind):
    """Who influences whom in the training forward, read off gradients of the output; for
    video, clean frame j reaches noised frames > j only and noised frame i only itself."""
    cfg = tiny_config() if kind == "image" else video_config()
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    N, Bl = cfg.n_blocks, cfg.block_len
    assert torch.equal(dense_scam_mask(N, Bl), reference_scam(N, Bl))
    clean = torch.randn(1, (N - 1) * Bl, cfg.patch_dim, dtype=torch.float64, requires_grad=True)
    noised = torch.randn(1, N * Bl, cfg.patch_dim, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1000, (1, N))
    for i in range(N):
        out = m(noised, t, torch.tensor([1]), clean=clean)
        gc, gn = torch.autograd.grad(out[0, i * Bl:(i + 1) * Bl].sum(), [clean, noised])
        gc, gn = gc.abs().sum(-1)[0], gn.abs().sum(-1)[0]   # per token
        for j in range(N - 1):
            assert (gc[j * Bl:(j + 1) * Bl] > 0).all() == (j < i), (i, j)
            assert (gc[j * Bl:(j + 1) * Bl] == 0).all() == (j >= i), (i, j)
        for j in range(N):
            assert (gn[j * Bl:(j + 1) * Bl] > 0).all() == (j == i), (i, j)


def test_one_block_is_a_plain_dit():
    cfg = tiny_config(block_h=4, block_w=4)  # the whole 4x4 grid in one block
    assert cfg.n_blocks == 1 and cfg.seq_len == 16
    assert dense_scam_mask(1, 16).all()       # full attention, no clean tokens
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    x = torch.randn(1, 16, cfg.patch_dim, dtype=torch.float64, requires_grad=True)
    out = m(x, torch.tensor([[500]]), torch.tensor([2]))
    g = torch.autograd.grad(out[0, 0].sum(), x)[0].abs().sum(-1)[0]
    assert (g > 0).all(), "every token sees every other token"
    # and the sampler has nothing to cache
    imgs = acdit.sample(m, [0, 1], steps=3, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("bh, bw", [(1, 4), (2, 2), (1, 1)])
def test_training_forward_equals_block_by_block_inference(bh, bw):
    """The one SCAM forward used in training predicts, for every block, the same eps as
    inference does block by block with the KV cache of the earlier clean blocks."""
    cfg = tiny_config(block_h=bh, block_w=bw)
    m = randomized(ACDiT(cfg))
    N, Bl = cfg.n_blocks, cfg.block_len
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, N * Bl, cfg.patch_dim, generator=g)
    t = torch.randint(0, 1000, (2, N), generator=g)
    xt = m.schedule.add_noise(x0, t, torch.randn(x0.shape, generator=g))
    y = torch.tensor([2, 0])
    with torch.no_grad():
        train_eps = m(xt, t, y, clean=x0[:, :(N - 1) * Bl])
        cache = KVCache(cfg)
        for i in range(N):
            blk = slice(i * Bl, (i + 1) * Bl)
            eps_i = m(xt[:, blk], t[:, i:i + 1], y, cache=cache)
            assert torch.allclose(eps_i, train_eps[:, blk], atol=1e-4), f"block {i}"
            if i < N - 1:
                m.commit(x0[:, blk], cache)
    assert train_eps.abs().mean() > 0.1


def test_kv_cache_holds_roped_qk_normed_keys():
    """The cache holds exactly the keys/values of the clean tokens computed from scratch."""
    cfg = tiny_config()
    m = randomized(ACDiT(cfg))
    Bl = cfg.block_len
    x0 = torch.randn(1, 3 * Bl, cfg.patch_dim)
    cache = KVCache(cfg)
    with torch.no_grad():
        for i in range(3):
            m.commit(x0[:, i * Bl:(i + 1) * Bl], cache)
        # from scratch, layer 0: keys of 3 clean blocks are a function of their own tokens only
        attn = m.blocks[0].attn
        h = m.blocks[0].norm1(m.patch_embed(x0))
        q, k, v = attn.qkv(h).view(1, 3 * Bl, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        k = acdit.apply_rope(attn.k_norm(k), *m.rope(torch.arange(3 * Bl)))
    assert cache.n_blocks == 3
    assert torch.allclose(cache.k[0][:, :, :3 * Bl], k, atol=1e-5)
    assert torch.allclose(cache.v[0][:, :, :3 * Bl], v, atol=1e-5)
    # buffers for the whole image (N = 4 blocks), allocated once: 1 row, k and v, float32
    assert cache.nbytes() == 2 * cfg.depth * cfg.n_blocks * Bl * cfg.width * 4


# --- DDPM ----------------------------------------------------------------------------

def test_schedule_and_noising_per_block():
    s = acdit.DDPMSchedule(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = 1.0
    for t in (0, 1, 500, 999):
        ab = torch.prod(1 - betas[:t + 1])
        assert torch.isclose(s.alpha_bar(t, torch.zeros(1, dtype=torch.float64)), ab)
    x0, noise = torch.randn(1, 8, 3, dtype=torch.float64), torch.randn(1, 8, 3, dtype=torch.float64)
    t = torch.tensor([[0, 999]])
    xt = s.add_noise(x0, t, noise)
    a0, a1 = (torch.prod(1 - betas[:1]), torch.prod(1 - betas))
    assert torch.allclose(xt[:, :4], a0.sqrt() * x0[:, :4] + (1 - a0).sqrt() * noise[:, :4])
    assert torch.allclose(xt[:, 4:], a1.sqrt() * x0[:, 4:] + (1 - a1).sqrt() * noise[:, 4:])


@pytest.mark.parametrize("gamma", [0.0, 1.0, 5.0])
def test_training_loss_is_the_per_block_weighted_eps_mse(gamma, monkeypatch):
    """The loss is the mean over blocks of w(t_block) * the block's eps-MSE, where w = 1
    (the paper) or min(SNR, gamma) / SNR (Min-SNR-gamma), SNR = alpha-bar / (1 - alpha-bar).
    Recomputed here, one block at a time, from the timesteps and noise the loss drew and the
    eps the network predicted; weighted=False is the plain eps-MSE for any gamma."""
    cfg = tiny_config(min_snr_gamma=gamma, label_dropout=0.0)
    model = randomized(ACDiT(cfg)).train()
    drawn, predicted = {}, []
    add_noise = model.schedule.add_noise
    monkeypatch.setattr(model.schedule, "add_noise",
                        lambda x0, t, noise: drawn.update(t=t, noise=noise) or add_noise(x0, t, noise))
    model.register_forward_hook(lambda mod, args, out: predicted.append(out))
    imgs, labels = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)

    def by_definition(weighted):
        eps, noise, t = predicted[-1].detach(), drawn["noise"], drawn["t"]
        total = 0.0
        for b in range(imgs.shape[0]):
            for n in range(cfg.n_blocks):
                ab = torch.prod(1 - betas[:t[b, n] + 1]).item()
                snr = ab / (1 - ab)
                w = min(snr, gamma) / snr if (weighted and gamma > 0) else 1.0
                blk = slice(n * cfg.block_len, (n + 1) * cfg.block_len)
                total += w * (eps[b, blk] - noise[b, blk]).pow(2).mean().item()
        return total / (imgs.shape[0] * cfg.n_blocks)

    torch.manual_seed(0)
    loss = model.training_loss(imgs, labels).item()
    weighted_ref, plain_ref = by_definition(True), by_definition(False)
    assert abs(loss - weighted_ref) < 1e-5 * weighted_ref
    torch.manual_seed(0)  # the same draws again
    plain = model.training_loss(imgs, labels, weighted=False).item()
    assert abs(plain - plain_ref) < 1e-5 * plain_ref
    if gamma > 0:  # some blocks drew a nearly clean t, whose weight is below 1
        assert (drawn["t"] < 100).any() and loss < plain


def test_ddpm_step_is_the_posterior():
    """With every timestep, eta=1 is DDPM's ancestral step: posterior mean + beta-tilde noise."""
    s = acdit.DDPMSchedule(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas, ab = 1 - betas, torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randn(4, 5, dtype=torch.float64, generator=g)
    t = 600
    x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
    mean = (ab[t - 1].sqrt() * betas[t] / (1 - ab[t])) * x0 + \
        (alphas[t].sqrt() * (1 - ab[t - 1]) / (1 - ab[t])) * x
    var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
    z = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out, _ = s.step(x, eps, t, t - 1, eta=1.0, generator=torch.Generator().manual_seed(9), clip_x0=False)
    assert torch.allclose(out, mean + var.sqrt() * z)
    # eta=0 is deterministic DDIM
    out0, _ = s.step(x, eps, t, t - 1, eta=0.0, clip_x0=False)
    assert torch.allclose(out0, ab[t - 1].sqrt() * x0 + (1 - ab[t - 1]).sqrt() * eps)


def test_sampling_timesteps():
    s = acdit.DDPMSchedule(1000)
    assert s.sampling_timesteps(1) == [999]
    ts = s.sampling_timesteps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 50 and ts == sorted(ts, reverse=True)
    assert s.sampling_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps=0"):
        s.sampling_timesteps(0)


def test_dpm_solver_first_order_is_the_ddim_step():
    """Without a previous prediction DPM-Solver++ is first order, and that is exactly DDIM:
    x_prev = (sigma_prev / sigma) x - alpha_prev (e^-h - 1) x0, written out in log-SNR."""
    s = acdit.DDPMSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 7, dtype=torch.float64, generator=g), torch.randn(3, 7, dtype=torch.float64, generator=g)
    for t, t_prev in ((999, 900), (500, 480), (40, 0)):
        ab, ab_prev = s.alpha_bar_table[t + 1], s.alpha_bar_table[t_prev + 1]
        a, sig, a_p, sig_p = ab.sqrt(), (1 - ab).sqrt(), ab_prev.sqrt(), (1 - ab_prev).sqrt()
        x0 = (x - sig * eps) / a
        h = torch.log(a_p / sig_p) - torch.log(a / sig)
        expected = (sig_p / sig) * x - a_p * (torch.exp(-h) - 1) * x0
        out, _ = s.step(x, eps, t, t_prev, eta=0.0, clip_x0=False)
        assert torch.allclose(out, expected)


def test_dpm_solver_is_second_order_on_gaussian_data():
    """For data N(mu, sd^2) the exact eps(x_t, t) and the probability-flow ODE's solution are
    known in closed form. Doubling the steps halves DDIM's error (first order) and quarters
    DPM-Solver++(2M)'s (second order), once the steps are fine enough."""
    s = acdit.DDPMSchedule(1000)
    mu, sd = 0.3, 0.5
    z = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def coef(t):
        ab = s.alpha_bar_table[t + 1]
        return ab.sqrt(), (1 - ab).sqrt()

    def exact_eps(x, t):  # E[x0 | x_t] of a Gaussian, turned into eps
        a, sig = coef(t)
        mean_x0 = mu + a * sd ** 2 / (a ** 2 * sd ** 2 + sig ** 2) * (x - a * mu)
        return (x - a * mean_x0) / sig

    def ode_x(t):  # the ODE maps the Gaussian marginals onto each other linearly
        a, sig = coef(t)
        return a * mu + (a ** 2 * sd ** 2 + sig ** 2).sqrt() * z

    def error(sampler, steps):
        ts = s.sampling_timesteps(steps)
        x, prev = ode_x(ts[0]), None
        for t, t_prev in zip(ts, ts[1:]):  # stop at t = 0, where the ODE solution is known
            x, x0 = s.step(x, exact_eps(x, t), t, t_prev, clip_x0=False, prev=prev)
            prev = (t, x0) if sampler == "dpm++" else None
        return (x - ode_x(ts[-1])).abs().max().item()

    ddim = [error("ddim", n) for n in (20, 40, 80)]
    dpm = [error("dpm++", n) for n in (20, 40, 80)]
    assert 1.8 < ddim[0] / ddim[1] < 2.2 and 1.8 < ddim[1] / ddim[2] < 2.2
    assert dpm[1] / dpm[2] > 3.3 and dpm[2] < ddim[2] / 1.5


# --- sampling ------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, cfg_scale", [("ddim", 2.0), ("ddpm", 2.0), ("ddpm", 1.0), ("dpm++", 2.0)])
def test_cached_sampling_equals_uncached(sampler, cfg_scale):
    cfg = tiny_config(block_h=2, block_w=2)  # 4 square blocks
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    kw = dict(cfg_scale=cfg_scale, sampler=sampler, steps=6)
    a = acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    b = acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    c = acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(6), use_cache=True, **kw)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float64
    assert torch.allclose(a, b, atol=1e-9)
    assert not torch.allclose(a, c, atol=1e-3)  # the seed matters


def test_one_pass_prefill_builds_the_cache_of_one_block_commits():
    """commit() of K blocks at once (block-causal among them: SCAM's clean rows) leaves
    exactly the keys/values that committing them one at a time leaves."""
    cfg = tiny_config(block_h=2, block_w=2)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    Bl, K = cfg.block_len, cfg.n_blocks - 1
    x0 = torch.randn(2, K * Bl, cfg.patch_dim, dtype=torch.float64)
    one, each = KVCache(cfg), KVCache(cfg)
    m.commit(x0, one)
    for i in range(K):
        m.commit(x0[:, i * Bl:(i + 1) * Bl], each)
    assert one.n_blocks == each.n_blocks == K
    for layer in range(cfg.depth):
        for a, b in ((one.k[layer], each.k[layer]), (one.v[layer], each.v[layer])):
            assert torch.allclose(a[:, :, :K * Bl], b[:, :, :K * Bl], atol=1e-12)
    # and a later block's commit on top of a 2-block prefill agrees too
    two = KVCache(cfg)
    m.commit(x0[:, :2 * Bl], two)
    m.commit(x0[:, 2 * Bl:], two)
    assert torch.allclose(two.k[1][:, :, :K * Bl], each.k[1][:, :, :K * Bl], atol=1e-12)


def test_cache_halves_agree_under_guidance():
    """The clean stream carries no label: committed under CFG, both halves hold the same K/V."""
    cfg = tiny_config()
    m = randomized(ACDiT(cfg))
    x = torch.randn(3, 2 * cfg.block_len, cfg.patch_dim)
    cache = KVCache(cfg)
    m.commit(torch.cat([x, x]), cache)
    k = cache.k[-1][:, :, :2 * cfg.block_len]
    assert torch.equal(k[:3], k[3:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_prefix_completion_keeps_the_given_blocks(use_cache):
    cfg = tiny_config(block_h=2, block_w=2)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    imgs = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    K, Bl = 2, cfg.block_len
    prefix = patchify(imgs, cfg)[:, :K * Bl]
    kw = dict(steps=4, sampler="ddpm", use_cache=use_cache)
    out = acdit.sample(m, [0, 1], prefix=prefix, generator=torch.Generator().manual_seed(1), **kw)
    tokens = patchify(out, cfg)
    assert torch.equal(tokens[:, :K * Bl], prefix)          # bit-identical
    assert not torch.allclose(tokens[:, K * Bl:], patchify(imgs, cfg)[:, K * Bl:], atol=1e-2)
    ref = acdit.sample(m, [0, 1], prefix=prefix, generator=torch.Generator().manual_seed(1),
                       **dict(kw, use_cache=not use_cache))
    assert torch.allclose(out, ref, atol=1e-9)               # cached == uncached with a prefix
    # K = 0 is ordinary sampling with the same seed
    empty = prefix[:, :0]
    a = acdit.sample(m, [0, 1], prefix=empty, generator=torch.Generator().manual_seed(1), **kw)
    b = acdit.sample(m, [0, 1], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prefix"):
        acdit.sample(m, [0, 1], prefix=patchify(imgs, cfg), steps=2)  # all N blocks given


def test_sample_callback_sees_every_step():
    cfg = tiny_config()
    m = randomized(ACDiT(cfg))
    seen = []
    acdit.sample(m, [1], steps=3, callback=lambda i, s, clean, x, x0: seen.append((i, s, clean.shape[1], x.shape)))
    assert [(i, s) for i, s, _, _ in seen] == [(i, s) for i in range(4) for s in range(3)]
    assert all(n == i * cfg.block_len and shape == (1, 4, 4) for i, _, n, shape in seen)


def test_sample_rejects_bad_arguments():
    m = ACDiT(tiny_config())
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        acdit.sample(m, [3])
    with pytest.raises(ValueError, match="sampler="):
        acdit.sample(m, [0], sampler="euler")
    with pytest.raises(ValueError, match="steps=0"):
        acdit.sample(m, [0], steps=0)


def test_half_precision_model_samples_finite_images():
    # alpha-bar rounds to 1.0 in bf16 near t = 0; the trajectory must stay in float32
    m = randomized(ACDiT(tiny_config())).to(torch.bfloat16)
    imgs = acdit.sample(m, [0, 1], steps=4, generator=torch.Generator().manual_seed(0))
    assert imgs.dtype == torch.float32 and torch.isfinite(imgs).all()


def test_forward_rejects_impossible_layouts():
    cfg = tiny_config()
    m = ACDiT(cfg)
    Bl, P, N = cfg.block_len, cfg.patch_dim, cfg.n_blocks
    cache = KVCache(cfg)
    m.commit(torch.randn(1, Bl, P), cache)
    y = torch.tensor([0])
    with pytest.raises(ValueError, match="sampling with a cache: one block"):
        m(torch.randn(1, 2 * Bl, P), torch.zeros(1, 2, dtype=torch.long), y, cache=cache)
    with pytest.raises(ValueError, match="training: all N blocks"):
        m(torch.randn(1, 2 * Bl, P), torch.zeros(1, 2, dtype=torch.long), y)
    with pytest.raises(ValueError, match="one timestep per noised block"):
        m(torch.randn(1, N * Bl, P), torch.zeros(1, 2, dtype=torch.long), y, clean=torch.randn(1, (N - 1) * Bl, P))
    with pytest.raises(ValueError, match="training needs the clean blocks"):
        m(torch.randn(1, N * Bl, P), torch.zeros(1, N, dtype=torch.long), y, clean=torch.randn(1, Bl, P))
    with pytest.raises(ValueError, match="last block is never committed"):
        m.commit(torch.randn(1, (N - 1) * Bl, P), cache)  # 1 + (N-1) blocks: all N
    with pytest.raises(ValueError, match="whole blocks"):
        m.commit(torch.randn(1, Bl + 1, P), KVCache(cfg))


# --- training ------------------------------------------------------------------------

def test_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config(width=32, n_heads=2, depth=2)
    m = ACDiT(cfg)
    imgs = torch.rand(16, 1, 8, 8) * 2 - 1
    imgs[:, :, :4] = -1  # some structure: top half dark
    labels = torch.arange(16) % 3

    def eval_loss():  # fixed t, noise and label dropout
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad():
                return sum(m.training_loss(imgs, labels).item() for _ in range(8)) / 8

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        loss = m.training_loss(imgs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 0.9  # adaLN-Zero: starts predicting eps = 0
    assert after < 0.5 * before, (before, after)


# --- CUDA only -----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (compiled FlexAttention)")


@cuda
def test_cuda_compiled_flex_forward_and_grads_equal_sdpa():
    torch.manual_seed(0)
    cfg = ACDiTConfig(depth=2, width=64, n_heads=2)
    mf = randomized(ACDiT(ACDiTConfig(**{**cfg.__dict__, "attn_backend": "flex"}))).cuda().train()
    ms = randomized(ACDiT(ACDiTConfig(**{**cfg.__dict__, "attn_backend": "sdpa"}))).cuda().train()
    imgs = torch.rand(8, 1, 28, 28, device="cuda") * 2 - 1
    labels = torch.arange(8, device="cuda") % 10
    losses = []
    for m in (mf, ms):
        torch.manual_seed(1)
        loss = m.training_loss(imgs, labels)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (n, pf), ps in zip(mf.named_parameters(), ms.parameters()):
        assert torch.allclose(pf.grad, ps.grad, rtol=1e-3, atol=1e-5), n


@cuda
def test_cuda_whole_model_compiled_with_flex_under_bf16_autocast():
    # what train.py --compile=True does on a GPU: torch.compile around the flex training forward
    cfg = ACDiTConfig(depth=2, width=64, n_heads=2)
    mf = randomized(ACDiT(ACDiTConfig(**{**cfg.__dict__, "attn_backend": "flex"}))).cuda().train()
    ms = randomized(ACDiT(ACDiTConfig(**{**cfg.__dict__, "attn_backend": "sdpa"}))).cuda().train()
    imgs = torch.rand(8, 1, 28, 28, device="cuda") * 2 - 1
    labels = torch.arange(8, device="cuda") % 10
    compiled = torch.compile(mf.training_loss)
    losses = []
    for f in (compiled, ms.training_loss):
        torch.manual_seed(2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(f(imgs, labels))
    losses[0].backward()
    assert torch.isfinite(losses[0]) and torch.allclose(losses[0], losses[1].float(), rtol=2e-2, atol=2e-3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mf.parameters())


def test_guidance_interval():
    """cfg_interval=(lo, hi) guides only the steps with lo <= t <= hi: all of them is plain
    guidance, none of them is cfg_scale=1 (conditional alone), and cached == uncached."""
    cfg = tiny_config(block_h=2, block_w=2)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    kw = dict(steps=5, sampler="ddpm")

    def run(**more):
        return acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(3), **kw, **more)

    assert torch.allclose(run(cfg_scale=2.0, cfg_interval=(0, 999)), run(cfg_scale=2.0), atol=1e-12)
    assert torch.allclose(run(cfg_scale=2.0, cfg_interval=(2000, 3000)), run(cfg_scale=1.0), atol=1e-12)
    middle = run(cfg_scale=2.0, cfg_interval=(200, 800))
    assert torch.allclose(middle, run(cfg_scale=2.0, cfg_interval=(200, 800), use_cache=False), atol=1e-9)
    assert not torch.allclose(middle, run(cfg_scale=2.0), atol=1e-3)
    assert not torch.allclose(middle, run(cfg_scale=1.0), atol=1e-3)


def test_per_block_guidance_is_block_k_sampled_at_its_own_scale():
    """cfg_scale=[w_0, ..., w_{N-1}]: block k is what plain guidance at w_k makes after blocks
    0..k-1, built here one block at a time through prefix completion. DDIM draws only each
    block's starting noise, so the reference's generator skips the k draws before block k."""
    cfg = tiny_config(block_h=2, block_w=2)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    labels, scales, Bl = [0, 1, 2], [3.0, 1.0, 2.0, 1.5], cfg.block_len
    kw = dict(steps=4, sampler="ddim")
    out = patchify(acdit.sample(m, labels, cfg_scale=scales, generator=torch.Generator().manual_seed(5), **kw), cfg)
    ref = out[:, :0]
    for k, w in enumerate(scales):
        g = torch.Generator().manual_seed(5)
        for _ in range(k):
            torch.randn(3, Bl, cfg.patch_dim, generator=g, dtype=torch.float64)
        block_k = patchify(acdit.sample(m, labels, cfg_scale=w, prefix=ref, generator=g, **kw), cfg)[:, k * Bl:(k + 1) * Bl]
        ref = torch.cat([ref, block_k], dim=1)
    assert torch.allclose(out, ref, atol=1e-9)
    plain = patchify(acdit.sample(m, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5), **kw), cfg)
    assert not torch.allclose(out, plain, atol=1e-3)
    cached_vs_not = acdit.sample(m, labels, cfg_scale=scales, generator=torch.Generator().manual_seed(5),
                                 use_cache=False, **kw)
    assert torch.allclose(patchify(cached_vs_not, cfg), out, atol=1e-9)
    with pytest.raises(ValueError, match="one per block"):
        acdit.sample(m, labels, cfg_scale=[2.0, 2.0], **kw)


# --- video: one block per frame, 3D RoPE, a sliding cache window -----------------------

def video_config(**kw):
    """4 frames of 4x4 pixels, 2x2 patches: 4 tokens a frame, each frame one block."""
    base = dict(img_size=4, in_channels=1, n_frames=4, patch_size=2, block_h=2, block_w=2,
                depth=2, width=24, n_heads=2, n_classes=3)
    base.update(kw)
    return ACDiTConfig(**base)


def test_video_config_needs_one_block_per_frame():
    with pytest.raises(ValueError, match="one whole frame: block_h = block_w = 2"):
        video_config(block_h=1)
    with pytest.raises(ValueError, match="head dim 4 is too small for video"):
        video_config(width=8)
    cfg = video_config()
    assert (cfg.n_blocks, cfg.block_len, cfg.seq_len) == (4, 4, 7 * 4)


def test_video_patchify_round_trip_and_frame_order():
    cfg = video_config(in_channels=2)
    videos = torch.randn(3, 4, 2, 4, 4)
    tokens = patchify(videos, cfg)
    assert tokens.shape == (3, 4 * 4, 2 * 2 * 2)
    assert torch.equal(unpatchify(tokens, cfg), videos)
    # block f is frame f, its patches in raster order, each patch (p, p, C) flattened
    for f, r, c in itertools.product(range(4), range(2), range(2)):
        patch = videos[:, f, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].permute(0, 2, 3, 1).reshape(3, -1)
        assert torch.equal(tokens[:, f * 4 + r * 2 + c], patch)
    with pytest.raises(ValueError, match=r"videos of shape \(B, 4, 2, 4, 4\)"):
        patchify(videos[:, :3], cfg)
    # more frames than trained (a video sampled past its length) come back whole
    assert unpatchify(torch.randn(1, 6 * 4, 8), cfg).shape == (1, 6, 2, 4, 4)
    assert acdit.token_coords(cfg)[[0, 3, 4, 15]].tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 0], [3, 1, 1]]


def test_rope_3d_scores_depend_only_on_the_frame_row_column_offset():
    cfg = video_config(img_size=8, patch_size=1, block_h=8, block_w=8, width=32, n_heads=2)
    rope = acdit.RoPE(cfg)
    assert rope.pairs == [3, 3, 2]  # 8 rotation pairs of a 16-dim head: shared out 3, 3, 2
    where = {tuple(fc): i for i, fc in enumerate(acdit.token_coords(cfg).tolist())}
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(a, b):
        qa = acdit.apply_rope(q, *rope(torch.tensor([where[a]])))
        kb = acdit.apply_rope(k, *rope(torch.tensor([where[b]])))
        return (qa * kb).sum()

    assert torch.allclose(score((0, 1, 2), (2, 3, 5)), score((1, 4, 0), (3, 6, 3)), atol=1e-5)
    assert not torch.allclose(score((0, 1, 2), (2, 3, 5)), score((0, 1, 2), (1, 3, 5)), atol=1e-3)  # time
    assert not torch.allclose(score((0, 1, 2), (2, 3, 5)), score((0, 1, 2), (2, 5, 3)), atol=1e-3)
    # each rotation pair (i, i + k) of an axis' slice turns by coordinate * frequency, from the
    # definition: slices [frame 6 dims | row 6 | col 4], frequencies base^(-j/k)
    x = torch.randn(16, dtype=torch.float64)
    fr, r, c = 2, 5, 7
    out = acdit.apply_rope(x.view(1, 1, 1, 16).float(), *rope(torch.tensor([where[(fr, r, c)]]))).view(16)
    start = 0
    for coord, k in zip((fr, r, c), (3, 3, 2)):
        for j in range(k):
            a = coord * cfg.rope_base ** (-j / k)
            x1, x2 = x[start + j], x[start + k + j]
            assert torch.isclose(out[start + j], (x1 * math.cos(a) - x2 * math.sin(a)).float(), atol=1e-5)
            assert torch.isclose(out[start + k + j], (x2 * math.cos(a) + x1 * math.sin(a)).float(), atol=1e-5)
        start += 2 * k


def test_image_model_outputs_are_unchanged_by_video_support():
    """Numbers this model gave before acdit.py learned video (recorded at commit 85bde7f):
    2D RoPE, patchify and the forward are exactly what they were for images."""
    cfg = tiny_config(block_h=2, block_w=2, width=32, n_heads=2)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    N, Bl = cfg.n_blocks, cfg.block_len
    x0 = torch.randn(2, N * Bl, cfg.patch_dim, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (2, N), generator=g)
    with torch.no_grad():
        eps = m(x0, t, torch.tensor([0, 2]), clean=x0[:, :(N - 1) * Bl])
    then = torch.tensor([-3.1671480093203446, -3.0658730280695417, -2.8354924006085014,
                         -8.811877925371208, -6.640750261607611, 0.9932430792645424, -1.9313258636306654],
                        dtype=torch.float64)
    assert torch.allclose(torch.cat([eps[0, :3, 0], eps[1, -1]]), then, rtol=1e-6, atol=1e-6)
    assert abs(eps.abs().sum().item() - 784.1096608767247) < 1e-4
    # and cached sampling (positions from the cache, commits), also recorded at 85bde7f
    imgs = acdit.sample(m, [1, 2], cfg_scale=2.0, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(0))
    then = torch.tensor([0.9425973599195879, 0.9073307097315363, 0.9527808141642932, 0.9045387180855012, -1.0,
                         0.9029993352172305, -1.0, 0.8965109893131781], dtype=torch.float64)
    assert torch.allclose(imgs[0, 0, 0], then, rtol=1e-6, atol=1e-6)
    assert abs(imgs.abs().sum().item() - 122.59153101733492) < 1e-4


def test_video_training_forward_equals_frame_by_frame_inference():
    cfg = video_config()
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    N, Bl = cfg.n_blocks, cfg.block_len
    g = torch.Generator().manual_seed(3)
    x0 = patchify(torch.randn(2, 4, 1, 4, 4, generator=g, dtype=torch.float64), cfg)
    t = torch.randint(0, 1000, (2, N), generator=g)
    xt = m.schedule.add_noise(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    y = torch.tensor([2, 0])
    with torch.no_grad():
        train_eps = m(xt, t, y, clean=x0[:, :(N - 1) * Bl])
        cache = KVCache(cfg)
        for i in range(N):
            frame = slice(i * Bl, (i + 1) * Bl)
            assert torch.allclose(m(xt[:, frame], t[:, i:i + 1], y, cache=cache), train_eps[:, frame], atol=1e-10)
            if i < N - 1:
                m.commit(x0[:, frame], cache)
    assert train_eps.abs().mean() > 0.1
    loss = m.training_loss(torch.rand(2, 4, 1, 4, 4, dtype=torch.float64) * 2 - 1, torch.tensor([0, 1]))
    assert loss.ndim == 0 and loss > 0


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_video_cached_sampling_equals_uncached(sampler):
    m = randomized(ACDiT(video_config()), dtype=torch.float64)
    kw = dict(cfg_scale=2.0, sampler=sampler, steps=5)
    a = acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    b = acdit.sample(m, [0, 1, 2], generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert a.shape == (3, 4, 1, 4, 4) and a.dtype == torch.float64
    assert torch.allclose(a, b, atol=1e-9)


def test_sliding_window_keeps_positions_consistent():
    """Past the trained length the cache drops the oldest frame and positions count on. In a
    1-layer model a frame's cached keys/values depend on that frame alone, so frame i of a
    long video must equal what the model makes as the last frame of an ordinary video given
    frames i-3..i-1 as a prefix (positions 0..3 instead of i-3..i: RoPE sees only offsets),
    with the same noise (DDIM: a frame's only randomness is its starting noise)."""
    cfg = video_config(depth=1)
    m = randomized(ACDiT(cfg), dtype=torch.float64)
    labels, Bl, P = [0, 2], cfg.block_len, cfg.patch_dim
    kw = dict(cfg_scale=2.0, sampler="ddim", steps=4)
    long = acdit.sample(m, labels, generator=torch.Generator().manual_seed(1), n_frames=7, **kw)
    assert long.shape == (2, 7, 1, 4, 4)
    short = acdit.sample(m, labels, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(long[:, :4], short)  # within the trained length nothing changes
    for i in (4, 5, 6):
        prefix = patchify(long[:, i - 3:i + 1], cfg)[:, :3 * Bl]  # frames i-3..i-1 as tokens
        g = torch.Generator().manual_seed(1)
        for _ in range(i):  # the noise of frames 0..i-1, drawn first in the long run
            torch.randn(2, Bl, P, generator=g, dtype=torch.float64)
        ref = acdit.sample(m, labels, generator=g, prefix=prefix, **kw)
        assert torch.allclose(ref[:, 3], long[:, i], atol=1e-9), f"frame {i}"
    # in a deeper model the kept frames' keys remember the dropped ones: no such equality,
    # but the window still works and the first frames are unchanged
    deep = randomized(ACDiT(video_config(depth=2)), dtype=torch.float64)
    v = acdit.sample(deep, labels, generator=torch.Generator().manual_seed(1), n_frames=9, **kw)
    assert v.shape == (2, 9, 1, 4, 4) and torch.isfinite(v).all()
    assert len(deep.rope.cos) == 9 * Bl  # the tables grew to the positions used


def test_sliding_window_arguments():
    m = randomized(ACDiT(video_config()), dtype=torch.float64)
    with pytest.raises(ValueError, match="use_cache=True"):
        acdit.sample(m, [0], steps=2, n_frames=5, use_cache=False)
    assert acdit.sample(m, [0], steps=2, n_frames=2, use_cache=False).shape == (1, 2, 1, 4, 4)
    cache = KVCache(m.cfg, 1)
    with torch.no_grad():
        m.commit(torch.randn(1, 3 * 4, 4, dtype=torch.float64), cache)
        k = cache.k[0][:, :, 4:12].clone()
        cache.drop_oldest()
    assert (cache.n_blocks, cache.dropped) == (2, 1) and torch.equal(cache.k[0][:, :, :8], k)
    with pytest.raises(ValueError, match="no committed block to drop"):
        KVCache(m.cfg, 1).drop_oldest()
    with pytest.raises(ValueError, match="this model makes images"):
        acdit.sample(randomized(ACDiT(tiny_config())), [0], steps=2, n_frames=5)
    with pytest.raises(ValueError, match="positive integer"):
        acdit.sample(m, [0], steps=2, n_frames=0)
    with pytest.raises(ValueError, match=r"K <= 1 given blocks"):  # a prefix must leave a frame to make
        acdit.sample(m, [0], steps=2, n_frames=2, prefix=torch.zeros(1, 2 * 4, 4, dtype=torch.float64))
