"""The job kinds this backend serves, registered here explicitly.

A job kind is one module with a `KIND` (`backend.kinds.base.JobKind`: name, description,
how its message is validated, how it runs); its parameters are declared in
`backend.job_params.JOB_PARAMS`. Adding a kind is its module, its line below and its schema.
"""

from __future__ import annotations

from backend.kinds import convert, generate, reconstruct, render
from backend.kinds.base import JobKind

JOB_KINDS: dict[str, JobKind] = {k.name: k for k in (
    render.KIND,
    convert.KIND,
    generate.KIND,
    reconstruct.KIND,
)}

__all__ = ["JOB_KINDS", "JobKind"]
