"""Errors that reach the user as one clear line, with an exit code.

`UsageError` (exit 2) is bad input: a file that is missing or malformed, a bad option, a pipeline
that does not parse. `PassError` (exit 1) is a pass that failed or a verification that did not hold.
Both carry a short `hint` that the CLI prints after the message.
"""

from __future__ import annotations

MAX_LINE = 300
"""Characters of a quoted message kept in a one-line error; the rest is cut (torch.fx's lint
errors, for one, carry the whole graph: tens of thousands of characters)."""


def clip(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line (newlines and runs of blanks become one space), cut at `limit` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return f"{flat[: limit - 1].rstrip()}… ({len(flat) - limit + 1} more characters; OPTPIPE_DEBUG=1 shows all)"


def first_line(e: BaseException, limit: int = MAX_LINE) -> str:
    """'ExceptionType: first non-empty line of its message', clipped to `limit` characters — how a
    library's error is quoted in one of ours (some put the useful part after a blank preamble line,
    some put a whole graph after it)."""
    first = next((line.strip() for line in str(e).strip().splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {clip(first, limit)}" if first else type(e).__name__


class OptpipeError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = clip(self.message, 4 * MAX_LINE)  # our own messages may quote a path or two: room for them
        return f"{text} (hint: {clip(self.hint, 2 * MAX_LINE)})" if self.hint else text


class UsageError(OptpipeError):
    """Bad input from the user: exit code 2."""

    exit_code = 2


class PassError(OptpipeError):
    """A pass failed, or its verification did not hold: exit code 1."""

    exit_code = 1


class VerificationError(PassError):
    """The program after a pass does not match the program before it within budget."""


class TargetError(OptpipeError):
    """A target cannot take the program, or its output does not match the torch program."""

    exit_code = 1


class PipelineError(OptpipeError):
    """A rank of a multi-process run (data, pipeline or tensor parallel) failed or died, and the
    run was stopped."""

    exit_code = 1


class OptpipeWarning(UserWarning):
    """Something the user should know that does not stop the run (an OUT folder written by another
    torch version); the CLI prints it as one `optpipe: warning:` line."""
