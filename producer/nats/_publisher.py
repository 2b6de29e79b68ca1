"""NATS JetStream as a `Publisher`.

Guarantees:

- A receipt means JetStream stored the message (its PubAck), or dropped it as a repeat of
  the same job id within the stream's duplicate window (`Receipt.duplicate`): the headers
  carry `Nats-Msg-Id` = job id.
- Nothing waits forever: `start()` gives up after `connect_timeout_s`; a publish after
  `publish_timeout_s`, or as soon as the connection it was sent on drops (its PubAck can no
  longer come): both are `PublishTimeout`, ambiguous (publish again with the same job id).
- By default (`reconnect_buffer_bytes=0`) nothing is buffered while the connection is down:
  a publish fails at once with `BrokerUnavailable` and is never sent later.
- A publish nobody answers ("no responders") is looked up: a subject no stream captures
  fails with `DestinationMissing`; a stream that has no leader at the moment (a cluster
  electing a new one after losing a server) fails with `BrokerBusy`, retriable, like a
  lookup that gets no answer either (docs/operations.md).
- `send_many` keeps at most `max_in_flight` publishes awaiting their acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from producer._errors import (
    BrokerBusy,
    BrokerRefused,
    BrokerUnavailable,
    DestinationMissing,
    PublishError,
    PublishTimeout,
    RecordTooLarge,
)
from producer._publisher import Receipt
from producer._refusals import file_refused
from producer._settings import NatsSettings, RoutingSettings, Transport
from producer.nats._provision import ensure_nats_stream
from producer.nats._refusal import nats_refusal
from producer.secrets import secret_text
from schemas import JobMessage, to_nats

__all__ = ["KEY_PARTITIONS_METADATA", "NatsPublisher", "connect_nats", "key_partition"]

log = logging.getLogger("jobstream.producer")

_NO_RESPONDERS = "503"
_MESSAGE_TOO_LARGE = 10054  # JSStreamMessageExceedsMaximumErr: over the stream's max_msg_size
_LOOKUP_TIMEOUT_S = 5.0  # the stream lookup after a publish nobody answered
_TEMPORARY = {10008, 10023}  # JetStream temporarily unavailable; insufficient resources
KEY_PARTITIONS_METADATA = "jobstream.key-partitions"
"""Stream metadata entry: into how many subjects per job type jobs are partitioned by key."""
_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def key_partition(key: str, partitions: int) -> int:
    """The partition of `key`: 32-bit FNV-1a of its UTF-8 bytes, modulo `partitions`. Part
    of the wire contract (docs/nats.md): other languages must compute the same."""
    value = _FNV_OFFSET
    for byte in key.encode():
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value % partitions


# Raised by nats-py when the connection cannot carry a publish right now.
_CONNECTION_ERRORS = (
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionDrainingError,
)


async def connect_nats(
    settings: NatsSettings, *, on_disconnected: Callable[[], None] | None = None
) -> NatsClient:
    """A connected nats-py client built from `settings` (auth, TLS, reconnects), or
    `BrokerUnavailable` once `connect_timeout_s` passed without a connection.
    `on_disconnected` is called each time the connection drops (not on `close()`)."""
    client = NatsClient()
    connected = False
    servers = ", ".join(settings.servers)

    async def disconnected() -> None:
        if client.is_closed:  # our own close()
            return
        log.warning("nats: disconnected from %s; reconnecting", servers)
        if on_disconnected is not None:
            on_disconnected()

    async def on_reconnected() -> None:
        log.warning("nats: reconnected to %s", _url(client))

    # A refusal (credentials, certificate) is final: stop at the first instead of trying
    # again until the connect timeout.
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_error(error: Exception) -> None:
        if connected:
            log.warning("nats: %r", error)
            return
        # During start, failed attempts are expected and reported by BrokerUnavailable.
        log.debug("nats: %r", error)
        why = nats_refusal(settings, error)
        if why is not None and not refused.done():
            refused.set_result(why)

    attempt = asyncio.ensure_future(
        client.connect(
            **_connect_options(settings),
            error_cb=on_error,
            disconnected_cb=disconnected,
            reconnected_cb=on_reconnected,
        )
    )
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            either: list[asyncio.Future[Any]] = [attempt, refused]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not attempt.done():
                await _abandon(attempt, client)
                raise BrokerRefused("nats", servers, refused.result())
            await attempt
    except (TimeoutError, OSError, nats.errors.Error) as error:
        await _abandon(attempt, client)
        last = client.last_error or error
        why = nats_refusal(settings, last)
        if why is not None:
            raise BrokerRefused("nats", servers, why) from None
        raise BrokerUnavailable("nats", servers, _describe(last)) from error
    connected = True
    return client


async def _abandon(attempt: asyncio.Future[None], client: NatsClient) -> None:
    """Stop a connect attempt (bounded: a second at most) and close its client."""
    attempt.cancel()
    await asyncio.wait([attempt], timeout=1.0)
    if attempt.done() and not attempt.cancelled():
        attempt.exception()  # retrieved: no "never retrieved" warning
    with contextlib.suppress(Exception):
        await client.close()


class NatsPublisher:
    """Publishes jobs to JetStream subjects. Use through `JobProducer`, or directly for raw
    messages (`send_raw`, the worker's retry and dead-letter path)."""

    def __init__(self, settings: NatsSettings, routing: RoutingSettings | None = None) -> None:
        """`routing` names the stream (and its limits) that `ensure` creates or updates."""
        self._settings = settings
        self._routing = routing if routing is not None else RoutingSettings()
        self._timeout = settings.publish_timeout_s
        self._client: NatsClient | None = None
        self._acks: _AckInbox | None = None
        self._partitions = 0

    @property
    def transport(self) -> Transport:
        return "nats"

    @property
    def client(self) -> NatsClient:
        """The underlying nats-py connection (started)."""
        if self._client is None:
            msg = "NatsPublisher is not started: await start() (or use `async with JobProducer`)"
            raise RuntimeError(msg)
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        client = await connect_nats(self._settings, on_disconnected=self._connection_lost)
        acks = _AckInbox(client)
        await acks.open()
        self._client, self._acks = client, acks
        self._partitions = await self._key_partitions()

    def _connection_lost(self) -> None:
        """The connection dropped: no PubAck awaited on it will come (nats-py does not fail
        them), so fail them now instead of at `publish_timeout_s`. Each stays ambiguous
        (`PublishTimeout`: the server may have stored it before the drop)."""
        if self._acks is not None:
            self._acks.fail_all()

    async def stop(self) -> None:
        client, self._client, self._acks = self._client, None, None
        if client is not None and not client.is_closed:
            await client.close()

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        subject = self._partitioned(destination, message)
        [receipt] = await self._publish([(subject, to_nats(message.attributes), message.body)])
        return receipt

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        return await self._publish(
            [(self._partitioned(s, m), to_nats(m.attributes), m.body) for s, m in items]
        )

    def _partitioned(self, subject: str, message: JobMessage) -> str:
        # A stream partitioned by key (docs/nats.md): `<subject>.<n>`; jobs without a key
        # are spread by their id.
        if not self._partitions:
            return subject
        attributes = message.attributes
        return f"{subject}.{key_partition(attributes.key or attributes.id, self._partitions)}"

    async def _key_partitions(self) -> int:
        """The stream's key partition count from its metadata (0: not partitioned, or the
        stream is not readable with these credentials)."""
        try:
            info = await self.client.jetstream(timeout=self._timeout).stream_info(
                self._routing.stream
            )
            return int((info.config.metadata or {}).get(KEY_PARTITIONS_METADATA, "0"))
        except (nats.errors.Error, ValueError) as error:
            log.debug("no key partitions for stream %s: %r", self._routing.stream, error)
            return 0

    async def send_raw(self, subject: str, headers: dict[str, str], body: bytes) -> Receipt:
        """Publish a raw message as-is: the worker's path to retry and dead-letter subjects."""
        [receipt] = await self._publish([(subject, headers, body)])
        return receipt

    async def ping(self, timeout_s: float) -> None:
        """PING/PONG with the server within `timeout_s` (`BrokerUnavailable`)."""
        servers = ", ".join(self._settings.servers)
        client = self.client
        if not client.is_connected:
            raise BrokerUnavailable("nats", servers, "not connected (reconnecting)")
        try:
            async with asyncio.timeout(timeout_s):
                await client.flush(timeout=math.ceil(timeout_s))
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise BrokerUnavailable("nats", servers, _describe(error)) from error

    async def check(self, destinations: Sequence[str]) -> None:
        """Raise `DestinationMissing` naming every subject no stream captures."""
        js = self.client.jetstream(timeout=self._timeout)
        missing: list[str] = []
        for subject in dict.fromkeys(destinations):
            try:
                await js.find_stream_name_by_subject(subject)
            except NotFoundError:
                missing.append(subject)
            except nats.errors.Error as error:
                msg = f"nats could not look up the stream of {subject!r}: {_describe(error)}"
                raise PublishError(msg) from error
        if missing:
            raise DestinationMissing("nats", ", ".join(missing))

    async def ensure(self, destinations: Sequence[str]) -> list[str]:
        try:
            created = await ensure_nats_stream(
                self.client.jetstream(timeout=self._timeout), destinations, self._routing
            )
            self._partitions = await self._key_partitions()
            return created
        except nats.errors.TimeoutError as error:
            raise PublishTimeout("nats", self._routing.stream, self._timeout) from error
        except nats.errors.Error as error:
            stream = self._routing.stream
            msg = f"nats could not create or update stream {stream!r}: {_describe(error)}"
            raise PublishError(msg) from error

    async def _publish(self, items: Sequence[tuple[str, dict[str, str], bytes]]) -> list[Receipt]:
        acks = self._acks
        if acks is None:
            msg = "NatsPublisher is not started: await start() (or use `async with JobProducer`)"
            raise RuntimeError(msg)
        window = asyncio.Semaphore(self._settings.max_in_flight)
        pending: list[tuple[str, str, str, asyncio.Future[Msg]]] = []
        try:
            for subject, headers, body in items:
                if window.locked():  # wait for an acknowledgement, but not forever
                    async with self._deadline(subject):
                        await window.acquire()
                else:
                    await window.acquire()
                try:
                    token, future = await acks.publish(subject, headers, body)
                except _CONNECTION_ERRORS as error:
                    window.release()
                    servers = ", ".join(self._settings.servers)
                    raise BrokerUnavailable("nats", servers, _describe(error)) from error
                except nats.errors.MaxPayloadError as error:
                    window.release()
                    raise RecordTooLarge("nats", subject, _describe(error)) from error
                except nats.errors.Error as error:
                    window.release()
                    msg = f"nats refused the publish to {subject!r}: {_describe(error)}"
                    raise PublishError(msg) from error
                future.add_done_callback(lambda _: window.release())
                pending.append((subject, headers.get("Nats-Msg-Id", ""), token, future))
            async with self._deadline(pending[-1][0] if pending else ""):
                return await self._receipts(pending)
        finally:
            acks.forget(t for _, _, t, f in pending if not f.done())
            for _, _, _, future in pending:  # an ack lost with its connection: retrieved
                if future.done() and not future.cancelled():
                    future.exception()

    async def _receipts(
        self, pending: list[tuple[str, str, str, asyncio.Future[Msg]]]
    ) -> list[Receipt]:
        """The receipts of `pending` publishes (subject, job id, token, PubAck), in order."""
        receipts: list[Receipt] = []
        sent = time.monotonic()
        for subject, job_id, _, future in pending:
            try:
                reply = await future
            except _AckLost as lost:  # ambiguous: stored or not, nobody can say
                waited = max(time.monotonic() - sent, 0.1)
                raise PublishTimeout("nats", subject, round(waited, 1)) from lost
            if _no_responders(reply):
                await self._no_stream_or_no_leader(subject)
            receipts.append(_receipt(job_id, subject, reply))
        return receipts

    async def _no_stream_or_no_leader(self, subject: str) -> NoReturn:
        """Nobody answered a publish to `subject`: no stream captures it (permanent:
        `DestinationMissing`), or its stream has no leader at this moment, as while a
        cluster elects a new one after losing the old (transient: `BrokerBusy`). Only an
        answer from JetStream that no stream captures it is taken as missing; a lookup
        that fails too (the meta leader is being elected) is transient as well."""
        js = self.client.jetstream(timeout=min(self._timeout, _LOOKUP_TIMEOUT_S))
        try:
            stream = await js.find_stream_name_by_subject(subject)
        except NotFoundError:
            raise DestinationMissing("nats", subject) from None
        except (nats.errors.Error, TimeoutError) as error:
            detail = f"no answer, and the stream lookup failed too: {_describe(error)}"
            raise BrokerBusy("nats", subject, detail) from error
        raise BrokerBusy("nats", subject, f"stream {stream!r} has no leader right now")

    @contextlib.asynccontextmanager
    async def _deadline(self, subject: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError as error:
            raise PublishTimeout("nats", subject, self._timeout) from error


class _AckLost(Exception):
    """The connection a publish was sent on dropped before its PubAck came."""

    def __init__(self) -> None:
        super().__init__("the connection dropped before the acknowledgement came")


class _AckInbox:
    """Publishes with a reply subject under one wildcard inbox, so many publishes await
    their PubAck at once without a subscription or a task per message."""

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()
        self._subscription: Subscription | None = None

    async def open(self) -> None:
        self._prefix = self._client.new_inbox() + "."
        self._subscription = await self._client.subscribe(self._prefix + "*", cb=self._on_reply)

    async def publish(
        self, subject: str, headers: dict[str, str], body: bytes
    ) -> tuple[str, asyncio.Future[Msg]]:
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._client.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return token, future

    def fail_all(self) -> None:
        """Fail every awaited acknowledgement with `_AckLost` (the connection dropped)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(_AckLost())

    def forget(self, tokens: Any) -> None:
        """Stop waiting for these acknowledgements (after a timeout or an error)."""
        for token in tokens:
            future = self._waiting.pop(token, None)
            if future is not None and not future.done():
                future.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)


def _no_responders(reply: Msg) -> bool:
    return bool(reply.headers and reply.headers.get("Status") == _NO_RESPONDERS)


def _receipt(job_id: str, subject: str, reply: Msg) -> Receipt:
    """The receipt a PubAck gives (a "no responders" reply is answered before this, by
    `NatsPublisher._no_stream_or_no_leader`)."""
    try:
        # orjson: a PubAck per job, read in 0.2 us instead of 2 (docs/benchmarks.md).
        answer = orjson.loads(reply.data)
    except ValueError:
        answer = {"error": {"description": f"unreadable acknowledgement {reply.data[:80]!r}"}}
    if "error" in answer:
        error = answer["error"]
        code = error.get("err_code") or error.get("code")
        detail = f"{error.get('description')} ({code})"
        if code == _MESSAGE_TOO_LARGE:
            raise RecordTooLarge("nats", subject, detail)
        if code in _TEMPORARY:
            raise BrokerBusy("nats", subject, detail)
        raise PublishError(f"JetStream refused the publish to {subject!r}: {detail}")
    return Receipt(
        job_id, "nats", answer["stream"], None, answer["seq"], bool(answer.get("duplicate"))
    )


def _connect_options(settings: NatsSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": settings.name,
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": settings.max_reconnect_attempts,
        "reconnect_time_wait": settings.reconnect_wait_s,
        "allow_reconnect": True,
        "pending_size": settings.reconnect_buffer_bytes,
    }
    if settings.credentials_file or settings.nkey_seed_file:
        if importlib.util.find_spec("nkeys") is None:
            msg = (
                "NATS credentials files and nkey seeds need the `nkeys` package: "
                "pip install nkeys (or nats-py[nkeys])"
            )
            raise PublishError(msg)
        if settings.credentials_file:
            _readable(settings.credentials_file, "nats.credentials_file")
            options["user_credentials"] = str(settings.credentials_file)
        if settings.nkey_seed_file:
            _readable(settings.nkey_seed_file, "nats.nkey_seed_file")
            options["nkeys_seed"] = str(settings.nkey_seed_file)
    token = secret_text(settings.token, settings.token_file, "nats.token")
    if token is not None:
        options["token"] = token
    if settings.user is not None:
        options["user"] = settings.user
        password = secret_text(settings.password, settings.password_file, "nats.password")
        if password is not None:
            options["password"] = password
    if settings.tls_ca_file or settings.tls_cert_file:
        try:
            context = ssl.create_default_context(
                cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
            )
        except (OSError, ssl.SSLError) as error:
            raise file_refused(error, "nats.tls_ca_file", settings.tls_ca_file) from None
        if settings.tls_cert_file:
            try:
                context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
            except (OSError, ssl.SSLError) as error:
                setting = "nats.tls_cert_file (and nats.tls_key_file)"
                raise file_refused(error, setting, settings.tls_cert_file) from None
        options["tls"] = context
    return options


def _readable(path: Path, setting: str) -> None:
    """`ValueError` naming `setting` unless `path` can be read (nats-py reads it only once
    connected, and its failure then looks like a broker that is down)."""
    try:
        path.read_bytes()
    except OSError as error:
        raise file_refused(error, setting, path) from None


def _url(client: NatsClient) -> str:
    url = client.connected_url
    return url.netloc if url is not None else "?"


def _describe(error: BaseException) -> str:
    text = str(error).removeprefix("nats: ")
    if isinstance(error, TimeoutError) and not text:
        return "timed out"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
