# A tiny Llama on the embedded default corpus (Python's own documentation, byte tokenizer): about
# 2 minutes on 2 CPU cores, no network: the validation loss falls from ln(320) = 5.77 to about 1.55
# nats per token (2.24 bits per byte); measured 1 min 55 s on 2 cores.
#   python train.py configs/tiny_cpu.py
out_dir = "out/tiny_cpu"
shape = "tiny"  # 4 layers, d 128, 4 heads of 32, SwiGLU 352: 0.8M non-embedding parameters
data = ["default"]
tokenizer = "bytes"
batch_size = 16
seq_len = 256
max_steps = 600
lr = 3e-3
warmup_steps = 30
eval_interval = 100
eval_batches = 10
ckpt_interval = 200
log_interval = 20
