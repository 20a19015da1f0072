# The growth-recipe ablation at CPU scale (experiments/ablate.py, issue 14): which growth settings make the grown series cheapest?
#   python experiments/ablate.py configs/ablate_cpu.py --docs_dir=docs
# The CPU demo's series (configs/series_cpu.py: cpu-1 .. cpu-4, 0.1M-0.9M non-embedding parameters, its learning
# rates and batch) at 5 tokens per parameter, validated every 25 steps. Base: its growth recipe (FPI width, zero-initialized
# layers, noise 1e-3, fresh AdamW with a 20-step warmup, each stage its own cosine) with the scratch twins of every
# member; each variant below changes one setting. Combinations come after the first results.
out_dir = "out/ablate"
series = "configs/series_cpu.py"
tokens_per_param = 5
jobs = 2  # two variants at a time, one core each
# the base recipe, written out (the paper's, and the series' default until this grid): every variant changes it
overrides = ["--grow_width=fpi", "--grow_depth=zero", "--grow_noise=1e-3", "--grow_optimizer=fresh", "--grow_schedule=restart",
             "--grow_warmup_steps=20",
             "--eval_interval=25"]  # validation every 25 steps (the demo's 100 would place the reach to within 10% of FLOPs)
variants = [
    ["opt_grown", dict(grow_optimizer="grown")],  # AdamW state carried through growth (grow.py rule A)
    ["warmup0", dict(grow_warmup_steps=0)],  # no re-warmup after growth
    ["warmup5", dict(grow_warmup_steps=5)],  # a short one
    ["continue", dict(grow_schedule="continue", grow_warmup_steps=0)],  # one schedule over the series: its own stage 1
    ["noise0", dict(grow_noise=0.0)],
    ["noise1e-2", dict(grow_noise=1e-2)],
    ["noise1e-1", dict(grow_noise=1e-1)],
    ["noise3e-1", dict(grow_noise=0.3)],  # added after the first results: the noise trend goes on?
    ["aki", dict(grow_width="aki")],
    ["stack", dict(grow_depth="stack")],
    ["stack_top", dict(grow_depth="stack_top")],
    ["zero_groups", dict(grow_depth="zero_groups")],  # dus cannot grow 2 -> 3 layers: not in the grid
]
combos = [  # after the first results: the larger noises with one schedule over the series, and with the carried optimizer
    ["noise1e-1+continue", dict(grow_noise=0.1, grow_schedule="continue", grow_warmup_steps=0)],
    ["noise1e-1+grown+continue", dict(grow_noise=0.1, grow_optimizer="grown", grow_schedule="continue", grow_warmup_steps=0)],
    ["noise3e-1+continue", dict(grow_noise=0.3, grow_schedule="continue", grow_warmup_steps=0)],
]
budget_check = 0.7  # then the best recipe's largest member again, trained for 70% of the scratch FLOPs with its own schedule
