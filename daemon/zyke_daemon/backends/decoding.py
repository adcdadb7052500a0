"""The decode loop both backends share: mask, pick, feed the grammar, stream, stop.

A backend only supplies two things: the logits for the next token, and a way to append a token.
Everything that defines *what* gets generated (the llguidance grammar from the reply schema, greedy
or seeded sampling, the repeat penalty, the no-repeat n-gram ban over the say line, max_tokens,
cancellation, streaming of decoded text) lives here once, so llama.cpp and transformers behave the
same for the same request.

Why a loop of our own rather than each library's sampler: llama-cpp-python's GBNF sampler scans
all 262,144 tokens of Gemma 3's vocabulary each step (decoding falls to about a third of its speed);
llguidance computes the allowed-token mask incrementally in about 1 ms, and with the two tricks in
``decode`` the constrained loop runs at the speed of raw llama.cpp (``tools/bench/run.py``).
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from functools import lru_cache

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from zyke.prompt_format import ITEM_SEPARATOR, KEY_SEPARATOR

from ..reply_stream import _string_body
from ..safety import Matcher
from .base import FinishReason, GenerationRequest, GenerationResult, OnText


@lru_cache(maxsize=64)
def compile_schema(schema_json: str) -> str:
    """llguidance grammar for a reply schema, written with the separators prompt_format renders.

    Keyed by the schema JSON as built (never key-sorted: property order is the order the model writes)."""
    schema = json.loads(schema_json)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                            "key_separator": KEY_SEPARATOR}
    return LLMatcher.grammar_from_json_schema(schema)


#: How every reply begins: ``say`` is the reply schema's first key (prompt_format renders it first and
#: the grammar has no free whitespace). The no-repeat ban applies from the character after it to the
#: say string's closing quote.
SAY_OPENING = '{"say"' + KEY_SEPARATOR + '"'

NgramTable = dict[tuple[int, ...], set[int]]


def say_token_ids(tokenizer: LLTokenizer, say: str) -> list[int]:
    """An earlier say line as tokens, the way it sits in the prompt between its quotes: JSON-escaped
    (a quote in the line is ``\\"``, as ``render_reply`` writes it and as the grammar makes the model
    write it) and tokenized alone, without BOS, by the backend's own tokenizer (llguidance's
    ``tokenize_str`` calls it). Alone, not cut out of the whole rendered prompt: the model writes a
    line it copies with the tokens the line has on its own, and a first token fused with the opening
    quote only costs the one n-gram it starts."""
    return list(tokenizer.tokenize_str(json.dumps(say, ensure_ascii=False)[1:-1]))


def ngram_table(sequences: Iterable[Sequence[int]], n: int) -> NgramTable:
    """Every n-gram of the sequences, as ``{first n-1 tokens: {tokens that followed them}}``."""
    table: NgramTable = {}
    for seq in sequences:
        for i in range(len(seq) - n + 1):
            table.setdefault(tuple(seq[i:i + n - 1]), set()).add(seq[i + n - 1])
    return table


class SayNgramBan:
    """transformers' ``no_repeat_ngram_size`` for the say line, over the NPC's earlier say lines too.

    A greedy 270M model given its previous reply in the prompt copies it on the next turn; a repeat
    penalty (per token, over this reply only) cannot stop that, and retrying would cost a whole reply.
    So at each step inside the say string, any token that would complete an ``n``-token run found in
    an earlier say line, or earlier in this one (so it cannot loop on itself either), is taken out of
    the grammar's mask before picking. The table is built once per request; ``push`` adds this reply's
    own n-grams as it goes, so a step costs one tuple and one dict lookup.
    """

    def __init__(self, n: int, history: Iterable[Sequence[int]]) -> None:
        if n < 1:
            raise ValueError("no_repeat_ngram must be at least 1 (0 means no ban object at all)")
        self.n = n
        self.table = ngram_table(history, n)
        self.say: list[int] = []  # this reply's say tokens so far

    def banned(self) -> set[int]:
        """Tokens that would complete an n-gram already seen, given this reply's say tokens so far."""
        if len(self.say) < self.n - 1:
            return set()
        return self.table.get(tuple(self.say[len(self.say) - self.n + 1:]), set())

    def push(self, token: int) -> None:
        """Record a say token of this reply, and the n-gram it completes."""
        self.say.append(token)
        if len(self.say) >= self.n:
            self.table.setdefault(tuple(self.say[len(self.say) - self.n:-1]), set()).add(token)

    def apply(self, bitmask: np.ndarray) -> bool:
        """Clear the banned tokens from llguidance's packed mask, unless no token would be left allowed
        (the grammar comes first: the reply must stay valid). Returns whether anything was banned."""
        banned = self.banned()
        if not banned:
            return False
        words = bitmask.view(np.uint32)
        saved = {t >> 5: words[t >> 5] for t in banned if t >> 5 < words.size}
        for t in banned:
            if t >> 5 < words.size:
                words[t >> 5] &= ~np.uint32(1 << (t & 31))
        if not words.any():
            for i, word in saved.items():
                words[i] = word
            return False
        return True


