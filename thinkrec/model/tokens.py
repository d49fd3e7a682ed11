"""Token ids the model needs: CF placeholders and the answer's first token.

Placeholders. `<UserID>` and `<ItemID>` are added to the tokenizer as special tokens (no lstrip/rstrip,
so the text around them tokenises as if they were absent), and the embedding matrix is NOT resized:
their ids may lie past the last embedding row, which is fine because `ThinkRecLM.forward` never looks
them up (it embeds id 0 there and overwrites the row with the projector's output). Not resizing keeps
the base model and its LM head exactly as shipped, so exported PEFT adapters load on the unmodified base
model (peft, vLLM), and the LM loss never sees logits for the new tokens. Input ids containing
placeholders must therefore always go through `ThinkRecLM.forward` with CF embeddings.

Answer token. The prompt ends in "#Answer:" and the answer is written " Yes" / " No" (with the space).
For byte-level BPE tokenizers (SmolLM2, Llama-3, Qwen2) " Yes" is one token and tokenising
"...#Answer: Yes" gives the prompt's ids followed by that token, while "Yes" without the space is a
different id that a model reading "#Answer:" rarely predicts. Measured on SmolLM2-135M-Instruct with a
movie prompt ending in '...begin your answer with "Yes" or "No".\\n#Answer:': " No" 14.21 (top 1),
" Yes" 13.70 (top 3), against "Yes" 7.86 and "No" 8.63 (ids " Yes" 9230, "Yes" 10539, " No" 2838).
So the Yes logit is the logit of " Yes" at the last prompt position.
"""

from tokenizers import AddedToken

from thinkrec.data.prompts import ITEM_PH, USER_PH

PLACEHOLDERS = (USER_PH, ITEM_PH)


def add_placeholder_tokens(tokenizer) -> dict:
    """Add <UserID>/<ItemID> (idempotent); returns {"<UserID>": id, "<ItemID>": id}."""
    new = [AddedToken(t, special=True, lstrip=False, rstrip=False, normalized=False)
           for t in PLACEHOLDERS if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDERS}
    for t, i in ids.items():
        if tokenizer.encode(f"a {t} b", add_special_tokens=False).count(i) != 1:
            raise ValueError(f"placeholder {t} does not tokenise to its single id {i}")
    return ids


def single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens {ids} for this tokenizer, "
                         f"the Yes/No head needs it to be exactly one token")
    return ids[0]


def answer_token_ids(tokenizer, tail: str = "#Answer:", yes: str = " Yes", no: str = " No"):
    """(yes_id, no_id): the first answer tokens after a prompt ending in `tail`, checked to be single
    tokens that also appear as such when the whole string "<tail><answer>" is tokenised."""
    yes_id, no_id = single_token_id(tokenizer, yes), single_token_id(tokenizer, no)
    head = tokenizer.encode(tail, add_special_tokens=False)
    for text, tid in ((yes, yes_id), (no, no_id)):
        joined = tokenizer.encode(tail + text, add_special_tokens=False)
        if joined != head + [tid]:
            raise ValueError(f"{tail + text!r} tokenises to {joined}, not the prompt's "
                             f"{head} + [{tid}] for {text!r}; the answer's first token would differ in training")
    return yes_id, no_id
