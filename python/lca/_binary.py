"""Finding and running the `lca` binary that ships in the wheel.

`run` starts the binary and shows its progress as it goes:

- on a terminal, lca draws its progress bar on the terminal, as when run from a shell (lca sees
  a pseudo-terminal whose output is copied to ours, so its messages are captured too);
- in Jupyter (and whenever `progress=True` is asked for without a terminal), the bar becomes a
  line every few seconds, plus lca's own lines;
- otherwise (a log file, a pipe, `progress=False`) lca writes its closing lines only, as in a
  CI log.

A non-zero exit raises `LcaError` with lca's message and exit status.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable


class LcaError(RuntimeError):
    """`lca` exited with an error; the message is lca's own.

    Attributes: `returncode` (lca's exit status: 2 for unusable input, 1 for a failed
    `lca check`, 130 after Ctrl-C), `stderr` (everything lca wrote on stderr, progress bar
    frames left out) and `args` of the command (`command`).
    """

    def __init__(
        self,
        message: str,
        returncode: int,
        stderr: str = "",
        command: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr
        self.command = list(command)


def find_binary() -> Path:
    """The `lca` executable: $LCA_BIN, else the one installed beside this Python (the wheel's
    scripts directory), else `lca` on PATH, else a development build in the source tree."""
    env = os.environ.get("LCA_BIN")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"LCA_BIN={env} is not a file")
        return path
    exe = "lca.exe" if sys.platform == "win32" else "lca"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for scripts in candidates:
        if scripts.is_file():
            return scripts
    on_path = shutil.which(exe)
    if on_path:
        return Path(on_path)
    repo = Path(__file__).resolve().parents[2]
    for profile in ("release", "debug"):
        dev = repo / "target" / profile / exe
        if dev.is_file():
            return dev
    raise FileNotFoundError(
        "the lca binary was not found: install the package (pip install .) or set LCA_BIN"
    )


@dataclass
class Completed:
    """A finished run of the binary."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
_SEP = re.compile(r"\r\n|\r|\n")

