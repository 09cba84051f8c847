# MNIST on a laptop CPU (placeholder settings, to be tuned):
#   python train.py config/mnist_cpu.py
# 4x4-pixel patches make a 7x7 grid of tokens; a block is one row of 7 patches.
dataset = 'mnist'
out_dir = 'out-mnist'

patch_size = 4
block_h = 1
block_w = 7
depth = 4
width = 128
n_heads = 4

max_iters = 3000
batch_size = 64
learning_rate = 2e-3
warmup_iters = 100

eval_interval = 500
eval_iters = 10
log_interval = 50
sample_interval = 1000

device = 'cpu'
dtype = 'float32'
compile = False
