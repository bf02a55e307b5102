"""Running one validated ``cascade.image`` request: images out, chain through, reply stored.

``ImageRunner`` is the image side of ``tasks.run.Run`` (which opens the run, walks the chain,
ends it with one terminal event and one stored reply, or hands it off): it walks an
``ImageChainRun`` of image providers and, for each image an attempt makes, checks it against
the worker's size bound, stores its bytes and announces it:

- a finished image at ``cascade:image:{request_id}:{index}``, then an ``image`` event
  (``index``, ``key``, ``provider``, ``attempt``);
- a partial image (a preview some providers stream first) at its own key,
  ``cascade:image-partial:{request_id}:{index}:{partial_index}``, then an ``image`` event with
  ``partial: true``: a partial never stands where the finished image belongs.

The bytes go to Redis before the event that announces them and before the reply that lists
them, with the reply's TTL counted from the latest moment the reply can be written (the run's
deadline), so a reply never points at bytes that expired first. An attempt that fails after
its images went out gets a ``fallback`` event (subscribers discard its images) and the next
provider's images take the same keys. Provider URLs are never kept: the providers hand over
bytes.
"""

from __future__ import annotations

import time
from typing import Any

from providers import errors
from providers.chain import ChainOutcome
from providers.images import GeneratedImageData, ImageCall, ImageChainRun, ImageProviderHandle
from tasks.contract.images import IMAGE_TASK_NAME, GeneratedImage, ImageReply, ImageRequest
from tasks.contract.keys import image_key, partial_image_key
from tasks.contract.schemas import ChainMeta, ErrorInfo, HandOff
from tasks.run import Run

# Kept this long past the run's deadline as well, for the reply written just after it.
_IMAGE_TTL_SLACK_S = 60


class ImageRunner(Run[ImageRequest, ImageReply]):
    """Runs one image request (or its continuation after a hand-off) on this worker; see
    ``tasks.run.Run`` for its arguments and the module docstring for what it writes."""

    task = IMAGE_TASK_NAME

    def _walk(self, provider_ids: list[str], fields: dict[str, Any]) -> ImageChainRun:
        settings = self.runtime.settings
        return ImageChainRun(
            providers=ImageProviderHandle.chain(self.runtime.providers, settings.providers, provider_ids),
            call=ImageCall.from_request(self.request, self.deadline),
            **fields,
        )

    def _reply(
        self, status: str, outcome: ChainOutcome[Any] | None, meta: ChainMeta, error: ErrorInfo | None
    ) -> ImageReply:
        images: list[GeneratedImageData] = outcome.results if outcome else []
        return ImageReply(
            request_id=self.request_id,
            status=status,  # type: ignore[arg-type]
            images=[
                GeneratedImage(
                    key=image_key(self.request_id, image.index),
                    mime_type=image.mime_type,
                    bytes=len(image.data),
                    revised_prompt=image.revised_prompt,
                )
                for image in sorted(images, key=lambda image: image.index)
            ],
            meta=meta,
            error=error,
            metadata=self.request.metadata,
        )

    def _finished(self, reply: ImageReply) -> None:
        # Skipped on purpose: the telemetry observer's spans and metrics describe chat requests
        # (their conversation, replies and token usage). An image request's attempts are in its
        # reply's meta and in the worker's log.
        return

    def _handed_off(self, state: HandOff, queue: str) -> None:
        return  # as _finished

    # --- ImageListener ----------------------------------------------------------------------

    def on_image(self, provider_id: str, attempt: int, image: GeneratedImageData) -> None:
        """Store ``image``'s bytes and publish its ``image`` event; stop on cancel or deadline.
        An image over the worker's size bound fails the attempt (``bad_request``)."""
        self._check_stop()
        if self.first_chunk_at is None:
            self.first_chunk_at = time.time()
        limit = self.runtime.settings.image_bytes_limit(provider_id)
        if len(image.data) > limit:
            raise errors.BadProviderRequest(
                f"{provider_id}: image {image.index} is {len(image.data)} bytes, over max_image_bytes {limit}"
            )
        if image.partial:
            key = partial_image_key(self.request_id, image.index, image.partial_index or 0)
        else:
            key = image_key(self.request_id, image.index)
        self.session.store_image(key, image.data, self._image_ttl_s())
        cancelled = self.session.emit(
            "image",
            index=image.index,
            key=key,
            partial=True if image.partial else None,
            provider=provider_id,
            attempt=attempt,
        )
        if cancelled:
            raise errors.Cancelled("cancelled by the producer")

    def _image_ttl_s(self) -> int:
        """The reply's TTL, counted from the run's deadline (the latest the reply is written)."""
        left = max(0.0, self.deadline_at - time.time())
        return self.runtime.settings.reply_ttl_s + int(left) + _IMAGE_TTL_SLACK_S
