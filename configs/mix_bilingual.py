# The Weblab-10B setting (Matsuo Lab, 2023): English and Japanese mixed 1:1 by tokens, with the validation loss
# of each language logged on its own (val_loss/en, val_loss/ja in metrics.jsonl).
#   torchrun --standalone --nproc_per_node=8 train.py configs/mix_bilingual.py
# The GPT-2 tokenizer is the paper's; it spends several tokens per Japanese character, so the 1:1 token
# ratio is far from 1:1 in characters. Try --tokenizer=bytes for a tokenizer-neutral comparison.
out_dir = "out/mix_bilingual"
shape = "paper-1B"
tokenizer = "gpt2"
data = ["hf:HuggingFaceFW/fineweb-edu:sample-10BT", "hf:HuggingFaceFW/fineweb-2:jpn_Jpan"]
data_names = ["en", "ja"]
data_weights = [1.0, 1.0]
max_data_tokens = 10_000_000_000  # per source
seq_len = 1024
batch_size = 16
grad_accum = 4
max_tokens = 20_000_000_000
lr = 1.5e-3
warmup_steps = 2000
eval_interval = 1000
eval_batches = 50
ckpt_interval = 2000
