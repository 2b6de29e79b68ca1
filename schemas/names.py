"""Every name jobstream puts on the wire, in one place: CloudEvents attributes, jobstream's
extension attributes (failure details included), and the header names of the Kafka and the
NATS binding. docs/wire-contract.md is the prose version; other languages read these.

Sources: CloudEvents 1.0 (core attributes; extension names are lowercase letters and
digits), its Kafka protocol binding (`ce_` headers, `content-type`, the record key for
`partitionkey`) and NATS protocol binding (`ce-` headers), the CloudEvents partitioning and
distributed-tracing extensions, W3C Trace Context (`traceparent`, `tracestate`), and
JetStream's `Nats-Msg-Id` deduplication header.
"""

from __future__ import annotations

SPECVERSION = "1.0"
JSON = "application/json"

# CloudEvents attribute names, without the binding prefix.
SPECVERSION_ATTR = "specversion"
ID = "id"
TYPE = "type"
SOURCE = "source"
TIME = "time"
SUBJECT = "subject"
DATASCHEMA = "dataschema"
DATACONTENTTYPE = "datacontenttype"  # carried by content-type in binary mode, never ce_
PARTITIONKEY = "partitionkey"  # CloudEvents partitioning extension: the ordering key
TRACEPARENT = "traceparent"  # W3C trace context, also the CloudEvents tracing extension
TRACESTATE = "tracestate"
# jobstream's extension attributes (CloudEvents names: lowercase letters and digits only).
JOBVERSION = "jobversion"
JOBATTEMPT = "jobattempt"
JOBIDEMKEY = "jobidemkey"
JOBNOTBEFORE = "jobnotbefore"
JOBORIGIN = "joborigin"  # traceparent of the request that created the job
JOBORIGINSTATE = "joboriginstate"
RESERVED = frozenset(
    {SPECVERSION_ATTR, ID, TYPE, SOURCE, TIME, SUBJECT, DATASCHEMA, DATACONTENTTYPE}
    | {PARTITIONKEY, TRACEPARENT, TRACESTATE, JOBVERSION, JOBATTEMPT, JOBIDEMKEY}
    | {JOBNOTBEFORE, JOBORIGIN, JOBORIGINSTATE}
)

# Header names per binding.
KAFKA_PREFIX = "ce_"
NATS_PREFIX = "ce-"
KAFKA_CONTENT_TYPE = "content-type"
NATS_CONTENT_TYPE = "Content-Type"
NATS_MSG_ID = "Nats-Msg-Id"

# Failure details: extension attributes a retry or dead-letter record carries (they
# replace earlier ones on each attempt, never append; see consumer/core/_failures.py).
REASON = "jobreason"
ERROR_TYPE = "joberrortype"
ERROR = "joberror"
TRACEBACK = "jobtraceback"
SOURCE_TOPIC = "jobsrctopic"
SOURCE_PARTITION = "jobsrcpartition"
SOURCE_OFFSET = "jobsrcoffset"
GROUP = "jobgroup"
FIRST_FAILURE = "jobfirstfail"
LAST_FAILURE = "joblastfail"
FAILURE_EXTENSIONS = (
    REASON,
    ERROR_TYPE,
    ERROR,
    TRACEBACK,
    SOURCE_TOPIC,
    SOURCE_PARTITION,
    SOURCE_OFFSET,
    GROUP,
    FIRST_FAILURE,
    LAST_FAILURE,
)
# A dead letter that could not be stored whole is stored reduced (docs/failure-handling.md):
REDUCED = "jobreduced"  # what was replaced: `body`, or `body,headers`
REDUCED_WHY = "jobreducedwhy"  # the broker's refusal of the whole record
BODY_BYTES = "jobbodybytes"  # the size of the replaced body
BODY_SHA256 = "jobbodysha256"  # its sha256, hex
HEADERS_BYTES = "jobheadersbytes"  # the size of the replaced headers (names and values)
HEADERS_SHA256 = "jobheaderssha256"  # sha256 of each `name NUL value NUL`, in order, hex
REDUCTION_EXTENSIONS = (
    REDUCED,
    REDUCED_WHY,
    BODY_BYTES,
    BODY_SHA256,
    HEADERS_BYTES,
    HEADERS_SHA256,
)
REPLAY_OF = "jobreplayof"
"""On a replayed job: the id of the dead letter it was replayed from."""
PREVIOUS_ATTEMPT = "jobprevattempt"
"""On a retry record: the traceparent of the attempt that failed (a span link)."""
