"""Progress of the long steps of ``hotmodel setup``, read from the tools' own output.

Building llama-server takes minutes (about 12 on 2 cores) and downloading the
models takes a while on a slow line; a single "building ..." line for all that
time looks like a hang. cmake already says how far it is: the Makefile
generator prefixes its lines with ``[ 37%]``, Ninja with ``[123/456]``. This
module turns those into a progress line with the time elapsed and a linear
estimate of the time left, printed on each change of the percentage but at
most every few seconds (two cores compile a file every second or so: a line
each would bury the screen), plus a heartbeat when nothing changes for a
while (MSBuild prints no percentage at all). The last lines are kept, so a
failed build can show why without sending the user to the log file. pip's
own download lines (which carry the size) are relayed the same way.

Everything here is pure but for the clock, which tests replace.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Log = Callable[[str], None]

TAIL_LINES = 40
MIN_INTERVAL_S = 3.0  # at most one progress line this often
HEARTBEAT_S = 30.0  # a line at least this often, even when the percentage stands still

_MAKE_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]")
_NINJA_COUNT = re.compile(r"^\[(\d+)/(\d+)\]")
# pip's lines that say what is fetched and how big it is ("Downloading x.whl (23.4 MB)").
_PIP_SHOWN = ("Collecting ", "Downloading ", "Using cached ", "File was already downloaded ")


def parse_percent(line: str) -> float | None:
    """The build's completion in percent announced by one line of cmake's output, if any."""
    if match := _MAKE_PERCENT.match(line):
        return float(min(int(match.group(1)), 100))
    if match := _NINJA_COUNT.match(line):
        done, total = int(match.group(1)), int(match.group(2))
        return 100.0 * min(done, total) / total if total else None
    return None


def estimate_left(percent: float, elapsed_s: float) -> float | None:
    """Seconds left if the rest goes at the pace so far (None: too early to say)."""
    if percent < 1.0 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s * (100.0 - percent) / percent)


def format_duration(seconds: float) -> str:
    """``42s``, ``4m 05s`` or ``1h 02m``: short enough for one progress line."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def progress_line(label: str, percent: float | None, elapsed_s: float) -> str:
    """One line: what runs, how far it is, for how long, and about how long it still takes."""
    elapsed = format_duration(elapsed_s)
    if percent is None:
        return f"  {label}: {elapsed} elapsed"
    left = estimate_left(percent, elapsed_s)
    guess = "estimating time left" if left is None else f"about {format_duration(left)} left"
    return f"  {label}: {percent:3.0f}%  {elapsed} elapsed, {guess}"


def pip_line_to_show(line: str) -> str | None:
    """The pip output line worth relaying (what is fetched, and its size), else None."""
    text = line.strip()
    return f"  {text}" if text.startswith(_PIP_SHOWN) else None


@dataclass
class StepProgress:
    """Follows one long-running tool through its output lines.

    ``feed`` every line and ``tick`` now and then: it keeps the last
    :data:`TAIL_LINES` for an error message, and calls ``log`` with a progress
    line when the percentage moved (at most every ``min_interval_s``) or
    nothing was said for ``heartbeat_s``.
    With ``relay``, the lines it selects are passed on as they come (pip's
    download sizes).
    """

    label: str
    log: Log
    relay: Callable[[str], str | None] | None = None
    clock: Callable[[], float] = time.monotonic
    min_interval_s: float = MIN_INTERVAL_S
    heartbeat_s: float = HEARTBEAT_S
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    percent: float | None = None
    started: float = field(init=False)
    _last_said: float = field(init=False)
    _said_percent: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.started = self._last_said = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def feed(self, line: str) -> None:
        """One line of the tool's output."""
        line = line.rstrip("\r\n")
        self.tail.append(line)
        if self.relay is not None and (shown := self.relay(line)) is not None:
            self.log(shown)
            self._last_said = self.clock()
            return
        if (percent := parse_percent(line)) is not None:
            self.percent = percent
        self.tick()

    def tick(self) -> None:
        """Say how far it is if that is due; also called while the tool is silent (a long
        link step, a big download), so the heartbeat never stops."""
        now = self.clock()
        moved = self.percent is not None and self.percent != self._said_percent
        since = now - self._last_said
        if (moved and since >= self.min_interval_s) or since >= self.heartbeat_s:
            self.log(progress_line(self.label, self.percent, now - self.started))
            self._last_said = now
            self._said_percent = self.percent

    def tail_text(self) -> str:
        return "\n".join(self.tail)
