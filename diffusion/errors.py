"""The one base class of the errors a user fixes (bad params, data, checkpoints, weights): the CLI prints them as
`error: ...` and exits 2. Each layer defines its own subclass next to the code that raises it."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or state that the user can fix; the message names the input and the fix."""


class Stopped(Exception):
    """A stage stopped on request (SIGTERM: a preemption) after saving its state; a re-run resumes. The CLI exits with
    a signal's status (128 + 15), so supervisors retry it like a killed process."""
