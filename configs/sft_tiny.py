# SFT of a tiny CPU model on the project's small UltraChat-schema fixture (no network), a few seconds:
#   python posttrain.py sft out/tiny_cpu/final.pt configs/sft_tiny.py
out = "out/sft_tiny"
data = "tests/fixtures/posttrain/ultrachat_200k.jsonl"
eval_data = "tests/fixtures/posttrain/ultrachat_200k.jsonl"  # the same rows: a demo, not a measurement
eval_examples = 8
max_len = 256
batch_size = 4
grad_accum = 2
max_steps = 30
lr = 1e-3  # far above the paper's 3e-5: a tiny model and 30 steps
warmup_frac = 0.1
device = "cpu"
log_interval = 5
