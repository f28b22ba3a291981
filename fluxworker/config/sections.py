"""The sections of the configuration file: every key with its default, bounds and description.

Unknown keys are refused. Relative paths resolve against the folder that holds the config file
(the loader passes it as the validation context's ``base``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_NO_TEXT_SUFFIX = (
    "The image contains no text, no letters, no words, no captions, no signs, no watermark and no logo."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def _resolve(value: Any, info: ValidationInfo) -> Path:
    """Make a configured path absolute, relative to the config file's folder."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError("must be a non-empty path")
    base = Path((info.context or {}).get("base", "."))
    path = Path(os.path.expanduser(str(value)))
    return (path if path.is_absolute() else base / path).resolve()


class PathsConfig(_Section):
    inbox: Path = Field(Path("inbox"), description="Folder where job files are dropped.")
    outputs: Path = Field(Path("outputs"), description="Folder for images and completion records.")

    _abs = field_validator("inbox", "outputs", mode="plain")(_resolve)


def looks_like_path(ref: str) -> bool:
    """True for a model reference written as a path rather than a hub id (``org/name``)."""
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1


class ModelsConfig(_Section):
    flux: str = Field(
        "black-forest-labs/FLUX.1-schnell",
        min_length=1,
        description="A diffusers folder, or a hub id fetched only when downloads are allowed.",
    )
    allow_download: bool = Field(False, description="Let the FLUX hub id download its weights.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    esrgan: Path | None = Field(
        None, description="Real-ESRGAN x4 weights (.pth, .safetensors or .pt) for upscale jobs; null: off."
    )
    lama: Path | None = Field(
        None, description="LaMa weights (big-lama.pt, .pth or .safetensors) for the eraser; null: off."
    )
    lazy_load: bool = Field(
        False, description="Load LaMa and Real-ESRGAN on their first job instead of at start."
    )
    unload_after: Annotated[float, Field(ge=0, le=7 * 86_400)] = Field(
        0.0, description="Free LaMa or Real-ESRGAN after this many idle seconds (reloaded when needed); 0: never."
    )

    @field_validator("flux", mode="after")
    @classmethod
    def _flux_path(cls, value: str, info: ValidationInfo) -> str:
        if looks_like_path(value) or (Path((info.context or {}).get("base", ".")) / value).exists():
            return str(_resolve(value, info))
        return value

    @field_validator("esrgan", "lama", mode="plain")
    @classmethod
    def _weights_path(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)


class LimitsConfig(_Section):
    max_width: int = Field(2048, ge=64, le=8192, multiple_of=64)
    max_height: int = Field(2048, ge=64, le=8192, multiple_of=64)
    max_prompt_length: int = Field(2000, ge=1, le=100_000)
    max_image_bytes: int = Field(25_000_000, ge=1024, description="Largest decoded input image file.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=64 * 64, le=20_000 * 20_000, description="Largest input image, in pixels."
    )
    max_job_bytes: int = Field(40_000_000, ge=1024, description="Largest job file or message.")
    max_upscale_pixels: int = Field(
        2048 * 2048, ge=64 * 64, le=8192 * 8192,
        description="Largest image an upscale job may send, in pixels; the output has 16 times as many.",
    )


class UpscaleConfig(_Section):
    tile_size: int = Field(
        512, ge=32, le=4096, description="Input pixels per tile side: bounds the memory one upscale needs."
    )
    tile_overlap: int = Field(
        32, ge=0, le=512, description="Context pixels each tile borrows from its neighbours, cropped after."
    )


class EraseConfig(_Section):
    max_side: int = Field(
        2048, ge=64, le=8192, description="Longest side LaMa works on; larger areas are scaled down for it."
    )
    crop_margin: int = Field(
        256, ge=16, le=4096, description="Context kept around the mask when an image is larger than max_side."
    )


class InboxConfig(_Section):
    scan_interval: Annotated[float, Field(gt=0, le=3600)] = Field(
        2.0, description="Seconds between rescans of the inbox; file events wake the worker sooner."
    )
    settle_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        10.0, description="A file that is still not valid JSON after this long is moved to failed/."
    )
    polling: bool = Field(False, description="Poll the folder instead of inotify (network folders).")


