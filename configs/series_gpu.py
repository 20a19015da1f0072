# nanogrow's own recipe on GPUs, not the paper's (that is configs/series_paper.py): a series that fits one 8-GPU node,
# the PassUntil family of Hu et al. 2024 (head dim 64, layers 4i, FFN 2.5 d, tied embeddings) from pu4 (109M
# non-embedding parameters) to pu7 (892M), each about twice the last, at 1x Chinchilla (20 tokens per parameter),
# GPT-2 tokenizer, FineWeb-Edu, context 1024.
#   python series.py configs/series_gpu.py --plan                     # tokens, passes, FLOPs: before any GPU hour
#   python budget.py configs/series_gpu.py --gpus 8 --gpu H100 --mfu 0.4
#   torchrun --standalone --nproc_per_node=8 series.py configs/series_gpu.py
# budget.py (6·X·T, X non-embedding): the grown series costs 95.4 EFLOPs (the pu7 alone) against 134
# EFLOPs for the four scratch runs, 28.8% saved. At 40% MFU of an H100's 989 TFLOP/s that is 67
# GPU-hours (8.4 hours on 8 GPUs) for the grown series and 93 more GPU-hours (11.6 hours) for the
# scratch baselines pu5..pu7 (pu4 is shared). The tied GPT-2 embedding adds compute 6X leaves out.
out_dir = "out/series_gpu"
tokenizer = "gpt2"
# The grown series reads 25.9B tokens, the pu7 scratch run 17.8B: the first 30B tokens of FineWeb-Edu's sample-100BT
# (a random sample, about 100B tokens by its dataset card) cover both once (0.86 and 0.59 passes; --plan). On
# sample-10BT the grown series would read its data 2.59 times while the scratch runs read it at most 1.78 times.
data = ["hf:HuggingFaceFW/fineweb-edu:sample-100BT"]
max_data_tokens = 30_000_000_000
seq_len = 1024
batch_size = 16
grad_accum = 4  # 16 x 1024 x 8 GPUs x 4 = 524,288 tokens per step
stages = [
    dict(name="pu4", shape="pu4", lr=3e-3),
    dict(name="pu5", shape="pu5", lr=2e-3),
    dict(name="pu6", shape="pu6", lr=1.5e-3),
    dict(name="pu7", shape="pu7", lr=1e-3),
]
tokens_per_param = 20
series_mode = "grow+scratch"
# nanogrow's growth recipe, the best of docs/ablation.md (measured at CPU scale, not yet on GPUs): FPI width,
# zero-initialized new layers, zero-sum noise 0.3 on the copies, and one learning-rate schedule over the whole series.
# Under "continue" only the last member (pu7) ends at min_lr: pu4..pu6 stop in the middle of the schedule and are not
# finished models. For a series whose every member is finished, take configs/series_paper.py's grow_schedule="restart".
# A re-warmup of 200 steps after each growth is kept as a guard at this scale, where the recipe is not yet measured.
grow_width = "fpi"
grow_depth = "zero"
grow_noise = 0.3
grow_schedule = "continue"
warmup_steps = 500
grow_warmup_steps = 200
eval_interval = 500
eval_batches = 40
ckpt_interval = 1000
