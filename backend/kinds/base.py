"""What a job kind is: a name, a description, its parameter schema, how its message is
validated and how it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend import protocol
from backend.job_params import JOB_PARAMS, ParamSchema
from backend.worker import JobContext

# (message, validated params) -> the inputs `run` takes; raises protocol.ProtocolError
Validate = Callable[[protocol.Message, dict[str, Any]], dict[str, Any]]
Run = Callable[[JobContext, dict[str, Any]], None]


@dataclass(frozen=True)
class JobKind:
    name: str
    description: str
    validate: Validate
    run: Run

    @property
    def params(self) -> ParamSchema:
        """The kind's parameters, declared in `backend.job_params.JOB_PARAMS`."""
        return JOB_PARAMS[self.name]


def check_array_names(msg: protocol.Message, allowed: set[str], kind: str) -> None:
    """Refuse arrays a job kind does not read, naming them."""
    unknown = sorted(set(msg.arrays) - allowed)
    if unknown:
        raise protocol.ProtocolError(
            "bad_input", f"{kind} does not take the arrays {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(allowed))}", unknown[0])
