# The paper's 1B shape (Table 3: d 2048, FFN 7168, 18 layers, 16 heads) on FineWeb-Edu with the GPT-2
# tokenizer and context 1024 (sections 3.1, 3.2), for one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train.py configs/paper_1b.py
# 2x Chinchilla for 1.09B non-embedding parameters is 40 tokens per parameter = 43.8B tokens;
# sample-10BT holds about 10B, so this reads it about 4 times (set max_tokens lower, or prepare
# a larger FineWeb-Edu sample, e.g. hf:HuggingFaceFW/fineweb-edu:sample-100BT, to avoid repeats).
out_dir = "out/paper_1b"
shape = "paper-1B"
tokenizer = "gpt2"
data = ["hf:HuggingFaceFW/fineweb-edu:sample-10BT"]
seq_len = 1024
batch_size = 16  # per GPU; 16 x 1024 x 8 GPUs x 4 accumulation = 524,288 tokens per step
grad_accum = 4
max_tokens = 43_800_000_000
lr = 1.5e-3  # section 3.5: the 1B stage's learning rate
warmup_steps = 2000
min_lr_ratio = 0.1
weight_decay = 0.1
eval_interval = 1000
eval_batches = 50
ckpt_interval = 2000
log_interval = 10
