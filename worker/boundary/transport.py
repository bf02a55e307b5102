"""Cascade's broker transport: kombu's Redis transport with every queue entry screened before
kombu or Celery decodes it.

kombu's Redis channel pops an entry (``BRPOP``, or ``RPOP`` for ``basic_get``) and
``json.loads`` it straight into ``Transport._deliver``: an entry that is not a JSON envelope
(``LPUSH chat 'hello'``), or one whose fields Celery's consumer trips over, raises in the
consumer and stops the worker, and the few that are put back stop every worker after it. Here
the popped bytes go through ``worker.boundary.envelope.screen`` first: what passes is delivered as a
rebuilt, checked envelope; what does not is ended by ``worker.boundary.rejection.reject``: a dead letter
with the reason, plus a ``failed`` reply where the message names a usable request id in its
``cascade_request_id`` header (and, for an over-size body, its task id).

Nothing raises out of the screen. If the rejection itself cannot be written because Redis
went away, the entry is pushed back where it was taken from and the connection error goes on
to kombu, which reconnects as after any lost connection; the entry is screened again then. If
the write fails for any other reason (Redis out of memory, an ACL that forbids it), pushing the
entry back would only spin on it: it is dropped, and the worker logs an error naming its task
id, queue and size (never its body).

Celery uses this transport through the ``broker_transport`` setting (``worker.celery_app``).
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from typing import Any, cast

import redis
from kombu.transport import redis as kombu_redis

from providers.errors import InvalidRequest, RequestError, RequestTooLarge
from tasks.contract.schemas import TASK_NAME, usable_request_id
from worker.boundary import envelope, rejection
from worker.runtime import get_runtime

logger = logging.getLogger(__name__)

# An ``RPOP`` read (``basic_get``) ends at most this many refused entries before it reports
# the queue empty for now.
MAX_REFUSED_PER_GET = 100


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, screening each entry it pops; see the module docstring."""

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own method, with the entry screened where kombu would json.loads it.
        try:
            try:
                popped = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu does: the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not popped:
                raise Empty()
            raw_key, item = popped
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            queue = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            message = self._admit(item, queue, key)
            if message is None:
                raise Empty()  # ended here; kombu issues the next BRPOP
            self.connection._deliver(message, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        with self.conn_or_acquire() as client:
            refused = 0
            for priority in self.priority_steps:
                key = self._q_for_pri(queue, priority)  # type: ignore[no-untyped-call]
                while refused < MAX_REFUSED_PER_GET:
                    item = client.rpop(key)
                    if not item:
                        break
                    message = self._admit(item, queue, key)
                    if message is not None:
                        self._maybe_update_queues_expire(client, queue)  # type: ignore[no-untyped-call]
                        return message
                    refused += 1
            self._maybe_update_queues_expire(client, queue)  # type: ignore[no-untyped-call]
            raise Empty()

    def _admit(self, item: bytes, queue: str, key: str) -> dict[str, Any] | None:
        """The envelope to deliver, or None once a refused ``item`` has been ended.

        Only Cascade's task queues are screened: the reply queues of Celery's remote control
        (``celery inspect ping``, the healthcheck) carry Celery's own replies, read by the
        command that asked, and pass as kombu reads them."""
        settings = get_runtime().settings
        if queue not in settings.task_queues:
            return cast(dict[str, Any], json.loads(item))
        max_bytes = settings.max_message_bytes
        verdict = envelope.screen(item, max_body_bytes=max_bytes)
        if isinstance(verdict, dict):
            return verdict
        try:
            _end(verdict, queue)
        except (redis.ConnectionError, redis.TimeoutError):
            self._put_back(key, item)
            raise
        except Exception as exc:  # noqa: BLE001 - nothing may stop the consumer; logged below
            logger.error(
                "could not dead-letter a refused message (%s: %s); dropped: task id %r, queue %r, %d bytes",
                verdict.reason,
                type(exc).__name__,
                (verdict.task_id or "")[:128],
                queue,
                len(item),
            )
        return None

    def _put_back(self, key: str, item: bytes) -> None:
        """Return ``item`` to the end of ``key`` it was popped from (it is taken next)."""
        try:
            with self.conn_or_acquire() as client:
                client.rpush(key, item)
        except Exception:
            logger.exception("could not put a refused message back on %r; %d bytes lost", key, len(item))


def _end(refusal: envelope.Refusal, queue: str) -> None:
    """Dead-letter ``refusal``'s message and answer it where it names where to."""
    error: RequestError
    if refusal.reason == "request_too_large":
        error = RequestTooLarge(refusal.detail)
        # A request too large to read is answered at its header's id, else at its task id
        # (the Python client sends a request with its request id as the task id).
        reply_to = refusal.request_id or usable_request_id(refusal.task_id)
    else:
        error = InvalidRequest(refusal.detail)
        reply_to = refusal.request_id
    rejection.reject(
        get_runtime(),
        error,
        reply_to=reply_to,
        body=refusal.preview,
        request_id=refusal.request_id,
        task_id=refusal.task_id,
        queue=queue,
        reason=refusal.reason,
        redelivery=False,
        task=refusal.task or TASK_NAME,
    )


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the screening ``Channel``."""

    Channel = Channel