#: Words in a run the say line may not share with an earlier line (or repeat within itself).
NO_REPEAT_WORDS = 5
#: Candidates the word guard moves past at one step before it lets the best one stand.
WORD_GUARD_TRIES = 8
_APOSTROPHES = {True: re.compile(r"['\u2019]\s*"), False: re.compile(r"['\u2019]")}
_NON_WORD = re.compile(r"[^0-9a-z]+")


def complete_words(text: str, join: bool = True) -> list[str]:
    """The finished words of a line, normalised so that respellings count as the same words: lower case,
    apostrophes dropped, punctuation ignored; with ``join`` a space after an apostrophe goes too ("Don' t"
    and "don't" are both "dont"; without it "Don' t" and "Don t" are both "don t"). A last word that the
    text has not ended yet is left out."""
    flat = _APOSTROPHES[join].sub("", text.lower())
    words = [w for w in _NON_WORD.split(flat) if w]
    if words and flat and _NON_WORD.fullmatch(flat[-1]) is None:
        words.pop()
    return words


class SayWordGuard:
    """The no-repeat rule on words, next to ``SayNgramBan`` on tokens.

    A token ban is blind to respelling: banned from ``miller``, ``'s``, the model wrote ``miller``, ``'``,
    ``s`` and said the same line again (measured with ``zyke-train converse``). So at each step inside the
    say string, the picked token is checked: if it finishes a word that completes an ``n``-word run of an
    earlier say line (or of this line so far), it is set aside and the next best allowed token is taken,
    up to ``WORD_GUARD_TRIES`` times. It only looks at the chosen tokens, so it is the same on every path.
    """

    def __init__(self, n: int, history: Iterable[str]) -> None:
        self.n = n
        says = list(history)
        #: the earlier lines' runs under both apostrophe readings, so no respelling of them passes
        self.seen = {join: {tuple(ws[i:i + n]) for say in says for ws in [complete_words(say, join)]
                            for i in range(len(ws) - n + 1)} for join in (True, False)}

    def repeats(self, before: str, after: str) -> bool:
        """Whether going from ``before`` to ``after`` finishes a word that completes a banned run."""
        return any(self._repeats(before, after, join) for join in (True, False))

    def _repeats(self, before: str, after: str, join: bool) -> bool:
        old, new = complete_words(before, join), complete_words(after, join)
        if len(new) <= len(old) or len(new) < self.n:
            return False
        seen = self.seen[join]  # not copied: this runs at every step of the say line
        own = {tuple(old[i:i + self.n]) for i in range(len(old) - self.n + 1)}
        return any(gram in seen or gram in own
                   for gram in (tuple(new[end - self.n:end]) for end in range(max(len(old) + 1, self.n), len(new) + 1)))


class SayScanner:
    """Where the reply's text stands relative to its say string, fed the decoded text piece by piece:
    ``inside`` from just after ``SAY_OPENING`` until the string's closing (unescaped) quote. A reply
    that does not begin with ``SAY_OPENING`` (another schema) is never inside."""

    def __init__(self) -> None:
        self._matched = 0
        self._escaped = False
        self.inside = False
        self.done = False

    def feed(self, piece: str) -> None:
        for ch in piece:
            if self.done:
                return
            if not self.inside:
                if ch != SAY_OPENING[self._matched]:
                    self.done = True
                    return
                self._matched += 1
                self.inside = self._matched == len(SAY_OPENING)
            elif self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self.inside, self.done = False, True


#: Candidates the safety rail moves past at one step before it ends the line where it stands instead.
CONTENT_GUARD_TRIES = 64


