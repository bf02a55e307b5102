"""The ``openai_image`` and ``azure_openai_image`` providers: ``POST /images/generations``.

The call's parameters are checked against the model's (``providers.openai.image_models``)
before anything is sent. DALL-E models are asked for ``response_format`` (``b64_json`` unless
the entry says ``url``); GPT image models always answer base64. An image that comes as a URL
is downloaded at once - through ``httpx2``, without the provider's credentials (the URL
carries its own), bounded by ``max_image_bytes`` and the call's time - so no provider URL,
which expires, is ever kept or shown in a message. A decoded or downloaded image larger than
``max_image_bytes`` fails the call with ``BadProviderRequest`` (no retry: it would be as
large again). The MIME type comes from the image's magic bytes, else from the format the
answer or the request states; bytes that are neither are an unreadable answer.

Partial images: with ``partial_images`` set on the entry, a model that streams them
(gpt-image-1, or a model outside the table) and a request for one image, the call is sent
with ``stream=True`` and each ``image_generation.partial_image`` event goes to ``on_image``
as a partial image before the ``image_generation.completed`` one. A stream that ends or fails
after partial images went out is a ``StreamInterrupted``, as is any failure after an earlier
image of the call went to ``on_image`` (a retry would show it again). With ``n`` > 1 nothing
is streamed: the stream's events do not say which image a partial belongs to.

Errors cross the same boundary as the chat providers' (``translate_openai_error``): a 400
``content_policy_violation`` / ``moderation_blocked`` is ``ContentFiltered`` (provider-fatal),
a 429 ``RateLimited`` with its Retry-After, a 5xx ``ServerError``. The call is bounded by a
``CallGuard`` as theirs are (``first_chunk_timeout_s`` bounds the wait for the first image,
partial or whole).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

import httpx2
import openai

from providers import errors
from providers.guard import CallGuard
from providers.images import GeneratedImageData, ImageCall, ImageProvider, OnImage
from providers.openai.azure import build_azure_client
from providers.openai.common import CONNECT_TIMEOUT_S, SDK_ERRORS, Emitted, OpenAISdk, request_timeout
from providers.openai.image_models import checked_parameters, rules_for
from settings.providers import AzureOpenAIImageConfig, OpenAIImageConfig

T = TypeVar("T")

_MAX_REDIRECTS = 5
_MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


def sniff_mime_type(data: bytes) -> str | None:
    """The MIME type that ``data``'s magic bytes announce (PNG, JPEG, WebP, GIF), if any."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


