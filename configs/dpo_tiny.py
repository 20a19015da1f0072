# DPO of a tiny CPU model on the project's small UltraFeedback-schema fixture (no network), a few seconds:
#   python posttrain.py dpo out/sft_tiny/final.pt configs/dpo_tiny.py
out = "out/dpo_tiny"
data = "tests/fixtures/posttrain/ultrafeedback_binarized.jsonl"
eval_data = "tests/fixtures/posttrain/ultrafeedback_binarized.jsonl"
eval_examples = 8
loss = "dpo"
beta = 0.1
max_len = 256
max_prompt_len = 128
batch_size = 4
grad_accum = 2
max_steps = 20
lr = 1e-4  # far above the paper's 5e-7: a tiny model and 20 steps
warmup_frac = 0.1
device = "cpu"
log_interval = 5
