# The paper's claims at CPU scale over seeds (experiments/reproduce.py), no network:
#   python experiments/reproduce.py configs/reproduce_cpu.py --estimate                 # the plan and its CPU time
#   python experiments/reproduce.py configs/reproduce_cpu.py --docs_dir=docs --jobs=2   # the grid (--resume after a kill)
# Four members at 40 tokens per parameter (2x Chinchilla, section 3.3): micro-1 .. micro-4 (12K, 24K, 46K, 82K
# non-embedding parameters), small enough that the whole grown series reads the embedded corpus's pretraining split
# (its held-out tenth removed) at most once, the largest scratch run 0.64 of it, and the fixed-data cap binds at the last
# stage alone. Batch, context, warmup and evaluation are the CPU demo's (configs/series_cpu.py). Five seeds, each
# changing initialization, data order and growth noise (3 is the least an interval needs; with 5 the 95% t factor
# falls from 4.30 to 2.78, for about an hour of one-core CPU time in all: BENCHMARKS.md); the recipes are
# experiments/reproduce.py's PAPER_RECIPE and NANOGROW_RECIPE (the report says which settings the paper states and
# which are nanogrow's).
out_dir = "out/reproduce"
series = "configs/series_cpu.py"
stages = [
    dict(name="12K", shape="micro-1", lr=6e-3),
    dict(name="24K", shape="micro-2", lr=5e-3),
    dict(name="46K", shape="micro-3", lr=4e-3),
    dict(name="82K", shape="micro-4", lr=3e-3),
]
tokens_per_param = 40
seeds = [1337, 7, 42, 1, 2]
heldout_every = 10
posttrain_heldout_every = 5
sft_steps = 120
sft_lr = 3e-4
dpo_steps = 60
dpo_lr = 1e-4
dpo_beta = 0.1
