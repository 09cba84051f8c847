# MNIST on one GPU: a wider, deeper model than the CPU default, on more images (batch 256).
#   python train.py config/mnist_gpu.py --data_dir=path/to/mnist
dataset = 'mnist'
out_dir = 'out-mnist-gpu'

patch_size = 4    # 7x7 grid of 4x4-pixel patches
block_h = 1       # 7 row blocks of 7 tokens, as in the CPU default
block_w = 7
depth = 8
width = 256
n_heads = 4

max_iters = 20000
batch_size = 256
learning_rate = 1e-3
warmup_iters = 500
ema_decay = 0.9995

eval_interval = 2000
sample_interval = 5000

device = 'auto'
dtype = 'bfloat16'
compile = True
