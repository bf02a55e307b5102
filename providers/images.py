"""The image provider contract: what the chain hands an image provider and what it gets back.

It mirrors the chat contract of ``providers.base``: an ``ImageProvider`` is one configured
``[providers.<id>]`` entry; ``run`` takes an ``ImageCall`` (the request's prompt and image
parameters, its deadline) and calls ``on_image`` with each image as it is ready - partial
images first where the provider streams them - then returns the finished images. It raises
only the taxonomy of ``providers.errors``; transient errors are retried by the chain.

A parameter the provider's model does not take (a size, ``n`` past its limit, ``style`` on a
model without styles) is refused before any call with ``UnsupportedParameter``, a
``BadProviderRequest`` that names the field: the chain falls through to the next provider,
which may take it.

``ImageChainRun`` walks a chain of image providers with the chain's own rules
(``providers.chain.ChainWalk``: retries, cooldowns, fall-through, deadline); its listener gets
each image with the attempt that made it. ``ImageProviderHandle`` is a pool's image provider,
built on its first call.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from providers import errors
from providers.base import ConfiguredProvider
from providers.chain import ChainWalk, FailureListener
from providers.registry import PROVIDER_CLASSES, ProviderPool
from settings.providers import ImageProviderFields, ProviderConfigBase
from tasks.contract.images import ImageRequest


@dataclass(frozen=True)
class ImageCall:
    """One call of an image provider.

    The image parameters are the request's (``None``: the model's default). ``deadline``,
    ``provider_attempt`` and ``wait`` are as in ``providers.base.ProviderCall``.
    """

    prompt: str
    deadline: float
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    output_format: str | None = None
    n: int | None = None
    provider_attempt: int = 1
    wait: Callable[[float], None] = time.sleep

    @classmethod
    def from_request(
        cls,
        request: ImageRequest,
        deadline: float,
        provider_attempt: int = 1,
        wait: Callable[[float], None] = time.sleep,
    ) -> ImageCall:
        """The call for ``request`` (its image parameters as sent by the producer)."""
        return cls(
            prompt=request.prompt,
            deadline=deadline,
            size=request.size,
            quality=request.quality,
            style=request.style,
            background=request.background,
            output_format=request.output_format,
            n=request.n,
            provider_attempt=provider_attempt,
            wait=wait,
        )

    def time_left(self) -> float:
        """Seconds until the request's deadline."""
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class GeneratedImageData:
    """One generated image (or a partial image of one), with its bytes.

    ``index`` is the image of the call it belongs to (0 unless ``n`` > 1). A partial image has
    ``partial`` set and ``partial_index`` counting from 0; the finished image follows it.
    ``revised_prompt`` is the prompt the model actually used, where it rewrites prompts.
    """

    index: int
    data: bytes
    mime_type: str
    model: str
    revised_prompt: str | None = None
    partial: bool = False
    partial_index: int | None = None


OnImage = Callable[[GeneratedImageData], None]


class UnsupportedParameter(errors.BadProviderRequest):
    """The provider's model does not take a request parameter; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class ImageProvider(ConfiguredProvider):
    """A configured image provider."""

    @abc.abstractmethod
    def run(self, call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        """Generate the images for ``call``, calling ``on_image`` with each (partial ones first).

        Returns the finished images, ordered by ``index``. Raises a ``ProviderError`` subclass
        on failure (``UnsupportedParameter`` before any call for a parameter the model does not
        take). Exceptions raised by ``on_image`` (cancel, deadline) must propagate unchanged.
        """


class ImageListener(FailureListener, Protocol):
    """Receives what happens during an image run (the task turns it into stream events)."""

    def on_image(self, provider_id: str, attempt: int, image: GeneratedImageData) -> None:
        """An image (or a partial one) of ``attempt`` is ready; may raise ``Cancelled``,
        ``DeadlineExceeded``, or a ``ProviderError`` that fails the attempt (an image the
        worker will not keep)."""


@dataclass(kw_only=True)
class ImageChainRun(ChainWalk[ImageProvider, GeneratedImageData]):
    """An image request's walk down a chain of image providers (see ``ChainWalk``): each attempt
    calls ``run`` with ``call`` (its attempt number and ``wait`` filled in), its images going
    to ``listener.on_image`` (every finished image the provider returns is announced, in the
    attempt, even by a provider that did not). The outcome's ``results`` are the finished images."""

    call: ImageCall
    listener: ImageListener

    def _attempt(
        self, provider: ImageProvider, attempt: int, provider_attempt: int, emitted: Callable[[], None]
    ) -> list[GeneratedImageData]:
        announced: set[int] = set()

        def on_image(image: GeneratedImageData) -> None:
            if not image.partial:
                announced.add(image.index)
            self.listener.on_image(provider.provider_id, attempt, image)
            emitted()  # counted once announced: an image the listener refused was never seen

        call = dataclasses.replace(self.call, deadline=self.deadline, provider_attempt=provider_attempt, wait=self.wait)
        images = provider.run(call, on_image)
        for image in images:
            if image.index not in announced:
                on_image(image)  # a provider that returned an image without announcing it: announced now
        return images


def is_image_provider(config: ProviderConfigBase) -> bool:
    """True for the entry of an image provider (it serves ``cascade.image`` chains only)."""
    return isinstance(config, ImageProviderFields)


class ImageProviderHandle(ImageProvider):
    """An image provider of a ``ProviderPool``, built on its first ``run``; its id, config and
    queue are known without building it."""

    def __init__(self, pool: ProviderPool, provider_id: str, config: ProviderConfigBase) -> None:
        super().__init__(provider_id, config)
        self._pool = pool

    @classmethod
    def chain(cls, pool: ProviderPool, configs: dict[str, ProviderConfigBase], ids: list[str]) -> list[ImageProvider]:
        """Handles on the image providers ``ids`` of ``pool`` (entries in ``configs``), in order."""
        return [cls(pool, provider_id, configs[provider_id]) for provider_id in ids]

    @property
    def provider_class_name(self) -> str:
        """The class name of the provider behind the handle (for Haystack's meta key)."""
        return PROVIDER_CLASSES[self.config.type].rpartition(":")[2]

    def warm_up(self) -> None:
        """Build the provider now."""
        self._provider()

    def run(self, call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        """Build the provider if needed and run it."""
        return self._provider().run(call, on_image)

    def _provider(self) -> ImageProvider:
        provider: object = self._pool.get(self.provider_id)
        if not isinstance(provider, ImageProvider):
            # The settings keep chat providers out of image chains; a handle must not run one.
            raise errors.ProviderUnavailable(f"{self.provider_id} is not an image provider")
        return provider
