# SFT of a series member as Yano et al. 2025 do (section 4.1): UltraChat-200k, lr 3e-5 for every member,
# in the setting of SimPO (Meng et al. 2024), which follows the zephyr recipe (Tunstall et al. 2023): one
# epoch, global batch 128, warmup over 10% of the steps then cosine, no weight decay. The loss is on the
# assistant's answers only (as TRL's assistant_only_loss, huggingface/trl trl/trainer/sft_config.py).
# Context: the paper's 1024 (section 3.2), where SimPO used 2048.
#   python posttrain.py sft out/series/S1/final.pt configs/sft_paper.py --out=out/sft/S1
#   torchrun --standalone --nproc_per_node=8 posttrain.py sft CKPT configs/sft_paper.py --grad_accum=2
data = "hf:HuggingFaceH4/ultrachat_200k"
split = "train_sft"
eval_examples = 500  # from test_sft
eval_interval = 200
loss_on = "assistant"
max_len = 1024
batch_size = 8
grad_accum = 16  # 8 x 16 = 128 conversations per step on one GPU; divide grad_accum by the GPU count
epochs = 1.0
lr = 3e-5
warmup_frac = 0.1
schedule = "cosine"
min_lr_ratio = 0.0
weight_decay = 0.0
grad_clip = 1.0
log_interval = 10
ckpt_interval = 200
