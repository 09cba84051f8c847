# CIFAR-10 on one GPU: a starting point, NOT YET RUN (no GPU has been at hand; untuned):
#   python train.py config/cifar10.py
# 2x2-pixel patches make a 16x16 grid of tokens; a block is one row of 16 patches,
# so an image is generated as 16 blocks, top to bottom.
dataset = 'cifar10'
out_dir = 'out-cifar10'

patch_size = 2
block_h = 1
block_w = 16
depth = 12
width = 384
n_heads = 6
label_dropout = 0.1

max_iters = 50000
batch_size = 128
learning_rate = 1e-3
warmup_iters = 1000
decay_frac = 0.2
ema_decay = 0.9999  # longer run, so average over more steps

eval_interval = 2000
log_interval = 100
sample_interval = 5000

device = 'auto'
dtype = 'bfloat16'
compile = True
