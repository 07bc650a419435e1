"""Structured outputs: JSON grammars compiled by xgrammar, one matcher per sequence.

`Grammars` is made once per replica from the checkpoint's tokenizer. `matcher(format)`
compiles (xgrammar caches compiled grammars by schema text, up to `cache_bytes`) and
returns a fresh `GrammarState` for one sequence; any thread may call it (the service
calls it off the event loop, as compiling a large schema takes a while). A state is
then used by the engine thread only: `fill` writes the allowed tokens into the step's
bitmask row (xgrammar's layout, [ceil(V/32)] int32), `accept` advances it with the
sampled token.

The text of constrained output is what the grammar saw: each token's bytes
(`decode`), concatenated. For byte-level and SentencePiece vocabularies that is what
the tokenizer decodes to; WordPiece's decode instead joins words with spaces, so
for WordPiece vocabularies (the test checkpoints') a token is its piece with the
`##` continuation mark removed and no space: the JSON then has no whitespace, and
string values cannot contain spaces, but what is emitted is what was matched.
Token ids past the tokenizer's (padded embedding rows) are never allowed.
"""

from __future__ import annotations

import json

import numpy as np
import xgrammar as xgr

from runtime.messages import RequestError, ResponseFormat

DEFAULT_CACHE_BYTES = 64 * 2**20


def _wordpiece_vocab(tokenizer) -> list[str] | None:
    """Each token's text when output is concatenated, for a WordPiece tokenizer; else None."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(model).__name__ != "WordPiece":
        return None
    prefix = model.continuing_subword_prefix
    special = set(tokenizer.all_special_ids)
    vocab = [""] * len(tokenizer)  # "" marks a special token: xgrammar never allows one
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            vocab[token_id] = piece[len(prefix):] if piece.startswith(prefix) else piece
    return vocab


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, token_bytes: list[bytes]) -> None:
        self._matcher = matcher
        self._token_bytes = token_bytes

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """bitmask: [rows, ceil(V/32)] int32; writes row `row` (the tokens allowed next)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled against the grammar's bitmask")

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted its stop token: the output is complete."""
        return self._matcher.is_terminated()

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self._token_bytes[t] for t in token_ids).decode("utf-8", errors="replace")


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        wordpiece = _wordpiece_vocab(tokenizer)
        if wordpiece is not None:
            info = xgr.TokenizerInfo(wordpiece, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=[eos_token_id])
        else:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=[eos_token_id])
        self.vocab_size = vocab_size
        self._token_bytes = list(info.decoded_vocab) + [b""] * (vocab_size - len(info.decoded_vocab))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                             cache_limit_bytes=cache_bytes)

    def matcher(self, response_format: ResponseFormat) -> GrammarState:
        """A fresh state for one sequence. A schema xgrammar cannot compile is a RequestError
        naming `response_format`."""
        schema = (response_format.schema if response_format.kind == "json_schema"
                  else '{"type": "object"}')
        try:
            json.loads(schema)
            # No whitespace at all (compact separators): a model can otherwise pad with spaces
            # until max_tokens, and WordPiece vocabularies have no space token.
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False,
                                                          separators=(",", ":"))
        except Exception as error:  # noqa: BLE001: xgrammar raises several types for bad schemas
            raise RequestError(f"response_format.json_schema.schema: cannot be compiled to a "
                               f"grammar: {str(error).splitlines()[0][:300]}") from None
        return GrammarState(xgr.GrammarMatcher(compiled), self._token_bytes)
