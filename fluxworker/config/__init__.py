"""The configuration file: its schema (:mod:`.sections`), loading and validation.

Every key is declared with its bounds; unknown keys are refused. Errors name the key path and the
offending value, so a typo in ``config.yaml`` stops the program with a message that says what to
fix. Relative paths resolve against the folder that holds the config file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from .sections import (
    DEFAULT_NO_TEXT_SUFFIX,
    EraseConfig,
    HttpConfig,
    InboxConfig,
    LimitsConfig,
    ModelsConfig,
    MqttConfig,
    PathsConfig,
    PerformanceConfig,
    RetentionConfig,
    UpscaleConfig,
    WorkerConfig,
    _Section,
    looks_like_path,
)

__all__ = [
    "DEFAULT_NO_TEXT_SUFFIX", "Config", "ConfigError", "EraseConfig", "HttpConfig", "InboxConfig", "LimitsConfig",
    "ModelsConfig", "MqttConfig", "PathsConfig", "PerformanceConfig", "RetentionConfig", "UpscaleConfig",
    "WorkerConfig", "config_path", "load_config", "looks_like_path", "parse_config",
]

SECRET_KEYS = frozenset({"api_key"})  # never printed: not in errors, not by check-config
HIDDEN = "<hidden>"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the value."""


class Config(_Section):
    paths: PathsConfig = PathsConfig.model_construct()
    models: ModelsConfig = ModelsConfig.model_construct()
    limits: LimitsConfig = LimitsConfig()
    inbox: InboxConfig = InboxConfig()
    worker: WorkerConfig = WorkerConfig()
    http: HttpConfig = HttpConfig()
    retention: RetentionConfig = RetentionConfig()
    upscale: UpscaleConfig = UpscaleConfig()
    erase: EraseConfig = EraseConfig()
    mqtt: MqttConfig = MqttConfig()
    performance: PerformanceConfig = PerformanceConfig()

    source: Path | None = Field(None, exclude=True)

    def dump(self) -> dict[str, Any]:
        """The effective configuration as plain data (paths as strings, secrets hidden)."""
        data = self.model_dump(mode="json", exclude={"source"})
        if data["http"].get("api_key") is not None:
            data["http"]["api_key"] = HIDDEN
        return data


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key ({_shown(item)})")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif item["loc"] and item["loc"][-1] in SECRET_KEYS:
            lines.append(f"  {key}: {item['msg']} (the value is not shown: it is a secret)")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item['input']!r})")
    return "\n".join(lines)


def _shown(item: dict) -> str:
    """An unknown key's value for its error: shortened, and hidden when the key may hold a secret
    (a misspelt ``api_key`` or password)."""
    name = str(item["loc"][-1]).lower() if item["loc"] else ""
    if any(word in name for word in ("key", "kee", "pas", "secret", "token", "cred")):
        return "the value is not shown: it may be a secret"
    text = repr(item["input"])
    return f"got {text if len(text) <= 80 else text[:77] + '...'}"


def parse_config(data: Any, base: Path, source: str = "config") -> Config:
    """Validate configuration data; relative paths resolve against ``base``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(data).__name__}")
    # Sections left out still get their paths resolved, so validate them explicitly.
    data = {"paths": {}, "models": {}, **data}
    try:
        config = Config.model_validate(data, context={"base": str(base)})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    _check_hass_job(config, source)
    return config


def _check_hass_job(config: Config, source: str) -> None:
    """The Generate button's job fields must make a valid job with the configured limits."""
    from ..errors import JobError
    from ..jobs import validate_spec

    job = config.mqtt.hass_job
    if not job:
        return
    if "id" in job:
        raise ConfigError(f"{source}: invalid configuration\n  mqtt.hass_job: every press makes a new job, "
                          f"so it cannot carry an id (got {job!r})")
    try:
        validate_spec({"prompt": "a prompt", **job}, config.limits)
    except JobError as exc:
        raise ConfigError(f"{source}: invalid configuration\n  mqtt.hass_job: {exc.message} (got {job!r})") from None


def config_path(explicit: str | os.PathLike | None) -> Path:
    """Where the config lives: ``--config``, else ``$FLUXWORKER_CONFIG``, else ``./config.yaml``."""
    return Path(explicit or os.environ.get("FLUXWORKER_CONFIG") or "config.yaml").expanduser().resolve()


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file chosen by :func:`config_path`."""
    path = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (use --config or $FLUXWORKER_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse_config(data, path.parent, str(path))
    config.source = path
    return config