class SayContentGuard:
    """The safety rail while decoding (``zyke_daemon.safety``): no token may put a blocked term in the say line.

    Like ``SayWordGuard`` it judges only the picked token: the line so far plus the token's text,
    JSON-unescaped, is checked by the request's ``Matcher`` with its last word judged as unfinished, so
    an offending word is rejected the moment it appears (the token is set aside and the next best allowed
    one taken), never after it was streamed. A word that is only clean as the start of an allowlisted
    word ("ass" before "assassin"), or a masked word still open ("f*"), is *held*: accepted, but streamed
    only once a later token shows what it became. Judging chosen tokens only keeps it identical alone,
    batched and cached, and on both backends.
    """

    def __init__(self, matcher: Matcher, raw: bool = False) -> None:
        self.matcher = matcher
        self.blocks: dict[str, int] = {}
        #: judge the text as it is (a completion's whole output) rather than as a JSON string body
        self.raw = raw

    def judge(self, after_raw: str) -> tuple[str | None, bool]:
        """``(category, hold)`` for the say string's raw JSON text so far ending with the candidate token:
        the category it trips (None: clean), and whether its text must wait before being streamed."""
        text, closed = (after_raw, False) if self.raw else say_text(after_raw)
        hit = self.matcher.check(text, final=closed)
        if hit is not None:
            return hit, False
        return None, not closed and self.matcher.may_hold(text) and self.matcher.check(text, final=True) is not None

    def count(self, category: str) -> None:
        self.blocks[category] = self.blocks.get(category, 0) + 1


def say_text(raw: str) -> tuple[str, bool]:
    """The say string's text from its raw JSON body (an escape not yet complete is left out), and whether
    the closing quote is in ``raw``."""
    body, closed = _string_body(raw)
    try:
        return json.loads(f'"{body}"'), closed
    except json.JSONDecodeError:
        return body, closed


