"""Structured logging: one line per event, ``event=NAME key=value ...``.

Values are quoted when they contain spaces. Callers never pass key material; the
:class:`SecurityAssociation` repr hides keys anyway.
"""

from __future__ import annotations

import logging
import sys


def _fmt(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' \t"='):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def event(logger: logging.Logger, name: str, *args: int, **fields: object) -> None:
    """Log event ``name``; an optional positional argument is the level (default INFO)."""
    level = args[0] if args else logging.INFO
    if logger.isEnabledFor(level):
        parts = [f"event={name}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]
        logger.log(level, " ".join(parts))


LOG_LEVELS = ("debug", "info", "warning", "error")  # [log] level, --log-level


# Control characters as escapes: what a peer sends (an identity, a reason) can neither end
# a line and forge the next one nor move an operator's terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r"}
# and the C1 controls (U+0085 ends a line for str.splitlines, U+009B starts a terminal's
# control sequence), the line and paragraph separators and the bidirectional overrides
# (a certificate's subject is any Unicode: they made an identity read as another one)
UNICODE_CONTROLS = (
    *range(0x80, 0xA0), 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ESCAPES |= {c: f"\\u{c:04x}" for c in UNICODE_CONTROLS}


def escaped(text: str) -> str:
    """``text`` with its control characters as escapes (as log lines have them): for what a
    peer or etcd chose, printed to an operator's terminal."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, control characters escaped (a traceback, which
    only a bug logs, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def setup(level: str = "info", *, stream: object = None) -> None:
    root = logging.getLogger("ipsecct")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_ipsecct", False) for h in root.handlers):
        h = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        h.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        h._ipsecct = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


class RateLimited:
    """At most ``burst`` log lines per ``interval`` seconds for each key; the next line after a
    quiet spell says how many were left out (``suppressed=N``). Whatever floods a listener
    (refused handshakes, forged CTARs, garbage requests) cannot flood the log with it."""

    def __init__(self, burst: int = 5, interval: float = 10.0, *, max_keys: int = 1024) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, lines, dropped)

    def event(
        self,
        logger: logging.Logger,
        name: str,
        level: int,
        *,
        key: str = "",
        now: float | None = None,
        **fields: object,
    ) -> bool:
        """Log like :func:`event` unless ``key`` (default: the event name) is over its
        budget; returns whether a line was written."""
        import time

        t = time.monotonic() if now is None else now
        k = f"{name}/{key}"
        start, lines, dropped = self._windows.get(k, (t, 0, 0))
        if t - start >= self.interval:
            start, lines = t, 0
        if lines >= self.burst:
            if k not in self._windows and len(self._windows) >= self.max_keys:
                self._windows.clear()  # a key per source: never an unbounded table
            self._windows[k] = (start, lines, dropped + 1)
            return False
        if len(self._windows) >= self.max_keys and k not in self._windows:
            self._windows.clear()
        self._windows[k] = (start, lines + 1, 0)
        if dropped:
            fields = {**fields, "suppressed": dropped}
        event(logger, name, level, **fields)
        return True


# The loggers a configuration's load warns on (a key file others can read, a certificate not
# valid now, a key ignored, ...): LoadWarnings holds their lines while a load runs.
LOAD_LOGGERS = ("ipsecct.gateway.config", "ipsecct.ikev2.config")
MAX_LOAD_WARNINGS = 32  # kept for status: a file with more says the first ones


class _Hold(logging.Filter):
    def __init__(self, held: list[logging.LogRecord]) -> None:
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.held.append(record)
            return False
        return True


class LoadWarnings:
    """The WARNING lines of a configuration's loads, each cause said once: a reload (SIGHUP)
    reads every file again, and wrote every warning of the start again (a key file others
    can read, a certificate not valid now), a set per SIGHUP. A line is its cause: one the
    last load wrote is not written again (``still`` counts it); another (the file's mode
    changed, another key) is; one gone and back is said again. ``current``: the last load's
    lines (status ``config.warnings``)."""

    def __init__(self) -> None:
        self.current: list[str] = []
        self._held: list[logging.LogRecord] = []

    def hold(self) -> _Hold:
        """Hold the load loggers' warnings until :meth:`release` (call it in a finally)."""
        self._held = []
        h = _Hold(self._held)
        for name in LOAD_LOGGERS:
            logging.getLogger(name).addFilter(h)
        return h

    def release(self, h: _Hold, *, complete: bool = True) -> int:
        """Write the held lines that the last load did not; returns how many it did (still
        true). ``complete``: the load ended (a load that failed half-way says the lines it
        reached and forgets none of the last one's)."""
        for name in LOAD_LOGGERS:
            logging.getLogger(name).removeFilter(h)
        held, self._held = self._held, []
        said = set(self.current)
        lines: list[str] = []
        still = 0
        for r in held:
            line = r.getMessage()
            if line in lines:
                continue
            lines.append(line)
            if line in said:
                still += 1
            else:
                logging.getLogger(r.name).handle(r)
        if complete:
            self.current = lines[:MAX_LOAD_WARNINGS]
        else:
            self.current = [*self.current, *(x for x in lines if x not in said)]
            self.current = self.current[:MAX_LOAD_WARNINGS]
        return still
