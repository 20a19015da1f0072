# The growth-recipe ablation at the paper's training length (experiments/ablate.py): which growth settings still pay
# after long training?
#   python experiments/ablate.py configs/ablate_cpu.py --docs_dir=docs --jobs=2      # --resume continues it
# The reproduction grid's members (configs/reproduce_cpu.py: micro-1 .. micro-4, 12K-82K non-embedding parameters) at
# 40 tokens per parameter (2x Chinchilla, section 3.3) on the embedded corpus, three seeds, with the CPU demo's batch,
# context and warmup (configs/series_cpu.py), validated every 25 steps. Base: nanogrow's recipe (experiments/reproduce.py
# NANOGROW_RECIPE: FPI width, zero-initialized layers, zero-sum noise 0.3, a fresh AdamW without re-warmup, every
# member finished by a WSD cooldown branch over 20% of its scratch tokens) with the scratch twins of every member
# (WSD runs cooling down over the same 20%); each variant below changes one setting. Every entry's largest stage is
# then trained again on 70% of the scratch FLOPs with a whole schedule: the goal, measured on a finished model.
out_dir = "out/ablate"
series = "configs/series_cpu.py"
stages = [
    dict(name="12K", shape="micro-1", lr=6e-3),
    dict(name="24K", shape="micro-2", lr=5e-3),
    dict(name="46K", shape="micro-3", lr=4e-3),
    dict(name="82K", shape="micro-4", lr=3e-3),
]
tokens_per_param = 40
seeds = [1337, 7, 42]
jobs = 2  # two series at a time, one core each
overrides = ["--grow_width=fpi", "--grow_depth=zero", "--grow_schedule=wsd", "--decay_frac=0.2", "--grow_noise=0.3",
             "--grow_optimizer=fresh", "--grow_warmup_steps=0",
             "--eval_interval=25"]  # validation every 25 steps: the reach to within 2% of the FLOPs
variants = [
    ["stack_top", dict(grow_depth="stack_top")],  # trained layers stacked upward, bert2BERT's order (the paper's, section 2.2)
    ["stack", dict(grow_depth="stack")],  # each trained layer followed by its copy (Gong et al. 2019's order)
    ["noise0", dict(grow_noise=0.0)],  # exact copies: only training tells them apart (the paper states no noise)
    ["aki", dict(grow_width="aki")],  # bert2BERT's advanced knowledge initialization: the next layer's weights in the copies
    ["opt_grown", dict(grow_optimizer="grown")],  # AdamW's moments and steps carried through growth (grow.py rule A)
    ["restart", dict(grow_schedule="restart", grow_warmup_steps=20)],  # a cosine per stage after a 20-step re-warmup
    # the grown stages at half their rates: a grown model starts trained, so it may need smaller steps
    ["lr_half", dict(stages=[dict(name="12K", shape="micro-1", lr=6e-3), dict(name="24K", shape="micro-2", lr=2.5e-3),
                             dict(name="46K", shape="micro-3", lr=2e-3), dict(name="82K", shape="micro-4", lr=1.5e-3)])],
]
budget_check = 0.7  # every entry's largest member again, trained for 70% of the scratch FLOPs with a whole schedule
