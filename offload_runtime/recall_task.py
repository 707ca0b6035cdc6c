"""The long-range recall task: documents in which spans planted early must be copied late.

A document is filler (a Markov chain over 64 filler words: locally predictable, like text)
with records planted in it: `<r> s s ... s </r>`, 8 to 16 symbols drawn, without
replacement within a document, from 128 record symbols. A record may appear again later
(a recall): its first two symbols identify it, so the rest can only be predicted by finding
the earlier copy, however far back. That is what makes a retrieval cache matter: the L2
level over a few percent of the context predicts a recall only if it kept the record's
chunks. `recall-320K` (assets/) was trained on it by `train_recall.py`; the retrieval
benchmark (bench/retrieval_bench.py) and the tests build their prompts here.

Training has two stages: short samples of a record and its nearby recall (the induction
circuit forms), then samples of 256 tokens whose position ids jump forward at a few random
points before a record (PoSE, Zhu et al. 2023), so the model meets every distance up to
MAX_CONTEXT between a record and its recall without training at that length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

SPECIALS = ["<s>", "</s>", "<r>", "</r>"]
N_FILLER, N_SYMBOLS = 64, 128
FILLER = [f"w{i}" for i in range(N_FILLER)]
SYMBOLS = [f"s{i}" for i in range(N_SYMBOLS)]
VOCAB = SPECIALS + FILLER + SYMBOLS
BOS, EOS, OPEN, CLOSE = 0, 1, 2, 3
FIRST_FILLER, FIRST_SYMBOL = len(SPECIALS), len(SPECIALS) + N_FILLER
RECORD_LEN = (8, 16)  # symbols per record, inclusive
CUE = 2  # symbols of a record given in a recall's cue
MAX_CONTEXT = 16384
_SUCCESSORS = (0.6, 0.3, 0.1)  # probabilities of a filler word's three successors


def _filler_chain(seed: int = 1234) -> list[list[int]]:
    """Each filler word's three successors (token ids), fixed for the task."""
    rng = random.Random(seed)
    return [[FIRST_FILLER + rng.randrange(N_FILLER) for _ in _SUCCESSORS] for _ in range(N_FILLER)]


CHAIN = _filler_chain()


def filler(rng: random.Random, n: int) -> list[int]:
    """n filler tokens continuing the chain from a random word."""
    out, word = [], FIRST_FILLER + rng.randrange(N_FILLER)
    for _ in range(n):
        word = rng.choices(CHAIN[word - FIRST_FILLER], _SUCCESSORS)[0]
        out.append(word)
    return out


def record(body: list[int]) -> list[int]:
    return [OPEN] + body + [CLOSE]


@dataclass
class Document:
    tokens: list[int]
    records: list[tuple[int, list[int]]]  # (position of its <r>, its symbols)


def document(rng: random.Random, n_tokens: int, n_records: int | None = None) -> Document:
    """A document of n_tokens: filler with `n_records` records (default: as many as the symbols allow)
    spread evenly through it, their symbols unique within the document (a recall has one source)."""
    symbols = list(range(FIRST_SYMBOL, FIRST_SYMBOL + N_SYMBOLS))
    rng.shuffle(symbols)
    n_records = n_records or N_SYMBOLS // RECORD_LEN[1]
    gap = n_tokens // n_records
    tokens, records = [BOS], []
    for i in range(n_records):
        body, symbols = symbols[:rng.randint(*RECORD_LEN)], symbols[RECORD_LEN[1]:]
        tokens += filler(rng, max(0, i * gap + rng.randint(0, gap // 2) - len(tokens)))
        records.append((len(tokens), body))
        tokens += record(body)
    tokens += filler(rng, n_tokens - len(tokens))
    return Document(tokens[:n_tokens], [r for r in records if r[0] + len(r[1]) + 2 <= n_tokens])


def recall_prompt(doc: Document, rng: random.Random, min_distance: int) -> tuple[list[int], list[int]]:
    """(prompt, expected continuation): the document, then the cue of a record planted at least
    `min_distance` tokens before the cue; the continuation is the rest of the record and `</r>`."""
    far = [r for r in doc.records if len(doc.tokens) - r[0] >= min_distance]
    if not far:
        raise ValueError(f"no record at least {min_distance} tokens back in a {len(doc.tokens)}-token document")
    _, body = rng.choice(far)
    return doc.tokens + [OPEN] + body[:CUE], body[CUE:] + [CLOSE]


def induction_sample(rng: random.Random, length: int = 66) -> list[int]:
    """A first-stage training sample: a record and, a few random filler words later, its recall. Dense,
    nearby copies let the induction circuit (a previous-token head, then a head matching on it) form
    in minutes; training_sample then stretches it across the context."""
    body = rng.sample(range(FIRST_SYMBOL, FIRST_SYMBOL + N_SYMBOLS), RECORD_LEN[1])
    noise = [[FIRST_FILLER + rng.randrange(N_FILLER) for _ in range(rng.randint(0, 16))] for _ in range(2)]
    tokens = [BOS] + noise[0] + record(body) + noise[1] + record(body)
    return (tokens + filler(rng, length))[:length]


def training_sample(rng: random.Random, length: int = 256, jumps: int = 3, max_context: int = MAX_CONTEXT,
                    gap: tuple[int, int] = (4, 40), recall: float = 0.6) -> tuple[list[int], list[int]]:
    """(tokens, position ids) of one training sample: records and their recalls in filler, with
    position ids that jump forward at `jumps` random points (PoSE) to reach up to max_context."""
    symbols = list(range(FIRST_SYMBOL, FIRST_SYMBOL + N_SYMBOLS))
    rng.shuffle(symbols)
    tokens, seen, breaks = [BOS], [], []
    while len(tokens) < length:
        tokens += filler(rng, rng.randint(*gap))
        if rng.random() < 0.3:
            breaks.append(len(tokens))  # a jump may fall here, between filler and a record
        if seen and (rng.random() < recall or len(symbols) < RECORD_LEN[1]):
            body = rng.choice(seen)  # a recall
        else:
            n = rng.randint(*RECORD_LEN)
            body, symbols = symbols[:n], symbols[n:]
            seen.append(body)
        tokens += record(body)
    tokens = tokens[:length]
    cuts = sorted(rng.sample(breaks, min(jumps, len(breaks))))
    room = max_context - length
    gaps = sorted(rng.randint(0, room) for _ in cuts)
    gaps = [b - a for a, b in zip([0] + gaps, gaps)]  # jump sizes adding up to at most room
    positions, shift, k = [], 0, 0
    for i in range(length):
        while k < len(cuts) and cuts[k] == i:
            shift += gaps[k]
            k += 1
        positions.append(i + shift)
    return tokens, positions


def copy_mask(tokens: list[int]) -> list[bool]:
    """Which positions a model can predict only by copying: record symbols seen before in the
    sequence, but the first of a recall (which record is recalled is not predictable)."""
    seen, out = set(), []
    for i, t in enumerate(tokens):
        out.append(t >= FIRST_SYMBOL and t in seen and tokens[i - 1] != OPEN)
        seen.add(t)
    return out


def tokenizer() -> Any:
    """The task's word-level tokenizer (one token per word, space-separated), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>")
