# DPO (Rafailov et al. 2023) of an SFT'd series member as Yano et al. 2025 do (section 4.1): UltraFeedback
# (binarized), lr 5e-7 for every member, in SimPO's setting (Meng et al. 2024): one epoch, global batch 128,
# warmup over 10% then cosine, beta 0.01 (SimPO's DPO baseline on the Base models; the Tanuki-8B/8x8B
# post-training report, GENIAC Matsuo Lab LLM team 2024, used 0.01 to 0.1). The reference is the starting
# (SFT) model unless --ref says otherwise; its log-probs are computed once.
#   python posttrain.py dpo out/sft/S1/final.pt configs/dpo_paper.py --out=out/dpo/S1
# SimPO instead:  --loss=simpo  (its own defaults, beta 2.0 and gamma 1.0: Meng et al. 2024, gamma/beta 0.5 on Llama-3-Base;
#                  they tuned lr per model between 3e-7 and 1e-6)
# LoRA (Hu et al. 2022) for cheap runs: --lora_rank=16 --lora_alpha=32 --lr=2e-6 (Tanuki's LoRA DPO used 2e-6, beta 0.1)
data = "hf:HuggingFaceH4/ultrafeedback_binarized"
split = "train_prefs"
eval_examples = 500  # from test_prefs
eval_interval = 100
loss = "dpo"  # beta is left to the loss's default (posttrain.DEFAULT_BETA: DPO 0.01), so --loss=simpo gets SimPO's
ref_mode = "precompute"
max_len = 1024
max_prompt_len = 512  # SimPO: 1800 of 2048; the same share of the paper's 1024 would leave answers little room
batch_size = 4  # pairs per micro-batch: 8 sequences per forward
grad_accum = 32  # 4 x 32 = 128 pairs per step on one GPU; divide grad_accum by the GPU count
epochs = 1.0
lr = 5e-7
warmup_frac = 0.1
schedule = "cosine"
min_lr_ratio = 0.0
weight_decay = 0.0
grad_clip = 1.0
log_interval = 10
ckpt_interval = 100