class WorkerConfig(_Section):
    stop_timeout: Annotated[float, Field(gt=0, le=86_400)] = Field(
        600.0, description="On SIGTERM, how long the job in hand may still run."
    )
    no_text_suffix: str = Field(DEFAULT_NO_TEXT_SUFFIX, min_length=1, max_length=1000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    png_compression: int = Field(
        1, ge=0, le=9, description="zlib level of output PNGs: 1 encodes fastest, 9 makes the smallest files."
    )


def _origin(value: str) -> str:
    """A CORS origin as browsers send it: ``scheme://host[:port]``, lower case, no path."""
    if value == "*":
        return value
    parts = urlsplit(value)
    if (parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError("an origin is scheme://host[:port] with nothing after it, "
                         "e.g. http://192.168.1.20:5173 (or * for all)")
    return f"{parts.scheme}://{parts.netloc}".lower()


class HttpConfig(_Section):
    host: str = Field("0.0.0.0", min_length=1, description="Address to listen on (0.0.0.0: the whole LAN).")
    port: int = Field(8000, ge=1, le=65535)
    threads: int = Field(
        48, ge=4, le=1024,
        description="Request threads; waiting requests hold one each, and 4 are kept for everything else.",
    )
    max_queue: int = Field(32, ge=1, le=100_000, description="Queued jobs beyond which POSTs answer 503.")
    retry_after_per_job: Annotated[float, Field(ge=0, le=3600)] = Field(
        2.0, description="Retry-After sent with 503: this many seconds per queued job (at least 1)."
    )
    max_body_bytes: int = Field(
        40_000_000, ge=1024, le=2_000_000_000,
        description="Largest request body; the job it makes must also fit limits.max_job_bytes.",
    )
    wait_timeout: Annotated[float, Field(gt=0, le=86_400)] = Field(
        300.0, description="How long a POST waits for its job before answering 504 (the job goes on)."
    )
    cors_origins: list[Annotated[str, AfterValidator(_origin)]] = Field(
        ["*"], min_length=1, description="Allowed origins (scheme://host[:port]); * allows all."
    )
    api_key: str | None = Field(None, min_length=8, description="When set, requests need this key.")

    @model_validator(mode="after")
    def _threads_cover_the_queue(self) -> "HttpConfig":
        if self.threads < self.max_queue + 4:
            raise ValueError(
                f"threads ({self.threads}) must be at least max_queue + 4 ({self.max_queue + 4}): "
                "every queued job may have a request waiting on it"
            )
        return self


class RetentionConfig(_Section):
    max_age_days: Annotated[float, Field(gt=0, le=36_500)] | None = Field(
        None, description="Remove outputs and failed files older than this; null keeps them."
    )
    max_total_mb: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Remove the oldest outputs and failed files beyond this total; null: no limit."
    )
    interval: Annotated[float, Field(ge=10, le=86_400)] = Field(3600.0, description="Seconds between checks.")

    @property
    def enabled(self) -> bool:
        return self.max_age_days is not None or self.max_total_mb is not None

    @property
    def max_age_seconds(self) -> float | None:
        return None if self.max_age_days is None else self.max_age_days * 86_400

    @property
    def max_total_bytes(self) -> int | None:
        return None if self.max_total_mb is None else int(self.max_total_mb * 1_000_000)


_TOPIC_LEVELS_RE = re.compile(r"^[^/+#$\x00][^+#\x00]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _optional_path(value: Any, info: ValidationInfo) -> Path | None:
    return None if value is None else _resolve(value, info)


class MqttConfig(_Section):
    """The MQTT bridge: jobs in, results, progress and availability out (see the README)."""

    enabled: bool = Field(False, description="Connect to a broker; the inbox keeps working without one.")
    host: str = Field("localhost", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (usually 8883 with TLS).")
    protocol: Literal["v5", "v3.1.1"] = Field("v5", description="MQTT protocol version.")
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA certificates (PEM); null: the system's.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Key of the client certificate (PEM).")
    tls_insecure: bool = Field(False, description="Skip the check of the broker's host name.")
    username: str | None = Field(None, min_length=1, description="User name; null: anonymous.")
    password_env: str = Field(
        "FLUXWORKER_MQTT_PASSWORD", min_length=1, description="Environment variable holding the password."
    )
    password_credential: str = Field(
        "mqtt_password", min_length=1, description="systemd credential holding the password."
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="Client id; null: derived from host and inbox."
    )
    worker_id: str | None = Field(
        None, description="This worker's name when several workers share one topic prefix."
    )
    topic_prefix: str = Field("fluxworker", description="Every topic starts with it.")
    share_group: str | None = Field("fluxworker", description="Shared subscription group; null: none.")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of status, result and image messages.")
    session_expiry: int = Field(
        7 * 24 * 3600, ge=0, le=2**32 - 1, description="Seconds the broker keeps the session while away."
    )
    keepalive: int = Field(60, ge=5, le=65535, description="Seconds between keep-alive pings.")
    reconnect_min_delay: int = Field(1, ge=1, le=3600, description="First wait before reconnecting.")
    reconnect_max_delay: int = Field(60, ge=1, le=3600, description="Longest wait between reconnects.")
    public_base_url: str | None = Field(
        None, description="Turns /outputs/... into an absolute URL in results and for Home Assistant."
    )
    publish_image: bool = Field(False, description="Also publish each image's PNG bytes.")
    max_publish_bytes: int = Field(
        16_000_000, ge=1024, le=268_435_455, description="Largest message published; larger are skipped."
    )
    hass_discovery: bool = Field(False, description="Publish Home Assistant MQTT discovery.")
    hass_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    hass_device_name: str = Field("fluxworker", min_length=1, max_length=100)
    hass_job: dict[str, Any] = Field(
        default_factory=dict, description="Job fields for the Generate button (its prompt comes from the text)."
    )

    _paths = field_validator("ca_file", "cert_file", "key_file", mode="plain")(_optional_path)

    @field_validator("topic_prefix", "hass_prefix")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not _TOPIC_LEVELS_RE.match(value) or value.endswith("/") or "//" in value:
            raise ValueError("must be a topic without wildcards (+ #), without a leading $ or /, "
                             "and without a trailing /")
        return value

    @field_validator("share_group", "worker_id")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError("must be 1 to 64 letters, digits, _ or -")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("reconnect_max_delay")
    @classmethod
    def _delays(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("reconnect_min_delay", 1):
            raise ValueError("must not be below reconnect_min_delay")
        return value


WARMUP_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class PerformanceConfig(_Section):
    """How FLUX uses the GPU: what each performance mode keeps resident, and the optional speed-ups."""

    start_mode: Literal["balanced", "fast"] = Field(
        "balanced", description="Where FLUX's weights sit after start: the mode jobs ask for by default."
    )
    balanced_vram_gib: Annotated[float, Field(gt=0, le=1024)] = Field(
        15.0, description="GPU memory balanced mode may use, in GiB; weights beyond it stream from host memory."
    )
    balanced_reserve_gib: Annotated[float, Field(ge=0, le=1024)] = Field(
        2.5, description="Part of balanced_vram_gib kept for working memory (activations, the VAE decode)."
    )
    prompt_cache: int = Field(16, ge=0, le=4096, description="Prompt embeddings kept for reuse; 0: off.")
    attention: Literal["sdpa", "cudnn", "flash", "efficient"] = Field(
        "sdpa", description="Attention kernel on CUDA: sdpa lets PyTorch choose; the others force one."
    )
    fuse_qkv: bool = Field(True, description="Fuse each attention's q, k and v projections (CUDA).")
    vae_channels_last: bool = Field(True, description="Run the VAE's convolutions in channels_last (CUDA).")
    compile: Literal["auto"] | bool = Field(
        "auto", description="Compile the transformer's repeated blocks (CUDA); auto: on with CUDA unless fp8_storage."
    )
    compile_cache: Path | None = Field(
        None, description="Folder for compiled kernels, kept across restarts; null: $TORCHINDUCTOR_CACHE_DIR."
    )
    warmup: Literal["auto"] | bool = Field(
        "auto", description="Run one image per warmup size before the worker reports ready; auto: on CUDA."
    )
    warmup_sizes: list[str] = Field(
        ["1024x1024", "512x512"], max_length=16, description="WIDTHxHEIGHT sizes warmed up (and compiled) at start."
    )
    fp8_storage: bool = Field(
        False, description="Store the transformer's weights in float8 (half the memory; changes the images)."
    )

    @field_validator("compile_cache", mode="plain")
    @classmethod
    def _cache_path(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @field_validator("warmup_sizes", mode="after")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            match = WARMUP_SIZE.match(size)
            if not match or any(int(side) % 64 or not 64 <= int(side) <= 8192 for side in match.groups()):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT with sides multiples of 64 from 64 to 8192")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PerformanceConfig":
        if self.balanced_reserve_gib >= self.balanced_vram_gib:
            raise ValueError(
                f"balanced_reserve_gib ({self.balanced_reserve_gib}) must be less than balanced_vram_gib "
                f"({self.balanced_vram_gib})"
            )
        if self.compile is True and self.fp8_storage:
            raise ValueError("compile and fp8_storage cannot both be on: float8 storage casts weights in hooks "
                             "that compiled blocks cannot trace")
        return self

    def compiles(self, device: str) -> bool:
        """Whether FLUX's blocks are compiled on ``device``: ``compile: true``, or ``auto`` on CUDA
        without float8 storage (the two cannot be combined)."""
        if self.compile == "auto":
            return device == "cuda" and not self.fp8_storage
        return self.compile

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The warm-up sizes as (width, height)."""
        return [tuple(int(side) for side in WARMUP_SIZE.match(size).groups()) for size in self.warmup_sizes]
