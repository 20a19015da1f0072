# The CPU demo: the paper's method at toy scale, on 2 cores with no network (the README's main command).
#   python series.py configs/series_cpu.py
# Four members, each about twice the non-embedding parameters of the last (cpu-1 .. cpu-4: 0.10M, 0.22M,
# 0.44M, 0.85M), byte tokenizer, the embedded corpus (Python's own documentation). Stage 1 trains from
# scratch; each later stage is grown from the one before with bert2BERT FPI (width) and zero-initialized
# new layers (depth), then trained on what is left of its scratch budget (section 2.2), with series.py's
# default recipe (docs/ablation.md): zero-sum noise 0.3 on the copies and one learning-rate schedule over the
# series. The scratch baselines train each size alone on its full budget at the same learning rate. Learning
# rates fall with size as in section 3.5. Then the report: out/series_cpu/report.md (Table 1) and series.png
# (Figure 2). The ablation's base: --grow_noise=1e-3 --grow_schedule=restart --grow_warmup_steps=20 (nanogrow's
# choices; of the paper's recipe, bert2BERT's stacked depth is --grow_depth=stack_top, section 2.2).
out_dir = "out/series_cpu"
data = ["default"]
tokenizer = "bytes"
seq_len = 256
batch_size = 16
stages = [
    dict(name="0.1M", shape="cpu-1", lr=3e-3),
    dict(name="0.2M", shape="cpu-2", lr=2.5e-3),
    dict(name="0.4M", shape="cpu-3", lr=2e-3),
    dict(name="0.9M", shape="cpu-4", lr=1.5e-3),
]
tokens_per_param = 5  # small, so that the whole demo fits in about 10 minutes
series_mode = "grow+scratch"
warmup_steps = 30
eval_interval = 100
eval_batches = 8
log_interval = 50
ckpt_interval = 500
