"""Tiny random Llama models with a real (small) BPE tokenizer, for tests and smoke runs.

SFT and DPO on such a model take seconds on a CPU, and vLLM serves it like any Llama.
The tokenizer is a byte-level BPE trained with `tokenizers` on the given texts (every
byte is in the alphabet, so any text tokenizes); a 49k vocabulary would make tests ~8x
slower, hence the small one. The chat template is ChatML, as SmolLM2's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

DEFAULT_CORPUS = [
    "Explain how photosynthesis works in simple terms.",
    "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Write a short poem about the sea at night.",
    "What are three tips for learning a new language?",
    "Practice every day, speak with native speakers, and read books you enjoy.",
    "Review the user's question and the corresponding response. Score: 0 1 2 3 4 5",
    "The response is relevant and answers the question clearly and helpfully. Score: 4",
    "Give me a recipe for a quick vegetable soup.",
    "Summarize the causes of the French Revolution in two sentences.",
    "How do I reverse a list in Python? Use reversed(items) or items[::-1].",
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Save a random LlamaForCausalLM + tokenizer + chat template into `out_dir` (fp32 safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(list(texts) if texts is not None else DEFAULT_CORPUS, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 1,
    init_std: float = 0.5,
    manifest: bool = True,
) -> Path:
    """Save a PEFT LoRA adapter (all linear layers) for the model in `base_dir` into `out_dir`.

    PEFT initialises B to zero (a no-op adapter); here B is drawn from N(0, init_std) with
    `seed`, so the adapter visibly changes the model's outputs (init_std=0 keeps the no-op).
    With `manifest`, writes manifest.json with the fields publishing reads
    (`selfreward.fingerprint.adapter_manifest_fields`: adapter_sha256, fingerprint, base_model).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * init_std)
    peft_model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if manifest:
        import json

        from selfreward.fingerprint import adapter_manifest_fields, compute_fingerprint

        peft_model.eval()
        fields = adapter_manifest_fields(out, compute_fingerprint(peft_model, tokenizer), base_dir)
        (out / "manifest.json").write_text(json.dumps({"name": out.name, **fields}, indent=2) + "\n")
    return out
