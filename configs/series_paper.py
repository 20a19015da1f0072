# The paper's series, as the paper ran it (Yano et al. 2025): Table 3's shapes, 1B from scratch, then bert2BERT to 2B, 4B
# and 8B, each trained on what is left of its scratch budget (section 2.2) at 2x Chinchilla, 40 tokens per parameter
# (section 3.3), with section 3.5's per-stage learning rates; beside it the scratch baselines at 3e-4 (section 3.2) and
# the fixed-data series (section 3.3), whose unique tokens are capped at the 8B scratch run's.
#   python series.py configs/series_paper.py --plan                          # tokens, passes, FLOPs: before any GPU hour
#   python budget.py configs/series_paper.py --gpus 8 --gpu H100 --mfu 0.4    # what it costs
#   python budget.py --memory configs/series_paper.py                        # what it needs per GPU
#   torchrun --standalone --nproc_per_node=8 series.py configs/series_paper.py
out_dir = "out/series_paper"
tokenizer = "gpt2"
# Data (--plan prints it): the grown series reads 462B tokens (1B 43.8B, 2B 60.7B, 4B 117B, 8B 241B), the 8B scratch run
# 321B. FineWeb-Edu's full set (1.3T GPT-2 tokens, its dataset card) covers that once: its first 480B tokens are prepared
# (960 GB of token files), so the grown series reads 0.96 passes, every scratch run less than one, and the fixed-data
# series' cap of 321B unique tokens binds at the 8B stage alone (section 3.3: 1B..4B read 221B, the 8B reads past the
# cap), 1.44 passes over it. (sample-350BT instead: --data='["hf:HuggingFaceFW/fineweb-edu:sample-350BT"]'
# --max_data_tokens=0, a random sample of 350B, which the grown series reads 1.32 times while the scratch runs read
# it less than once; sample-10BT, the old setting, would be 46 passes and is refused by max_passes.)
data = ["hf:HuggingFaceFW/fineweb-edu"]
max_data_tokens = 480_000_000_000
max_passes = 2  # the paper's grown and scratch arms read fresh data; only the fixed-data arm repeats (1.44)
seq_len = 1024
batch_size = 8
grad_accum = 8  # 8 x 1024 x 8 GPUs x 8 = 524,288 tokens per step
# Memory (python budget.py --memory configs/series_paper.py, per H100 of 80 GiB): under DDP every GPU holds
# 16 bytes per parameter, 135 GB for the 8B member before activations, so the 4B and 8B cannot run. FSDP
# shards those 16 bytes over the 8 GPUs: the 1B then needs 19.2 GiB, the 4B 39.9, the 8B 62.4, under the
# 72 GiB a plan may use. Activation checkpointing (one block's activations at a time, for a third more
# compute) is kept for the 8B alone, which it brings to 27.5 GiB, as a guard until bench/gpu_check.py has measured
# the peaks on a GPU: its estimate leaves the least room.
parallel = "fsdp"
activation_checkpointing = False
stages = [
    dict(name="1B", shape="paper-1B", lr=1.5e-3, scratch_lr=3e-4),
    dict(name="2B", shape="paper-2B", lr=1.1e-3, scratch_lr=3e-4),
    dict(name="4B", shape="paper-4B", lr=7e-4, scratch_lr=3e-4),
    dict(name="8B", shape="paper-8B", lr=3e-4, scratch_lr=3e-4, activation_checkpointing=True),
]
tokens_per_param = 40
series_mode = "grow+scratch+fixed_data"
# Growth as the paper states it (section 2.2): bert2BERT, which "copies the weights of linear layers to widen the hidden
# dims" (FPI, function preserving) "and stacks trained layers upward": the new layers copy the top ones of the widened
# stack, bert2BERT's Algorithm 1 (grow.py "stack_top": 18 -> 22 appends copies of layers 14-17, 22 -> 27 of 17-21,
# 27 -> 33 of 21-26).
grow_width = "fpi"
grow_depth = "stack_top"
# Every member finished (the paper evaluates each as a model of its own): a warmup and a cosine to min_lr per stage.
grow_schedule = "restart"
# Where the paper is silent, nanogrow's choices: zero-sum symmetry-breaking noise of 1e-3 of each weight's std on the
# width copies (grow.grow's default; the paper states none, and exact copies would get equal gradients forever), a fresh
# AdamW, and a re-warmup of 500 steps after each growth (the paper gives the learning rates of section 3.5, not a warmup
# after growth); warmup_steps = 2000 for the 1B and the scratch runs.
grow_noise = 1e-3
grow_optimizer = "fresh"
warmup_steps = 2000
grow_warmup_steps = 500
eval_interval = 1000
eval_batches = 50
ckpt_interval = 2000
