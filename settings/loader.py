"""Loading ``Settings`` from the environment and the TOML file, with errors that name the key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

from settings.base import Settings


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the offending key."""


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build ``Settings`` from ``CASCADE_*`` variables and the TOML file.

    ``config_path`` (or ``CASCADE_CONFIG``) names the TOML file; ``overrides`` win over both
    (for tests and embedding). Raises ``ConfigError`` with a one-line-per-problem message.
    """
    config_override = overrides.pop("config", None)  # never passed twice to Settings below
    path_text = config_path or config_override or os.environ.get("CASCADE_CONFIG")
    path = Path(path_text) if path_text else None
    file_data = _read_toml(path) if path else {}
    unknown = sorted(set(file_data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(unknown)}")
    try:
        return _settings_class(file_data)(config=path, **overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"CASCADE_CONFIG: no such file {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _settings_class(file_data: dict[str, Any]) -> type[Settings]:
    """A ``Settings`` subclass whose lowest-priority source is the TOML file's data."""

    class FileBackedSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_data)

    return FileBackedSettings


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = str(path) if path else "settings"
    lines = [f"invalid configuration in {where}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        # Validators of nested tables already prefix each line with its full key.
        nested = key and message.startswith(f"{key}.")
        for line in message.splitlines():
            lines.append(f"  {line}" if nested or not key else f"  {key}: {line}")
    return "\n".join(lines)
