"""GenAI semantic-convention names of Cascade's providers (worker/telemetry/genai.py): image
providers' calls are ``generate_content``, chat providers' ``chat``."""

from __future__ import annotations

from settings import ScriptedConfig
from settings.providers import AzureOpenAIImageConfig, OpenAIConfig, OpenAIImageConfig
from worker.telemetry import genai


def test_an_image_provider_generates_content_and_a_chat_provider_chats() -> None:
    painter = genai.provider_attributes(OpenAIImageConfig(model="gpt-image-1"))
    assert painter[genai.OPERATION_NAME] == "generate_content"
    assert painter[genai.PROVIDER_NAME] == painter[genai.SYSTEM] == "openai"
    assert painter[genai.REQUEST_MODEL] == "gpt-image-1"
    azure = AzureOpenAIImageConfig(azure_endpoint="https://x.openai.azure.com", azure_deployment="images-prod")
    assert genai.provider_attributes(azure)[genai.PROVIDER_NAME] == "azure.ai.openai"
    assert genai.provider_attributes(azure)[genai.REQUEST_MODEL] == "images-prod"
    for config in (OpenAIConfig(model="gpt-4.1-mini"), ScriptedConfig(text="hi"), None):
        assert genai.provider_attributes(config)[genai.OPERATION_NAME] == "chat"
