"""
hf.py: nanogrow's models as Hugging Face model folders, and back.

    python hf.py export-hf CKPT DIR                  # DIR: a folder transformers, lm-evaluation-harness and vLLM load
    python hf.py import-hf DIR CKPT [--overwrite]    # a Llama or Mixtral folder into a nanogrow checkpoint

model.py's Llama names its parameters as transformers' LlamaForCausalLM does (minus the "model." prefix) and
uses its rotate-half RoPE, and its mixture of experts is Mixtral's layout, so the export is a renaming: the
weights (model.safetensors, read and written here without the safetensors package), config.json,
generation_config.json and the tokenizer (data.hf_tokenizer_json) giving exactly nanogrow's ids. A post-trained
model carries the chat template posttrain.py trains on (CHAT_TEMPLATE) and stops at the end of a turn.
Importing reads a folder with its own tokenizer and checks the weights as a checkpoint's are
(checkpoint.model_from_checkpoint); anything unusable is one CheckpointError. tests/test_export.py and
tests/test_model.py check the folders with transformers itself.
"""

import json
import os
import re
import struct
import sys

import torch

import data
from checkpoint import Lineage, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from common import CheckpointError, ConfigError, cli_errors


# -----------------------------------------------------------------------------
# safetensors: a little-endian u64 header length, a JSON header and the raw bytes; written and read here
# directly so that nanogrow needs no extra dependency for it

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(tensors, path):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    names = {v: k for k, v in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(names[info["dtype"]]).reshape(info["shape"])
    return out


# -----------------------------------------------------------------------------
# names and config.json as transformers spells them

# Mixtral's expert linears in transformers' checkpoints (what save_pretrained writes, in v5 as well, whose
# conversion_mapping fuses them on load): w1 the gate, w3 the up and w2 the down projection
HF_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_name(name):
    """A nanogrow parameter name as transformers' checkpoints spell it: 'model.' in front (lm_head aside), and
    an expert's gate/up/down_proj as w1/w3/w2 (layers.0.block_sparse_moe.experts.3.w1.weight)."""
    name = re.sub(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.", lambda m: m[1] + HF_EXPERT_NAMES[m[2]] + ".", name)
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(name):
    """hf_name's inverse."""
    back = {v: k for k, v in HF_EXPERT_NAMES.items()}
    return re.sub(r"(\.experts\.\d+\.)(w1|w2|w3)\.", lambda m: m[1] + back[m[2]] + ".", str(name).removeprefix("model."))


def hf_config(config, tok, chat=False):
    """config.json of transformers' LlamaForCausalLM (MixtralForCausalLM for a mixture of experts) for this
    model and tokenizer (a data.Tokenizer)."""
    ids = special_ids(tok, chat)
    moe = {  # Mixtral: the experts and the router; full attention (no sliding window), no router jitter
        "num_local_experts": config.moe_experts, "num_experts_per_tok": config.moe_top_k,
        "router_aux_loss_coef": config.moe_aux_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
    return {
        "architectures": ["MixtralForCausalLM" if config.moe_experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if config.moe_experts else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        **(moe if config.moe_experts else {"attention_bias": False, "mlp_bias": False}), "torch_dtype": "float32",
        **{f"{k}_token_id": i for k, i in ids.items()},
        "nanogrow_tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size},
    }


# -----------------------------------------------------------------------------
# the chat template, and which models carry it

# The chat format posttrain.py trains on and `posttrain.py chat` prompts with (chat_data.render_chat), in Jinja, for
# transformers' apply_chat_template, lm-evaluation-harness's --apply_chat_template and vLLM's chat endpoint:
#     <|endoftext|> then, per message, <|ROLE|>CONTENT<|end|>; then <|assistant|> for the generation prompt.
# An assistant's content and its <|end|> sit inside {% generation %} ... {% endgeneration %}, so transformers'
# apply_chat_template(..., return_assistant_tokens_mask=True) gives render_chat's mask, the tokens SFT learns (TRL's
# SFTConfig(assistant_only_loss=True) reads that mask and refuses a template without the markers).
# tests/test_export.py checks that its ids are render_chat's, with and without the generation prompt, and its mask.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] or message['content'] is not string %}"
    "{{ raise_exception('each message needs a role (system, user or assistant) and a string content') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# the template exports carried before the generation markers (the same ids): import-hf still knows them as chat models
CHAT_TEMPLATE_UNMARKED = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] or message['content'] is not string %}"
    "{{ raise_exception('each message needs a role (system, user or assistant) and a string content') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT_OPS = ("sft", "dpo")  # posttrain.py's history records: a model that went through one is a chat model


def is_chat_model(ckpt):
    """Post-trained, or imported from a folder that carried nanogrow's chat template (import-hf records it)."""
    return any(isinstance(h, dict) and (h.get("op") in CHAT_OPS or h.get("chat") is True) for h in ckpt.get("history") or [])


def hf_is_chat(hf_dir):
    """Whether an HF folder carries nanogrow's chat template (so import-hf, then export-hf, keeps it)."""
    try:
        with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("chat_template") in (CHAT_TEMPLATE, CHAT_TEMPLATE_UNMARKED)
    except (OSError, ValueError, AttributeError):
        return False


def special_ids(tok, chat=False):
    """bos, eos and pad ids of the export. BOS is <|endoftext|>: every document and conversation starts after one,
    and it is what lm-evaluation-harness puts before an empty context (its prefix_token_id), as eval.py does. EOS is
    where generation stops: <|endoftext|> for a pretrained model, the end of a turn (<|end|>) for a chat model."""
    return {"bos": tok.eot_id, "eos": tok.special["<|end|>"] if chat else tok.eot_id, "pad": tok.special["<|pad|>"]}


# -----------------------------------------------------------------------------
# export and import


def export_hf(model, out_dir, tokenizer, chat=False):
    """Write out_dir as a Hugging Face model folder that transformers (AutoTokenizer, AutoModelForCausalLM),
    lm-evaluation-harness and vLLM load as it is: config.json, model.safetensors, generation_config.json, and
    the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) giving exactly nanogrow's ids.
    tokenizer: a data.Tokenizer or a checkpoint's tokenizer record ({"name", ...}). chat: a post-trained model:
    the chat template goes with it and generation stops at <|end|>. Returns the data.Tokenizer written."""
    tok = tokenizer if isinstance(tokenizer, data.Tokenizer) else data.get_tokenizer(
        tokenizer.get("name") if isinstance(tokenizer, dict) else tokenizer)
    if tok.n_used > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} uses {tok.n_used} ids but the model's vocab_size is {model.config.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # transformers re-ties it from embed_tokens
        state[hf_name(name)] = t
    ids = special_ids(tok, chat)
    names = {i: s for s, i in tok.special.items()}
    special_map = {f"{k}_token": names[i] for k, i in ids.items()}
    tokenizer_config = {
        # the generic class: the tokenizer is all in tokenizer.json, and every version of transformers has it
        "tokenizer_class": "PreTrainedTokenizerFast", **special_map,
        "add_bos_token": False, "add_eos_token": False,  # a BOS in front of every request moves harness scores
        "clean_up_tokenization_spaces": False,  # decoding gives the text back as it was
        "model_max_length": model.config.max_seq_len,
        **({"chat_template": CHAT_TEMPLATE} if chat else {}),
    }
    generation_config = {
        **{f"{k}_token_id": i for k, i in ids.items()},
        # posttrain.py's reply() never samples the vocab's padding ids; generate() should not either
        "suppress_tokens": tok.unused_ids(model.config.vocab_size),
    }
    files = {"config.json": hf_config(model.config, tok, chat), "generation_config.json": generation_config,
             "tokenizer.json": data.hf_tokenizer_json(tok), "tokenizer_config.json": tokenizer_config,
             "special_tokens_map.json": special_map}
    for name, obj in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
    write_safetensors(state, os.path.join(out_dir, "model.safetensors"))
    return tok


def _read_hf_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}: not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def hf_tokenizer(hf_dir, cfg):
    """The folder's own tokenizer, as a data.Tokenizer: its tokenizer.json if it is one of nanogrow's (bytes, gpt2:
    data.tokenizer_from_hf), else the record that nanogrow's exports before tokenizer.json put in config.json.
    Nothing is guessed from the vocabulary size: any other folder is one CheckpointError."""
    path = os.path.join(hf_dir, "tokenizer.json")
    try:
        if os.path.exists(path):
            return data.tokenizer_from_hf(path)
        record = cfg.get("nanogrow_tokenizer")
        if isinstance(record, dict) and record.get("name") in ("bytes", "gpt2"):
            return data.get_tokenizer(record["name"])
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{hf_dir} has no tokenizer.json (nor a nanogrow tokenizer record in config.json): nanogrow reads "
                          "a folder's own tokenizer and cannot tell it from the weights")


