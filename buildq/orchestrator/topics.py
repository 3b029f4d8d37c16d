"""Topic and consumer group names, spelled once."""

from __future__ import annotations

from buildq.queue.contract import dlq_topic

BUILD = "build"
BUILDSIGNAL = "buildsignal"
BUILDRESULT = "buildresult"
BUILD_DLQ = dlq_topic(BUILD)
BUILDSIGNAL_DLQ = dlq_topic(BUILDSIGNAL)

#: The daemon's consumer group on each topic it consumes.
GROUP = "buildq"
