"""The ``openai_image`` and ``azure_openai_image`` providers at the wire level: the real
``openai`` SDK against a fake Images API on 127.0.0.1 (tests/providers/images_wire.py).

Checks each model's parameters as sent, the per-model refusals (naming the field, before any
call), base64 and URL answers (the URL served by the same fake, downloaded without the API
key), the size bound, the error answers (content policy, 5xx, 429 with Retry-After), partial
images streamed from gpt-image-1, Azure's URL layout and ``api-key`` header, and that no key
appears in an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from providers import errors
from providers.images import GeneratedImageData, ImageCall, UnsupportedParameter
from providers.openai.images import AzureOpenAIImageProvider, OpenAIImageProvider
from providers.registry import build_provider
from settings.providers import AzureOpenAIImageConfig, OpenAIImageConfig
from tests.fakes.http import Received, Reply
from tests.providers.images_wire import (
    ImageServer,
    b64_item,
    completed_event,
    gpt_image_usage,
    image_stream,
    images_answer,
    jpeg,
    partial_event,
    png,
    url_item,
)
from tests.providers.openai_wire import API_KEY, aim_openai_at, assert_no_secret, error_reply, header

AZURE_KEY = "0123456789abcdef0123456789abcdef"
DEPLOYMENT = "images-prod"
PROMPT = "A lighthouse at dusk, in watercolour"

Factory = Callable[..., OpenAIImageProvider]


@pytest.fixture
def server() -> Iterator[ImageServer]:
    fake = ImageServer()
    with fake:
        yield fake


@pytest.fixture
def make_provider(server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> Factory:
    """``openai_image`` providers on the fake server, without retries."""
    aim_openai_at(server, monkeypatch)

    def build(**fields: Any) -> OpenAIImageProvider:
        provider = build_provider("painter", OpenAIImageConfig(**{"max_retries": 0, **fields}))
        assert isinstance(provider, OpenAIImageProvider)
        return provider

    return build


@pytest.fixture
def make_azure(server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> Factory:
    """``azure_openai_image`` providers on the fake server's ``DEPLOYMENT``."""
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)

    def build(**fields: Any) -> OpenAIImageProvider:
        config = AzureOpenAIImageConfig(
            **{"azure_endpoint": server.url, "azure_deployment": DEPLOYMENT, "max_retries": 0, **fields}
        )
        provider = build_provider("azure_painter", config)
        assert isinstance(provider, AzureOpenAIImageProvider)
        return provider

    return build


def image_call(prompt: str = PROMPT, deadline_s: float = 10.0, **fields: Any) -> ImageCall:
    return ImageCall(prompt=prompt, deadline=time.monotonic() + deadline_s, **fields)


def generate(provider: OpenAIImageProvider, **fields: Any) -> tuple[list[GeneratedImageData], list[GeneratedImageData]]:
    """The images ``provider`` returns for a call of ``fields``, and those it passed to ``on_image``."""
    seen: list[GeneratedImageData] = []
    return provider.run(image_call(**fields), seen.append), seen


def failing(provider: OpenAIImageProvider, **fields: Any) -> errors.CascadeError:
    seen: list[GeneratedImageData] = []
    with pytest.raises(errors.CascadeError) as caught:
        provider.run(image_call(**fields), seen.append)
    return caught.value


def posts(server: ImageServer) -> list[Received]:
    return [request for request in server.received if request.method == "POST"]


# --- each model's parameters on the wire -----------------------------------------------------


def test_dall_e_3_sends_its_parameters_and_keeps_the_revised_prompt(
    server: ImageServer, make_provider: Factory
) -> None:
    image = png(300)
    server.queue(images_answer(b64_item(image, revised_prompt="A tall lighthouse at dusk")))
    images, seen = generate(make_provider(model="dall-e-3"), size="1792x1024", quality="hd", style="natural", n=1)
    [request] = posts(server)
    assert request.path == "/v1/images/generations"
    assert header(request.headers, "Authorization") == f"Bearer {API_KEY}"
    assert request.body == {
        "model": "dall-e-3",
        "prompt": PROMPT,
        "size": "1792x1024",
        "quality": "hd",
        "style": "natural",
        "n": 1,
        "response_format": "b64_json",
    }
    assert [(i.index, i.data, i.mime_type, i.revised_prompt, i.partial) for i in images] == [
        (0, image, "image/png", "A tall lighthouse at dusk", False)
    ]
    assert seen == images


def test_dall_e_2_makes_several_images_each_passed_on_as_ready(server: ImageServer, make_provider: Factory) -> None:
    pictures = [png(100, fill=bytes([65 + number])) for number in range(3)]
    server.queue(images_answer(*(b64_item(picture) for picture in pictures)))
    images, seen = generate(make_provider(model="dall-e-2"), size="512x512", n=3)
    assert posts(server)[0].body == {
        "model": "dall-e-2",
        "prompt": PROMPT,
        "size": "512x512",
        "n": 3,
        "response_format": "b64_json",
    }
    assert [(image.index, image.data) for image in images] == list(enumerate(pictures))
    assert seen == images