def import_hf(hf_dir):
    """Read a Llama or Mixtral folder (config.json + model.safetensors or pytorch_model.bin, and its tokenizer) into
    (Llama, tokenizer record {"name", "vocab_size"}). The weights are checked as a checkpoint's are
    (model_from_checkpoint); anything unusable is one CheckpointError."""
    hf_dir = os.fspath(hf_dir)
    cfg = _read_hf_json(os.path.join(hf_dir, "config.json"))
    kind = cfg.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise CheckpointError(f"{hf_dir} holds a {kind!r} model; only Llama and Mixtral can be imported")
    if kind == "mixtral" and cfg.get("sliding_window") is not None:
        raise CheckpointError(f"{hf_dir} uses sliding-window attention (sliding_window={cfg['sliding_window']}), which "
                              "nanogrow's model does not have")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir} uses RoPE scaling or biases, which nanogrow's Llama does not have")
    try:
        config = dict(
            vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], ffn_dim=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        if kind == "mixtral":  # absent keys take MixtralConfig's defaults, as transformers would
            config.update(moe_experts=cfg.get("num_local_experts", 8), moe_top_k=cfg.get("num_experts_per_tok", 2),
                          moe_aux_coef=cfg.get("router_aux_loss_coef", 0.001))
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{hf_dir}/config.json lacks or garbles a {kind} field ({type(e).__name__}: {e})") from None
    tok = hf_tokenizer(hf_dir, cfg)
    st_path, bin_path = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "pytorch_model.bin")
    try:
        if os.path.exists(st_path):
            hf_state = read_safetensors(st_path)
        elif os.path.exists(bin_path):
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)  # tensors only: no code from the file
        else:
            raise CheckpointError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin (sharded folders are not supported)")
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: struct, JSON, dtype or unpickling errors
        raise CheckpointError(f"{hf_dir}: the weights cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(hf_state, dict):
        raise CheckpointError(f"{hf_dir}: the weights file holds a {type(hf_state).__name__}, not a state dict")
    # older transformers saved RoPE's inverse frequencies; they follow from the config
    state = {from_hf_name(k): v for k, v in hf_state.items() if not str(k).endswith("rotary_emb.inv_freq")}
    if config["tie_embeddings"] and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # a saved copy of the tied head is dropped
    model = model_from_checkpoint({"model": state, "model_config": config})
    if tok.n_used > model.config.vocab_size:
        raise CheckpointError(f"{hf_dir}: its tokenizer ({tok.name}) uses {tok.n_used} ids but the model has only "
                              f"{model.config.vocab_size}")
    return model, {"name": tok.name, "vocab_size": tok.vocab_size}


# -----------------------------------------------------------------------------
# command line: python hf.py export-hf CKPT DIR | import-hf DIR CKPT [--overwrite]


def main(argv):
    usage = "usage: python hf.py export-hf CKPT DIR | import-hf DIR CKPT [--overwrite]"
    if "-h" in argv or "--help" in argv:
        print(f"{usage}\n\n{__doc__.strip()}")
        sys.exit(0)
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if len(argv) != 3 or argv[0] not in ("export-hf", "import-hf"):
        print(usage, file=sys.stderr)
        sys.exit(2)
    cmd, source, target = argv
    with cli_errors(ValueError):  # a checkpoint or folder that cannot be used, a tokenizer the model cannot hold
        if cmd == "export-hf":
            ckpt = load_checkpoint(source)
            chat = is_chat_model(ckpt)
            tok = export_hf(model_from_checkpoint(ckpt), target, tokenizer=ckpt["tokenizer"], chat=chat)
            print(f"exported {source} to {target} ({'chat' if chat else 'pretrained'} model, tokenizer "
                  f"{tok.name}: config.json, generation_config.json, model.safetensors, "
                  "tokenizer.json, tokenizer_config.json, special_tokens_map.json)")
        else:
            model, tokenizer = import_hf(source)
            lineage = Lineage(history=[{"op": "import-hf", "from": source, "chat": hf_is_chat(source)}])
            save_checkpoint(make_checkpoint(model.state_dict(), model.config, tokenizer, lineage, step=0), target, overwrite=overwrite)
            print(f"imported {source} into {target} ({model.num_params(True):,} non-embedding parameters, tokenizer {tokenizer['name']})")


if __name__ == "__main__":
    main(sys.argv[1:])
