"""What each OpenAI image model takes, and the check of a call against it before it is sent.

===========  ===========================  ===================  =====  ======  ==============  ================
model        size                         quality              n      prompt  style           answers with
===========  ===========================  ===================  =====  ======  ==============  ================
dall-e-2     256x256, 512x512, 1024x1024  standard             1-10   1000    --              b64_json or url
dall-e-3     1024x1024, 1792x1024,        standard, hd         1      4000    vivid, natural  b64_json or url
             1024x1792
gpt-image-1  1024x1024, 1536x1024,        low, medium, high,   1-10   32000   --              b64_json
             1024x1536, auto              auto
===========  ===========================  ===================  =====  ======  ==============  ================

Only gpt-image-1 takes ``background`` (transparent, opaque, auto; transparent needs png or
webp) and ``output_format`` (png, jpeg, webp), and only it streams partial images.

Sources: the OpenAI API reference for ``POST /images/generations`` and the ``openai`` SDK's
``Images.generate`` docstrings (n "between 1 and 10; for dall-e-3 only n=1", the sizes per model,
``hd`` for dall-e-3 only, ``style`` for dall-e-3 only, ``background`` / ``output_format`` /
``stream`` / ``partial_images`` (0-3) for the GPT image models, ``response_format`` unsupported
by them: they always answer base64; a transparent background needs png or webp).

A model outside the table (an OpenAI-compatible server, a newer model) gets the request's
parameters unchecked: the server is the judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from providers.images import ImageCall, UnsupportedParameter


@dataclass(frozen=True)
class ImageModelRules:
    """The parameters one image model takes; an empty tuple means "not a parameter of it"."""

    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int
    max_prompt_chars: int
    styles: tuple[str, ...] = ()
    backgrounds: tuple[str, ...] = ()
    output_formats: tuple[str, ...] = ()
    takes_response_format: bool = False
    streams_partial_images: bool = False


MODEL_RULES: dict[str, ImageModelRules] = {
    "dall-e-2": ImageModelRules(
        sizes=("256x256", "512x512", "1024x1024"),
        qualities=("standard",),
        max_n=10,
        max_prompt_chars=1000,
        takes_response_format=True,
    ),
    "dall-e-3": ImageModelRules(
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        qualities=("standard", "hd"),
        max_n=1,
        max_prompt_chars=4000,
        styles=("vivid", "natural"),
        takes_response_format=True,
    ),
    "gpt-image-1": ImageModelRules(
        sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
        qualities=("low", "medium", "high", "auto"),
        max_n=10,
        max_prompt_chars=32_000,
        backgrounds=("transparent", "opaque", "auto"),
        output_formats=("png", "jpeg", "webp"),
        streams_partial_images=True,
    ),
}

# The parameters of an ImageCall sent as they are (when set).
_PASSED = ("size", "quality", "style", "background", "output_format")


def rules_for(model: str) -> ImageModelRules | None:
    """The rules of ``model`` (case-insensitive), ``None`` for a model outside the table."""
    return MODEL_RULES.get(model.strip().lower())


def checked_parameters(provider_id: str, model: str, call: ImageCall, max_images: int) -> dict[str, Any]:
    """The Images API parameters for ``call`` (besides ``model`` and ``prompt``).

    Raises ``UnsupportedParameter`` naming the first field ``model`` does not take, or an ``n``
    past the provider's ``max_images``.
    """
    if call.n is not None and call.n > max_images:
        message = f"{provider_id}: n: {call.n} is more than this provider's max_images {max_images}"
        raise UnsupportedParameter(message, "n")
    params: dict[str, Any] = {name: getattr(call, name) for name in _PASSED if getattr(call, name) is not None}
    if call.n is not None:
        params["n"] = call.n
    rules = rules_for(model)
    if rules is None:
        return params
    if len(call.prompt) > rules.max_prompt_chars:
        raise UnsupportedParameter(
            f"{provider_id}: prompt: {len(call.prompt)} characters, {model} takes at most {rules.max_prompt_chars}",
            "prompt",
        )
    allowed = {
        "size": rules.sizes,
        "quality": rules.qualities,
        "style": rules.styles,
        "background": rules.backgrounds,
        "output_format": rules.output_formats,
    }
    for name in _PASSED:
        value = params.get(name)
        if value is None or value in allowed[name]:
            continue
        if not allowed[name]:
            raise UnsupportedParameter(f"{provider_id}: {name}: {model} takes no {name} (got {value!r})", name)
        raise UnsupportedParameter(
            f"{provider_id}: {name}: {value!r} is not one {model} takes ({', '.join(allowed[name])})", name
        )
    if call.n is not None and call.n > rules.max_n:
        limit = "1 image" if rules.max_n == 1 else f"1 to {rules.max_n} images"
        raise UnsupportedParameter(f"{provider_id}: n: {model} makes {limit} per request, not {call.n}", "n")
    if params.get("background") == "transparent" and params.get("output_format") == "jpeg":
        raise UnsupportedParameter(
            f"{provider_id}: background: transparent needs output_format png or webp, not jpeg", "background"
        )
    return params
