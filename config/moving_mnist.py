# Moving MNIST videos on 2 CPU cores: 8 frames of 32x32, one digit bouncing off the edges,
# made on the fly from the MNIST files (no download of its own). One block is one frame.
#   python train.py config/moving_mnist.py --data_dir=path/to/mnist
dataset = 'moving_mnist'
out_dir = 'out-moving-mnist'

# train.py's shape defaults for video: 4x4 patches of 8x8 pixels a frame (16 tokens, so 8 frames
# train as 240 tokens), a block a whole frame; RoPE's 3 axes are frame, row, column
prediction = 'x0'   # a token holds 64 pixels: predicting them clean beat predicting the noise
cfg_scale = 4.0     # the grids' guidance (and generate.py's and evaluate.py's 'auto')
ema_decay = 0.9999  # capped by the EMA warm-up: an average of about the last tenth of the run (+1 point)

time_budget = 60.0  # minutes from launch to exit (sets max_iters from the warm step time)
eval_interval = 1000
sample_interval = 5000
