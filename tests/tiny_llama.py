"""A tiny random Llama (and byte-level BPE tokenizer) for the model-layer tests: no downloads, < 1 s."""

import torch

VOCAB = 300


def tiny_llama(seed: int = 0, layers: int = 2, dtype=torch.float32):
    """LlamaForCausalLM: hidden 64 (4 heads of 16, 2 KV heads), MLP 96, `layers` layers, vocab 300."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def tiny_tokenizer():
    """Byte-level BPE trained on a few prompt-like lines, so " Yes" and " No" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = ["#Question: would the user enjoy the movie? #Answer: Yes", "#Answer: No"] * 50
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