class SequenceDecoder:
    """One reply, one step at a time: the state of the decode loop without the loop, so that a backend
    can advance several replies in one model call (``LlamaCppBackend.run_batch``).

    ``step(logits, fast_forward)`` takes the logits for the next position and returns the tokens to
    evaluate next (the picked token, plus the grammar's forced tokens when ``fast_forward``), or None
    when the reply is finished; ``result()`` then describes it.
    """

    def __init__(self, request: GenerationRequest, tokenizer: LLTokenizer, n_vocab: int, eos: set[int],
                 token_bytes: Callable[[int], bytes], on_text: OnText, prompt_tokens: int, cached_tokens: int,
                 started: float) -> None:
        self.request, self._n_vocab, self._eos = request, n_vocab, eos
        self._token_bytes, self._on_text = token_bytes, on_text
        self._prompt_tokens, self._cached_tokens, self._started = prompt_tokens, cached_tokens, started
        #: None: free text (no schema), every token allowed
        self._matcher: LLMatcher | None = None
        if request.schema is not None:
            self._matcher = LLMatcher(tokenizer, compile_schema(json.dumps(request.schema)))
            if self._matcher.is_error():
                raise RuntimeError(f"reply schema did not compile: {self._matcher.get_error()}")
        self._bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        if self._matcher is None:
            self._bitmask[:] = -1
        self._mask_ready = False
        self._rng = np.random.default_rng(request.seed)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._say = SayScanner()
        self._ban: SayNgramBan | None = None
        self._guard: SayWordGuard | None = None
        if request.no_repeat_ngram > 0:
            self._ban = SayNgramBan(request.no_repeat_ngram,
                                    [say_token_ids(tokenizer, say) for say in request.history_says])
            self._guard = SayWordGuard(NO_REPEAT_WORDS, request.history_says)
        self._whole = request.guard_whole_text  # the rails judge every token, not only the say string's
        self._content = SayContentGuard(request.safety, raw=self._whole) if request.safety is not None else None
        self._hold = False  # the token being emitted must wait (see SayContentGuard)
        self._held: list[str] = []
        self.generated: list[int] = []
        self._text: list[str] = []
        self._ttft = 0.0
        self._finish: FinishReason = "length"
        self.done = False

    def compute_mask(self) -> None:
        """The allowed tokens for the next position; depends only on the tokens chosen so far, so it may
        run while the model evaluates them."""
        if self._matcher is not None:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._mask_ready = True

    def check_cancel(self) -> bool:
        if not self.done and self.request.cancel.is_set():
            self._finish, self.done = "cancelled", True
        return self.done

    def step(self, logits: np.ndarray, fast_forward: bool = True) -> list[int] | None:
        if self.check_cancel() or self._stop_if(len(self.generated) >= self.request.max_tokens, "length"):
            return None
        if not self._mask_ready:
            self.compute_mask()
        self._mask_ready = False
        if self._ban is not None and self._say.inside:
            self._ban.apply(self._bitmask)
        logits = logits[: self._n_vocab]
        if self.request.repeat_penalty != 1.0 and self.generated:
            logits = penalize_repeats(logits, self.generated, self.request.repeat_penalty)
        token = pick(logits, self._bitmask, self._n_vocab, self.request, self._rng)
        if (self._guard is not None or self._content is not None) and (self._say.inside or self._whole):
            guarded = self._guarded(token, logits)
            if guarded is None:  # the rail found no clean token: the line ends here, as max_tokens would end it
                self._stop_if(True, "length")
                return None
            token = guarded
        if not self.generated:
            self._ttft = time.perf_counter() - self._started
        if self._stop_if(token in self._eos, "stop"):
            return None
        feed = [token]
        keep_going = self._emit(token)
        matcher = self._matcher
        if fast_forward and keep_going and matcher is not None and not matcher.is_stopped():
            for forced in matcher.compute_ff_tokens()[: self.request.max_tokens - len(self.generated)]:
                if forced in self._eos or self._forced_blocked(forced):
                    break
                feed.append(forced)
                if not (keep_going := self._emit(forced)) or matcher.is_stopped():
                    break
        if self._stop_if((matcher is not None and matcher.is_stopped()) or not keep_going, "stop"):
            return None
        if self._stop_if(len(self.generated) >= self.request.max_tokens, "length"):
            return None
        return feed

    def result(self) -> GenerationResult:
        return GenerationResult(text="".join(self._text), finish_reason=self._finish,
                                prompt_tokens=self._prompt_tokens, completion_tokens=len(self.generated),
                                cached_tokens=self._cached_tokens, ttft_s=self._ttft,
                                total_s=time.perf_counter() - self._started, tokens=list(self.generated),
                                safety_blocks=dict(self._content.blocks) if self._content is not None else {})

    def _guarded(self, token: int, logits: np.ndarray) -> int | None:
        """``token``, or the next best allowed one when it would put a blocked term in the line (the safety
        rail: never let stand; None when no clean token is found) or finish a repeated run of words (the
        no-repeat rule: the best one stands after ``WORD_GUARD_TRIES``)."""
        before = "".join(self._text) if self._whole else "".join(self._text)[len(SAY_OPENING):]
        mask: np.ndarray | None = None
        ranked: list[int] | None = None  # greedy: the allowed tokens best first, ranked once at the first miss
        tries = CONTENT_GUARD_TRIES if self._content is not None else WORD_GUARD_TRIES
        self._hold = False
        for attempt in range(tries):
            after = before + self._token_bytes(token).decode("utf-8", errors="ignore")
            hit, hold = self._content.judge(after) if self._content is not None else (None, False)
            if hit is None:
                if self._guard is None or attempt >= WORD_GUARD_TRIES or not self._guard.repeats(before, after):
                    self._hold = hold
                    return token
            else:
                assert self._content is not None
                self._content.count(hit)
            if self.request.temperature <= 0:
                # what re-picking under a mask without the set-aside tokens would give, without unpacking the
                # 262,144-entry mask once per miss: the next one down the ranking (ties: lowest id, as argmax)
                if ranked is None:
                    candidates = allowed_tokens(self._bitmask, self._n_vocab)
                    ranked = [int(t) for t in candidates[np.argsort(-logits[candidates], kind="stable")[:tries + 1]]]
                    ranked.reverse()  # popped from the end, best first
                while ranked and ranked[-1] == token:
                    ranked.pop()
                if not ranked:
                    return token if hit is None else None
                token = ranked.pop()
                continue
            if mask is None:
                mask = self._bitmask.copy()
            mask.view(np.uint32)[token >> 5] &= ~np.uint32(1 << (token & 31))
            if not mask.any():
                return token if hit is None else None
            token = pick(logits, mask, self._n_vocab, self.request, self._rng)
        return None if self._content is not None else token

    def _forced_blocked(self, token: int) -> bool:
        """Whether a token the grammar forces would write a blocked term into a completion's text (the rail on the
        whole text only: an NPC's say string is free text, not forced). Then it is not fast-forwarded: the next
        step picks it through the rail, which refuses it and ends the text there if nothing else is allowed."""
        if self._content is None or not self._whole:
            return False
        after = "".join(self._text) + self._token_bytes(token).decode("utf-8", errors="ignore")
        return self._content.judge(after)[0] is not None

    def _stop_if(self, condition: bool, reason: FinishReason) -> bool:
        if condition:
            self._finish, self.done = reason, True
        return condition

    def _emit(self, token: int) -> bool:
        if self._matcher is not None and not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self._matcher.get_error()}")
        self.generated.append(token)
        if self._ban is not None and self._say.inside:  # chosen inside the say string: one of its tokens
            self._ban.push(token)
        piece = self._utf8.decode(self._token_bytes(token))
        self._text.append(piece)
        if not self._say.done:
            self._say.feed(piece)
        if self._hold:  # not streamed yet: a later token shows what the word became (SayContentGuard)
            self._hold = False
            self._held.append(piece)
            return True
        if self._held:
            piece = "".join(self._held) + piece
            self._held.clear()
        return self._on_text(piece) if piece else True


