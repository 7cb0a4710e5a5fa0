"""Stop strings: generation ends before the first one, and none of it is
ever sent. Text that could be the start of a stop string is held back until
the next tokens show whether it is one."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns the text that is safe to send, and whether a stop was hit."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end: held text was not a stop string after all."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
