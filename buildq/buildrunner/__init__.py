"""Build runners: the contract (re-exported here) and its backends as sibling modules."""

from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildRunner,
    BuildStatus,
    Change,
    MalformedPayload,
    RunnerError,
    RunnerThrottled,
    RunnerUnauthorized,
    TransientRunnerError,
)

__all__ = [
    "CORRELATION_KEY",
    "BuildID",
    "BuildMetadata",
    "BuildNotFound",
    "BuildRunner",
    "BuildStatus",
    "Change",
    "MalformedPayload",
    "RunnerError",
    "RunnerThrottled",
    "RunnerUnauthorized",
    "TransientRunnerError",
]