def decode(
    request: GenerationRequest,
    tokenizer: LLTokenizer,
    n_vocab: int,
    eos: set[int],
    next_logits: Callable[[], np.ndarray],
    advance: Callable[[list[int]], None],
    token_bytes: Callable[[int], bytes],
    on_text: OnText,
    prompt_tokens: int,
    cached_tokens: int,
    started: float,
    executor: Executor | None = None,
    fast_forward: bool = True,
) -> GenerationResult:
    """Generate one constrained reply. ``next_logits`` must return float32 logits of length >= n_vocab
    for the position after everything advanced so far (the prompt has already been evaluated);
    ``advance`` evaluates one or more tokens in one model call.

    Two things make the grammar nearly free:

    * **Forced tokens are not sampled.** Where the schema allows only one continuation (``", "emotion":
      "``, the rest of an enum value once its first token picks it) llguidance's ``compute_ff_tokens``
      returns it as tokens; they are appended without asking the model and evaluated together with
      the sampled token in one model call, so a reply costs fewer model calls than it has tokens.
    * **The next mask is computed while the model runs.** Given an ``executor``, ``advance`` runs on
      its thread (llama.cpp releases the GIL) while this thread computes the mask for the next step,
      which depends only on the tokens already chosen.
    """
    seq = SequenceDecoder(request, tokenizer, n_vocab, eos, token_bytes, on_text, prompt_tokens, cached_tokens,
                          started)
    while (feed := seq.step(next_logits(), fast_forward)) is not None:
        if executor is None:
            advance(feed)
        else:
            running = executor.submit(advance, feed)
            seq.compute_mask()
            running.result()
    return seq.result()


def is_allowed(bitmask: np.ndarray, token: int) -> bool:
    return bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


def allowed_tokens(bitmask: np.ndarray, n_vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n_vocab])


def pick(logits: np.ndarray, bitmask: np.ndarray, n_vocab: int, request: GenerationRequest,
         rng: np.random.Generator) -> int:
    """The next token among those the grammar allows (``bitmask``: llguidance's packed mask).

    Greedy first tries the unconstrained argmax: when the grammar allows it (most tokens of the spoken
    line), it is the constrained argmax too, and the 262,144-entry mask is never unpacked."""
    if request.temperature <= 0:
        best = int(np.argmax(logits))
        if is_allowed(bitmask, best):
            return best
        candidates = allowed_tokens(bitmask, n_vocab)
        return int(candidates[np.argmax(logits[candidates])])
    allowed = np.zeros(n_vocab, dtype=bool)
    allowed[allowed_tokens(bitmask, n_vocab)] = True
    return sample(logits, allowed, request.temperature, request.top_p, request.top_k, rng)


def penalize_repeats(logits: np.ndarray, generated: list[int], penalty: float, window: int = 64) -> np.ndarray:
    """llama.cpp's repeat penalty over this reply's recent tokens: a small greedy model otherwise
    loops on one sentence until max_tokens ("I'm sorry, I can't repair your sword. I'm sorry, ...")."""
    recent = np.unique(np.asarray(generated[-window:]))
    out = np.array(logits, dtype=np.float32, copy=True)
    values = out[recent]
    out[recent] = np.where(values > 0, values / penalty, values * penalty)
    return out


def sample(logits: np.ndarray, allowed: np.ndarray, temperature: float, top_p: float, top_k: int,
           rng: np.random.Generator) -> int:
    """Temperature, top-k and top-p sampling over the allowed tokens, reproducible for a given rng."""
    candidates = np.flatnonzero(allowed)
    scores = logits[candidates].astype(np.float64) / temperature
    if 0 < top_k < candidates.size:
        keep = np.argpartition(scores, -top_k)[-top_k:]
        candidates, scores = candidates[keep], scores[keep]
    order = np.argsort(scores)[::-1]
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        candidates, probs = candidates[:cut], probs[:cut] / probs[:cut].sum()
    return int(candidates[rng.choice(candidates.size, p=probs)])
