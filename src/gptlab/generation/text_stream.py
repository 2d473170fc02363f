"""Turning one sample's token ids into text pieces as they arrive.

Two things make this more than `decode(token)`: a byte-level token can end in the middle of
a UTF-8 character, and a stop string can span several tokens. A `TextStream` therefore holds
back text until it is certain: trailing bytes of an unfinished character, and a tail that
could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptlab.tokenizers.base import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what decoding makes of an unfinished UTF-8 character
CONTEXT_IDS = 4  # ids decoded along in front of new ones: SentencePiece renders a word's space by them
# An unfinished UTF-8 character is at most 3 bytes, which decode to one U+FFFD (bytes.decode) or
# one each (SentencePiece): only the last 3 characters of a text can be unfinished, the rest is final.
MAX_UNFINISHED_CHARS = 3
MAX_PENDING_IDS = 64  # text ending in U+FFFD for this many tokens is garbage: show it as it is


class TextStream:
    """The text of one sample, fed one token id at a time; each call returns only new text.

    Decoding is O(new tokens): each call decodes the ids not yet shown plus a few before them.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stopped = False  # a stop string was reached; nothing more comes out
        self._context: list[int] = []  # the last ids already shown
        self._context_len = 0  # len(decode(self._context))
        self._pending: list[int] = []  # ids whose text is not all shown yet
        self._shown = 0  # characters of the pending ids' text already shown
        self._held = ""  # decoded text that could be the start of a stop string
        self._set_context(list(context_ids))

    def push(self, token: int) -> str:
        """Add one generated id; return the text that is now certain (maybe "")."""
        if self.stopped:
            return ""
        self._pending.append(token)
        text = self._pending_text()
        trailing = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
        if trailing and len(self._pending) < MAX_PENDING_IDS:  # maybe an unfinished character
            hold_from = max(len(text) - min(trailing, MAX_UNFINISHED_CHARS), self._shown)
            new, self._shown = text[self._shown : hold_from], hold_from  # show what is before it, and wait
            return self._release(new, final=False)
        new = text[self._shown :]
        self._set_context(self._context + self._pending)
        self._forget_pending()
        return self._release(new, final=False)

    def finish(self) -> str:
        """The sample is over: return whatever text was held back."""
        if self.stopped:
            return ""
        new = self._pending_text()[self._shown :]
        self._forget_pending()
        return self._release(new, final=True)

    def _forget_pending(self) -> None:
        self._pending, self._shown = [], 0

    def _pending_text(self) -> str:
        return self.tokenizer.decode(self._context + self._pending)[self._context_len :]

    def _set_context(self, ids: list[int]) -> None:
        self._context = ids[-CONTEXT_IDS:]
        self._context_len = len(self.tokenizer.decode(self._context))

    def _release(self, text: str, final: bool) -> str:
        """Append text; return the part before any stop string, holding back a possible start."""
        buffer = self._held + text
        found = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return buffer[: min(found)]
        held = 0 if final else self._stop_prefix_len(buffer)
        self._held = buffer[len(buffer) - held :] if held else ""
        return buffer[: len(buffer) - held]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
