"""Ctrl-C during training. The first one asks the run to stop once the step in progress is done,
so that the checkpoint it then saves is one that a resumed run continues exactly (a step cut
short would leave dropout's random generator, or a half-applied update, behind). A second
Ctrl-C raises KeyboardInterrupt at once, as usual."""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """While active (a `with` block), the first SIGINT sets `requested` instead of raising.

    Python installs signal handlers from the main thread only; elsewhere Ctrl-C keeps its usual
    behaviour and `requested` stays False. A process told to ignore SIGINT (a background job of a
    script) goes on ignoring it.
    """

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        self.requested = self._installed = False
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return self
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; Python's own is the default.
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(
                "\nCtrl-C: stopping after this step and saving a checkpoint (press it again to stop at once, "
                "without saving)",
                file=sys.stderr,
                flush=True,
            )