#: Seconds between two progress lines in line mode (Jupyter).
PROGRESS_INTERVAL = 5.0


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences (colours, cursor moves, line clears)."""
    return _ANSI.sub("", text)


class LineSplitter:
    """Turns a terminal stream into lines: text ended by a newline is a line of its own; text
    ended by a carriage return is a progress-bar frame that the next frame overwrites.

    `on_line` gets every line; `on_frame` gets at most one frame per `interval` seconds (the
    newest), when given. Escape sequences are removed.
    """

    def __init__(
        self,
        on_line: Callable[[str], None],
        on_frame: Callable[[str], None] | None = None,
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_line = on_line
        self._on_frame = on_frame
        self._interval = interval
        self._clock = clock
        self._last_frame_at = clock()
        self._buf = ""
        self._cr_segment: str | None = None

    def feed(self, text: str) -> None:
        if self._cr_segment is not None and text.startswith("\n"):
            # The "\r" that ended the last read was half of a "\r\n": a line after all.
            text = text[1:]
            if self._cr_segment:
                self._on_line(self._cr_segment)
        self._cr_segment = None
        self._buf += text
        newest_frame = None
        while True:
            m = _SEP.search(self._buf)
            if m is None:
                break
            segment = strip_ansi(self._buf[: m.start()]).rstrip()
            self._buf = self._buf[m.end() :]
            if m.group() == "\r":
                if segment:
                    newest_frame = segment
                if not self._buf:
                    self._cr_segment = segment
            elif segment:
                self._on_line(segment)
        if newest_frame is not None:
            self._frame(newest_frame)

    def _frame(self, segment: str) -> None:
        if self._on_frame is None:
            return
        now = self._clock()
        if now - self._last_frame_at >= self._interval:
            self._last_frame_at = now
            self._on_frame(segment)

    def close(self) -> None:
        rest = strip_ansi(self._buf).rstrip()
        self._buf = ""
        if rest:
            self._on_line(rest)


def _in_jupyter() -> bool:
    return "ipykernel" in sys.modules


def _stream_isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _choose_mode(progress: bool | None) -> str:
    """`tty`, `lines` or `pipe` (see the module's docstring)."""
    if progress is False or os.name != "posix":
        return "pipe"
    if _stream_isatty(sys.stderr):
        return "tty"
    if progress is True or _in_jupyter():
        return "lines"
    return "pipe"


def _write(stream: IO[str], text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # a closed or broken stream must not stop the run
        pass


def run(
    args: Sequence[str],
    *,
    progress: bool | None = None,
    echo_stdout: bool = True,
    echo_stderr: bool = True,
    check: bool = True,
) -> Completed:
    """Run `lca ARGS…`, showing its output as it comes (see the module docstring).

    Returns what it wrote; raises `LcaError` when it exits non-zero and `check` is true."""
    cmd = [str(find_binary()), *[str(a) for a in args]]
    mode = _choose_mode(progress) if echo_stderr else "pipe"
    err_lines: deque[str] = deque(maxlen=2000)
    out_chunks: list[str] = []

    def on_err_line(line: str) -> None:
        err_lines.append(line)
        if echo_stderr and mode != "tty":
            _write(sys.stderr, line + "\n")

    def on_frame(frame: str) -> None:
        _write(sys.stderr, frame + "\n")

    splitter = LineSplitter(
        on_err_line, on_frame if mode == "lines" else None, interval=PROGRESS_INTERVAL
    )

    master: int | None = None
    env = dict(os.environ)
    if mode in ("tty", "lines"):
        master, slave = _open_pty(lines=mode == "lines")
        if mode == "lines":
            env["NO_COLOR"] = "1"
        stderr_target: int = slave
    else:
        slave = -1
        stderr_target = subprocess.PIPE
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr_target,
            env=env,
        )
    except OSError as e:
        if master is not None:
            os.close(master)
            os.close(slave)
        raise LcaError(f"could not run {cmd[0]}: {e}", 127, command=cmd) from e
    if master is not None:
        os.close(slave)

    def pump_stdout() -> None:
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            out_chunks.append(text)
            if echo_stdout:
                _write(sys.stdout, text)
        tail = decoder.decode(b"", final=True)
        out_chunks.append(tail)

    reader = threading.Thread(target=pump_stdout, daemon=True)
    reader.start()
    try:
        _pump_stderr(proc, master, mode, splitter)
        proc.wait()
    except KeyboardInterrupt:
        _interrupt(proc)
        raise
    finally:
        if master is not None:
            os.close(master)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    splitter.close()
    done = Completed(cmd, proc.returncode, "".join(out_chunks), "\n".join(err_lines))
    if check and proc.returncode != 0:
        message = _error_message(list(err_lines), proc.returncode)
        raise LcaError(message, proc.returncode, done.stderr, cmd)
    return done


def _open_pty(lines: bool) -> tuple[int, int]:
    """A pseudo-terminal for lca's stderr: as wide as our terminal (tty mode), or 100 columns
    (line mode), with newlines passed through as they are."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    cols, rows = 100, 24
    if not lines:
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
            cols, rows = size.columns, size.lines
        except (OSError, ValueError, AttributeError):
            pass
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # keep "\n" as "\n" (no "\r\n")
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
    except (OSError, termios.error):
        pass
    return master, slave


def _pump_stderr(
    proc: subprocess.Popen[bytes], master: int | None, mode: str, splitter: LineSplitter
) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    raw_out = None
    if mode == "tty":
        try:
            raw_out = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            raw_out = None
    while True:
        if master is not None:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: lca closed the terminal (exited)
                chunk = b""
        else:
            assert proc.stderr is not None
            chunk = proc.stderr.read1(65536)
        if not chunk:
            break
        if mode == "tty":
            if raw_out is not None:
                sys.stderr.flush()
                try:
                    os.write(raw_out, chunk)
                except OSError:
                    pass
            else:
                _write(sys.stderr, chunk.decode("utf-8", errors="replace"))
        splitter.feed(decoder.decode(chunk))
    splitter.feed(decoder.decode(b"", final=True))


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C in Python: lca stops cleanly on SIGINT (it keeps finished steps for --resume).
    From a terminal it got the signal already; from Jupyter it did not."""
    try:
        proc.wait(timeout=1)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def _error_message(lines: list[str], returncode: int) -> str:
    """lca's message: from its first `error:` line on, else its last lines."""
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            text = "\n".join(lines[i:])
            return text[len("error:") :].strip()
    if lines:
        return "\n".join(lines[-20:])
    return f"lca exited with status {returncode}"