def test_gpt_image_1_sends_background_and_format_never_response_format(
    server: ImageServer, make_provider: Factory
) -> None:
    picture = jpeg(200)
    server.queue(
        images_answer(
            b64_item(picture), output_format="jpeg", quality="high", size="1536x1024", usage=gpt_image_usage()
        )
    )
    images, _ = generate(
        make_provider(model="gpt-image-1"), size="1536x1024", quality="high", background="opaque", output_format="jpeg"
    )
    assert posts(server)[0].body == {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "size": "1536x1024",
        "quality": "high",
        "background": "opaque",
        "output_format": "jpeg",
    }
    assert [(image.data, image.mime_type, image.revised_prompt) for image in images] == [(picture, "image/jpeg", None)]


def test_a_model_outside_the_table_gets_the_parameters_unchecked(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer(b64_item(png())))
    generate(make_provider(model="flux-schnell"), size="640x480", style="vivid", n=2)
    assert posts(server)[0].body == {
        "model": "flux-schnell",
        "prompt": PROMPT,
        "size": "640x480",
        "style": "vivid",
        "n": 2,
    }


# --- refused before any call ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        ("dall-e-3", {"size": "512x512"}, "size"),
        ("dall-e-2", {"size": "1792x1024"}, "size"),
        ("gpt-image-1", {"size": "1792x1024"}, "size"),
        ("dall-e-3", {"n": 2}, "n"),
        ("dall-e-2", {"quality": "hd"}, "quality"),
        ("dall-e-3", {"quality": "high"}, "quality"),
        ("gpt-image-1", {"quality": "standard"}, "quality"),
        ("gpt-image-1", {"style": "vivid"}, "style"),
        ("dall-e-2", {"style": "natural"}, "style"),
        ("dall-e-3", {"background": "transparent"}, "background"),
        ("dall-e-2", {"output_format": "webp"}, "output_format"),
        ("gpt-image-1", {"background": "transparent", "output_format": "jpeg"}, "background"),
        ("dall-e-2", {"prompt": "x" * 1001}, "prompt"),
    ],
)
def test_a_parameter_the_model_does_not_take_is_refused_naming_the_field(
    server: ImageServer, make_provider: Factory, model: str, fields: dict[str, Any], field: str
) -> None:
    error = failing(make_provider(model=model), **fields)
    assert isinstance(error, UnsupportedParameter)
    assert isinstance(error, errors.BadProviderRequest)  # provider-fatal: the next provider may take it
    assert error.field == field
    assert f": {field}:" in error.message
    assert server.received == []


def test_n_past_the_entrys_max_images_is_refused(server: ImageServer, make_provider: Factory) -> None:
    error = failing(make_provider(model="dall-e-2", max_images=4), n=5)
    assert isinstance(error, UnsupportedParameter)
    assert error.field == "n"
    assert "max_images 4" in error.message
    assert server.received == []


# --- URL answers ------------------------------------------------------------------------------


def test_a_url_answer_is_downloaded_without_the_api_key(server: ImageServer, make_provider: Factory) -> None:
    picture = png(5000)
    url = server.serve("/blob/img-0.png", picture)
    server.queue(images_answer(url_item(f"{url}?se=2030-01-01&sig=storage-signature", revised_prompt="revised")))
    images, seen = generate(make_provider(model="dall-e-3", response_format="url"))
    post, download = server.received
    assert post.body["response_format"] == "url"
    assert (download.method, download.path, download.query["sig"]) == ("GET", "/blob/img-0.png", ["storage-signature"])
    assert header(download.headers, "Authorization") is None
    assert [(image.data, image.mime_type, image.revised_prompt) for image in images] == [
        (picture, "image/png", "revised")
    ]
    assert seen == images


def test_a_failed_download_is_a_server_error_that_never_shows_the_url(
    server: ImageServer, make_provider: Factory
) -> None:
    url = server.serve("/blob/gone.png", b"", status=403)
    server.queue(images_answer(url_item(f"{url}?sig=storage-signature")))
    error = failing(make_provider(model="dall-e-3", response_format="url"))
    assert isinstance(error, errors.ServerError)
    assert "HTTP 403" in error.message
    assert_no_secret(error, "storage-signature", "/blob/gone.png")


# --- the size bound ---------------------------------------------------------------------------


