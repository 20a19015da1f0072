# Upcycling on 2 CPU cores: the CPU demo's largest member (0.9M, cpu-4) continued three ways at equal compute.
#   python series.py configs/series_cpu.py        # first, the demo: it writes out/series_cpu/grow/0.9M/final.pt
#   python series.py configs/series_moe_cpu.py    # then this, a few minutes; --resume continues a killed run
# Each branch starts from that checkpoint and trains for branch_flops = 6 X_active T (series.py, mode "branch"):
#   dense       cpu-4 as it is (X = 0.85M): the baseline
#   4x top-2    upcycled into 4 experts, 2 per token (Mixtral's k; X_active = 1.44M, so 0.59x the tokens)
#   8x top-1    upcycled into 8 experts, 1 per token (Switch's k; X_active = 0.86M, about the dense tokens)
# The upcycled models start from the dense function exactly (grow.py, rule U: every expert a copy of the
# MLP, a new random router). All three read the same data, from where the demo's stream stopped, at the
# same learning rate. Then out/series_moe_cpu/report.md and series.png (the demo's 0.9M run in grey).
out_dir = "out/series_moe_cpu"
init_from = "out/series_cpu/grow/0.9M/final.pt"
series_mode = "branch"
branch_flops = 2.5e12  # 6 * 853,120 * 0.49M tokens: a sixth of what the 0.9M stage trained (3.1M)
stages = [
    dict(name="0.9M dense", shape="cpu-4", lr=6e-4),
    dict(name="0.9M 4x top-2", shape="cpu-4", moe_experts=4, moe_top_k=2, lr=6e-4),
    dict(name="0.9M 8x top-1", shape="cpu-4", moe_experts=8, moe_top_k=1, lr=6e-4),
]
data = ["default"]
tokenizer = "bytes"
seq_len = 256
batch_size = 16
grow_warmup_steps = 20  # fresh AdamW in every branch
eval_interval = 40
eval_batches = 8
log_interval = 20
ckpt_interval = 500