class OpenAIImageProvider(OpenAISdk, ImageProvider):
    """``type = "openai_image"``; see the module docstring."""

    config: OpenAIImageConfig | AzureOpenAIImageConfig

    def __init__(self, provider_id: str, config: OpenAIImageConfig | AzureOpenAIImageConfig) -> None:
        super().__init__(provider_id, config)
        self.config = config
        self.init_sdk()
        self._downloads: httpx2.Client | None = None

    @property
    def wire_model(self) -> str:
        """The ``model`` sent in the request body, and whose parameters are checked."""
        return self.config.model

    def clients(self) -> tuple[openai.OpenAI, httpx2.Client]:
        """The SDK client and the download client, built on first use (so a missing key fails a
        call, not the worker)."""
        client = self.client()
        with self._client_lock:
            if self._downloads is None:
                self._downloads = httpx2.Client(follow_redirects=True, max_redirects=_MAX_REDIRECTS)
            return client, self._downloads

    # --- the call -----------------------------------------------------------------------

    def run(self, call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        """Generate the images of ``call``; raises only taxonomy errors (and whatever
        ``on_image`` raises)."""
        if call.time_left() <= 0:
            raise errors.DeadlineExceeded("the request's deadline passed")
        params = checked_parameters(self.provider_id, self.wire_model, call, self.config.max_images)
        rules = rules_for(self.wire_model)
        if rules is not None and rules.takes_response_format:
            params["response_format"] = self.config.response_format
        streams = rules.streams_partial_images if rules is not None else True
        client, downloads = self.clients()
        with CallGuard(call, self.config, self.provider_id) as guard:
            if self.config.partial_images and streams and (call.n or 1) == 1:
                return self._streamed(client, call, guard, params, on_image)
            return self._whole(client, downloads, call, guard, params, on_image)

    def _whole(
        self,
        client: openai.OpenAI,
        downloads: httpx2.Client,
        call: ImageCall,
        guard: CallGuard,
        params: dict[str, Any],
        on_image: OnImage,
    ) -> list[GeneratedImageData]:
        timeout = request_timeout(guard)
        answer = self.open(
            guard,
            call,
            lambda: client.images.generate(model=self.wire_model, prompt=call.prompt, timeout=timeout, **params),
        )
        guard.chunk_received()
        declared = answer.output_format or params.get("output_format")
        images: list[GeneratedImageData] = []
        for index, item in enumerate(answer.data or []):
            try:
                if item.b64_json:
                    data = self._decoded(item.b64_json, index)
                elif item.url:
                    data = self._downloaded(downloads, item.url, index, call, guard)
                else:
                    raise self._unreadable(f"image {index} has neither b64_json nor url")
                image = self._image(index, data, declared, item.revised_prompt)
            except errors.ProviderError as exc:
                # Subscribers may have seen the images before this one: a retry would show them again.
                failure = self.interrupted(exc, len(images))
                if failure is exc:
                    raise
                raise failure from exc
            images.append(image)
            on_image(image)
        if not images:
            raise self._unreadable("the answer held no images")
        return images

    def _streamed(
        self, client: openai.OpenAI, call: ImageCall, guard: CallGuard, params: dict[str, Any], on_image: OnImage
    ) -> list[GeneratedImageData]:
        timeout = request_timeout(guard)
        partial_images = self.config.partial_images
        stream = self.open(
            guard,
            call,
            lambda: client.images.generate(
                model=self.wire_model,
                prompt=call.prompt,
                stream=True,
                partial_images=partial_images,
                timeout=timeout,
                **params,
            ),
        )
        emitted = Emitted()  # partial images passed to on_image
        with stream:  # closed at once on any exit, a cancel from on_image included
            for event in self.events(guard, call, stream, emitted):
                if event.type not in ("image_generation.partial_image", "image_generation.completed"):
                    continue
                guard.chunk_received()
                data = self._decoded(event.b64_json, 0, emitted=emitted.chunks)
                if event.type == "image_generation.completed":
                    final = self._image(0, data, event.output_format, None, emitted=emitted.chunks)
                    on_image(final)
                    return [final]
                index = event.partial_image_index
                image = self._image(0, data, event.output_format, None, partial_index=index, emitted=emitted.chunks)
                emitted.chunks += 1
                on_image(image)
        if emitted.chunks:
            message = f"{self.provider_id}: the stream ended early (after {emitted.chunks} partial images)"
            raise errors.StreamInterrupted(message)
        raise errors.ProviderConnectionError(f"{self.provider_id}: the stream ended before any image")

    # --- reading the answer -------------------------------------------------------------

    def _decoded(self, b64: str, index: int, emitted: int = 0) -> bytes:
        """The bytes of a base64 image, refused unread when they would pass ``max_image_bytes``."""
        if len(b64) // 4 * 3 > self.config.max_image_bytes + 2:  # base64: 4 characters per 3 bytes
            raise self.interrupted(self._oversize(index, len(b64) // 4 * 3), emitted)
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise self.interrupted(self._unreadable(f"image {index} is not valid base64"), emitted) from None
        if len(data) > self.config.max_image_bytes:
            raise self.interrupted(self._oversize(index, len(data)), emitted)
        return data

    def _downloaded(self, downloads: httpx2.Client, url: str, index: int, call: ImageCall, guard: CallGuard) -> bytes:
        """The bytes at ``url``, read within the call's time and ``max_image_bytes``.

        Messages never hold the URL: it carries the storage's own credentials.
        """
        if not url.startswith(("https://", "http://")):
            raise self._unreadable(f"image {index} has a URL that is not http(s)")
        limit = self.config.max_image_bytes
        # Not the guard's first-read timeout: the first image has arrived, so the whole call's
        # limits apply; the guard stops a download that outlives them (checked between reads).
        read_s = max(0.001, min(self.config.timeout_s, call.time_left()))
        timeout = httpx2.Timeout(read_s, connect=min(CONNECT_TIMEOUT_S, read_s))
        try:
            with downloads.stream("GET", url, timeout=timeout) as response:
                if response.status_code != 200:
                    raise errors.ServerError(
                        f"{self.provider_id}: image {index} download answered HTTP {response.status_code}",
                        status_code=response.status_code,
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise self._oversize(index, int(declared))
                parts: list[bytes] = []
                received = 0
                for part in response.iter_bytes():
                    received += len(part)
                    if received > limit:
                        raise self._oversize(index, received, at_least=True)
                    parts.append(part)
                    guard.raise_if_fired()  # a server that drips bytes is stopped by the call's limits
                return b"".join(parts)
        except SDK_ERRORS as exc:
            error = self.fail(exc, guard, call, emitted=0)
        raise error from error.__cause__

    def _image(
        self,
        index: int,
        data: bytes,
        declared: str | None,
        revised_prompt: str | None,
        partial_index: int | None = None,
        emitted: int = 0,
    ) -> GeneratedImageData:
        mime_type = sniff_mime_type(data) or _MIME_TYPES.get(declared or "")
        if mime_type is None:
            error = self._unreadable(f"image {index} is not a PNG, JPEG, WebP or GIF image")
            raise self.interrupted(error, emitted)
        return GeneratedImageData(
            index=index,
            data=data,
            mime_type=mime_type,
            model=self.wire_model,
            revised_prompt=revised_prompt,
            partial=partial_index is not None,
            partial_index=partial_index,
        )

    # --- errors -------------------------------------------------------------------------

    def _oversize(self, index: int, size: int, at_least: bool = False) -> errors.ProviderError:
        more = "more than " if at_least else ""
        limit = self.config.max_image_bytes
        return errors.BadProviderRequest(
            f"{self.provider_id}: image {index} is {more}{size} bytes, over max_image_bytes {limit}"
        )

    def _unreadable(self, what: str) -> errors.ProviderError:
        return errors.ServerError(f"{self.provider_id}: unreadable answer from the provider: {what}")


class AzureOpenAIImageProvider(OpenAIImageProvider):
    """``type = "azure_openai_image"``: the Images API on an Azure OpenAI deployment
    (``{azure_endpoint}/openai/deployments/{azure_deployment}/images/generations``)."""

    config: AzureOpenAIImageConfig

    def build_client(self) -> tuple[openai.OpenAI, tuple[str, ...]]:
        """An ``AzureOpenAI`` client; see ``providers.openai.azure.build_azure_client``."""
        return build_azure_client(self.provider_id, self.config)

    @property
    def wire_model(self) -> str:
        """The configured model, else the deployment's name (the deployment's URL picks the model)."""
        return self.config.model_name