def test_an_oversize_base64_image_is_refused(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer(b64_item(png(4096))))
    error = failing(make_provider(model="dall-e-2", max_image_bytes=1024))
    assert isinstance(error, errors.BadProviderRequest)
    assert "max_image_bytes 1024" in error.message


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "chunked"])
def test_an_oversize_download_is_refused(server: ImageServer, make_provider: Factory, content_length: bool) -> None:
    url = server.serve("/blob/huge.png", png(64 * 1024), content_length=content_length)
    server.queue(images_answer(url_item(url)))
    error = failing(make_provider(model="dall-e-2", response_format="url", max_image_bytes=10_000))
    assert isinstance(error, errors.BadProviderRequest)
    assert "max_image_bytes 10000" in error.message


# --- unreadable answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [{"b64_json": "not base64!"}, b64_item(b"GIF-ish but no: plain text"), {"revised_prompt": "no image"}],
    ids=["bad-base64", "not-an-image", "neither"],
)
def test_an_unreadable_image_is_a_server_error(
    server: ImageServer, make_provider: Factory, item: dict[str, Any]
) -> None:
    server.queue(images_answer(item))
    assert isinstance(failing(make_provider(model="dall-e-3")), errors.ServerError)


def test_an_answer_without_images_is_a_server_error(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer())
    assert isinstance(failing(make_provider(model="dall-e-3")), errors.ServerError)


def test_the_format_the_answer_states_names_bytes_without_magic(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer(b64_item(b"RIFF-less webp-ish bytes"), output_format="webp"))
    images, _ = generate(make_provider(model="gpt-image-1"), output_format="webp")
    assert images[0].mime_type == "image/webp"


# --- error answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "code", "kind"),
    [
        ("dall-e-3", "content_policy_violation", "invalid_request_error"),
        ("gpt-image-1", "moderation_blocked", "image_generation_user_error"),
    ],
)
def test_a_content_policy_refusal_is_content_filtered(
    server: ImageServer, make_provider: Factory, model: str, code: str, kind: str
) -> None:
    server.queue(error_reply(400, "Your request was rejected by the safety system.", kind, code))
    error = failing(make_provider(model=model))
    assert isinstance(error, errors.ContentFiltered)
    assert not errors.counts_against_provider(error)


def test_a_500_is_a_transient_server_error(server: ImageServer, make_provider: Factory) -> None:
    server.queue(error_reply(500, "The server had an error while processing your request.", "server_error"))
    error = failing(make_provider(model="dall-e-3"))
    assert isinstance(error, errors.ServerError)
    assert isinstance(error, errors.TransientError)
    assert error.status_code == 500


def test_a_429_carries_its_retry_after(server: ImageServer, make_provider: Factory) -> None:
    server.queue(
        error_reply(
            429, "Rate limit reached for images per minute.", "requests", "rate_limit_exceeded", **{"Retry-After": "7"}
        )
    )
    error = failing(make_provider(model="dall-e-3"))
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s == 7.0


def test_no_key_appears_in_an_error(server: ImageServer, make_provider: Factory) -> None:
    server.queue(
        error_reply(401, f"Incorrect API key provided: {API_KEY}.", "invalid_request_error", "invalid_api_key")
    )
    error = failing(make_provider(model="dall-e-3"))
    assert isinstance(error, errors.AuthenticationFailed)
    assert_no_secret(error, API_KEY)


# --- partial images ---------------------------------------------------------------------------


def test_gpt_image_1_streams_partial_images_before_the_final_one(server: ImageServer, make_provider: Factory) -> None:
    first, second, final = png(80, b"1"), png(80, b"2"), png(80, b"F")
    server.queue(image_stream(partial_event(first, 0), partial_event(second, 1), completed_event(final)))
    images, seen = generate(make_provider(model="gpt-image-1", partial_images=2), size="1024x1024")
    body = posts(server)[0].body
    assert (body["stream"], body["partial_images"], body["size"]) == (True, 2, "1024x1024")
    assert [(i.data, i.partial, i.partial_index) for i in seen] == [
        (first, True, 0),
        (second, True, 1),
        (final, False, None),
    ]
    assert images == [seen[-1]]


def test_a_stream_cut_after_a_partial_image_is_interrupted(server: ImageServer, make_provider: Factory) -> None:
    server.queue(image_stream(partial_event(png(), 0), completed_event(png()), cut_after=1))
    assert isinstance(failing(make_provider(model="gpt-image-1", partial_images=1)), errors.StreamInterrupted)


def test_a_refusal_inside_the_stream_is_content_filtered(server: ImageServer, make_provider: Factory) -> None:
    refusal = {
        "type": "error",
        "error": {
            "message": "Rejected by the safety system.",
            "type": "image_generation_user_error",
            "code": "moderation_blocked",
            "param": None,
        },
    }
    server.queue(Reply(events=[refusal], event_names=["error"]))
    assert isinstance(failing(make_provider(model="gpt-image-1", partial_images=1)), errors.ContentFiltered)


