"""jobstream schemas: job models, the wire contract, and strict decoding. No I/O.

Declare a job type by subclassing `Job`; publish with `encode` plus `to_kafka`/`to_nats`;
consume with `from_kafka`/`from_nats` plus `decode`. See docs/wire-contract.md.
"""

from schemas._attributes import MAX_HEADER_BYTES, JobAttributes
from schemas._codec import DecodedJob, JobMessage, decode, encode, header_bytes, validate_payload
from schemas._errors import (
    InvalidAttributes,
    InvalidPayload,
    JobDecodeError,
    JobstreamError,
    UndecodableBody,
    UnknownJobType,
    UnreadableRecord,
    UnsupportedVersion,
)
from schemas._export import export_json_schemas
from schemas._job import Job
from schemas._kafka import foreign_headers, from_kafka, to_kafka
from schemas._nats import from_nats, to_nats
from schemas._registry import JobRegistry, default_registry

__all__ = [
    "MAX_HEADER_BYTES",
    "DecodedJob",
    "InvalidAttributes",
    "InvalidPayload",
    "Job",
    "JobAttributes",
    "JobDecodeError",
    "JobMessage",
    "JobRegistry",
    "JobstreamError",
    "UndecodableBody",
    "UnknownJobType",
    "UnreadableRecord",
    "UnsupportedVersion",
    "decode",
    "default_registry",
    "encode",
    "export_json_schemas",
    "foreign_headers",
    "from_kafka",
    "from_nats",
    "header_bytes",
    "to_kafka",
    "to_nats",
    "validate_payload",
]