def test_several_images_are_never_streamed(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer(b64_item(png()), b64_item(png())))
    images, _ = generate(make_provider(model="gpt-image-1", partial_images=2), n=2)
    assert "stream" not in posts(server)[0].body
    assert [image.partial for image in images] == [False, False]


def test_dall_e_never_streams(server: ImageServer, make_provider: Factory) -> None:
    server.queue(images_answer(b64_item(png())))
    generate(make_provider(model="dall-e-3", partial_images=2))
    assert "stream" not in posts(server)[0].body


# --- Azure ------------------------------------------------------------------------------------


def test_azure_posts_to_the_deployment_with_its_api_key(server: ImageServer, make_azure: Factory) -> None:
    server.queue(images_answer(b64_item(png(), revised_prompt="revised")))
    images, _ = generate(make_azure(model="dall-e-3"), size="1024x1792", style="vivid")
    [request] = posts(server)
    assert request.path == f"/openai/deployments/{DEPLOYMENT}/images/generations"
    assert request.query == {"api-version": ["2025-04-01-preview"]}
    assert header(request.headers, "api-key") == AZURE_KEY
    assert header(request.headers, "Authorization") is None
    assert request.body == {
        "model": "dall-e-3",
        "prompt": PROMPT,
        "size": "1024x1792",
        "style": "vivid",
        "response_format": "b64_json",
    }
    assert images[0].revised_prompt == "revised"


def test_azure_checks_the_configured_models_parameters(server: ImageServer, make_azure: Factory) -> None:
    error = failing(make_azure(model="gpt-image-1"), style="vivid")
    assert isinstance(error, UnsupportedParameter)
    assert error.field == "style"
    assert server.received == []


def test_azure_content_filter_and_no_key_in_the_error(server: ImageServer, make_azure: Factory) -> None:
    body = {
        "error": {
            "code": "content_policy_violation",
            "message": f"Blocked (api-key {AZURE_KEY})",
            "inner_error": {"code": "ResponsibleAIPolicyViolation"},
        }
    }
    server.queue(Reply(status=400, json_body=body))
    error = failing(make_azure())
    assert isinstance(error, errors.ContentFiltered)
    assert_no_secret(error, AZURE_KEY)


# --- limits and stops -------------------------------------------------------------------------


def test_an_answer_slower_than_timeout_s_is_a_provider_timeout(server: ImageServer, make_provider: Factory) -> None:
    server.queue(Reply(json_body={"created": 1, "data": [b64_item(png())]}, delay_s=1.5))
    assert isinstance(failing(make_provider(model="dall-e-3", timeout_s=0.3)), errors.ProviderTimeout)


def test_an_answer_past_the_request_deadline_is_the_deadline(server: ImageServer, make_provider: Factory) -> None:
    server.queue(Reply(json_body={"created": 1, "data": [b64_item(png())]}, delay_s=1.5))
    assert isinstance(failing(make_provider(model="dall-e-3"), deadline_s=0.3), errors.DeadlineExceeded)


def test_a_cancel_from_on_image_propagates_unchanged(server: ImageServer, make_provider: Factory) -> None:
    server.queue(image_stream(partial_event(png(), 0), completed_event(png())))

    def cancel(image: GeneratedImageData) -> None:
        raise errors.Cancelled("cancelled by the producer")

    with pytest.raises(errors.Cancelled):
        make_provider(model="gpt-image-1", partial_images=1).run(image_call(), cancel)


def test_a_missing_key_fails_the_call_naming_the_variable(
    make_provider: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    error = failing(make_provider(model="dall-e-3"))
    assert isinstance(error, errors.AuthenticationFailed)
    assert "OPENAI_API_KEY" in error.message


def test_a_download_that_drips_past_timeout_s_is_stopped(server: ImageServer, make_provider: Factory) -> None:
    # 16 pieces 0.25 s apart: each read is quick, the whole download is not.
    url = server.serve("/blob/drip.png", png(16 * 4096), content_length=False, piece_delay_s=0.25)
    server.queue(images_answer(url_item(url)))
    error = failing(make_provider(model="dall-e-2", response_format="url", timeout_s=1.0))
    assert isinstance(error, errors.ProviderTimeout)


def test_a_failure_after_an_image_was_passed_on_is_interrupted(server: ImageServer, make_provider: Factory) -> None:
    first = server.serve("/blob/one.png", png())
    second = server.serve("/blob/two.png", b"", status=500)
    server.queue(images_answer(url_item(first), url_item(second)))
    seen: list[GeneratedImageData] = []
    with pytest.raises(errors.StreamInterrupted) as caught:
        make_provider(model="dall-e-2", response_format="url").run(image_call(n=2), seen.append)
    assert isinstance(caught.value.__cause__, errors.ServerError)
    assert [image.index for image in seen] == [0]
