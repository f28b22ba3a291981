"""The one job model: job spec, validation, and the completion record.

The inbox, MQTT and HTTP all hand raw JSON to :func:`parse_job` and publish the records built by
:func:`done_record` and :func:`failed_record`; no transport validates or reshapes on its own.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import LimitsConfig
from .errors import JobError
from .images import decode_base64_image

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch: "$" would let a trailing newline in
# Upscale outputs are named upscale_<id>.png: a generate job with such an id would share its image file.
RESERVED_ID_PREFIX = "upscale_"
SEED_MAX = 2**32 - 1
GENERATE_ONLY = (
    "prompt", "num_inference_steps", "width", "height", "seed", "no_text",
    "performance_mode", "mask", "strength", "model",
)


class JobSpec(BaseModel):
    """A job as clients write it. Field names, defaults and ranges follow the HTTP API document."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    id: str | None = Field(None, pattern=ID_PATTERN, description="Job id; generated when absent.")
    type: Literal["generate", "upscale"] = Field("generate", description="What to do.")
    prompt: str | None = Field(None, description="Text of the image wanted (required for FLUX generation).")
    num_inference_steps: int = Field(4, ge=1, le=10, description="Denoising steps; schnell excels at 4.")
    width: int = Field(1024, ge=64, multiple_of=64, description="Image width, a multiple of 64.")
    height: int = Field(1024, ge=64, multiple_of=64, description="Image height, a multiple of 64.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Seed; drawn and returned when null.")
    no_text: bool = Field(False, description="Append a constraint to the prompt that keeps text out.")
    performance_mode: Literal["balanced", "fast"] = Field("balanced", description="VRAM use versus speed.")
    image: str | None = Field(None, description="Reference image: data URL or bare base64 of PNG/JPEG/WebP.")
    mask: str | None = Field(None, description="Inpainting mask, white = repaint: data URL or base64.")
    strength: float = Field(0.6, ge=0.01, le=1.0, description="How far img2img/inpaint moves from the image.")
    model: Literal["flux", "lama"] = Field("flux", description="Inpainting engine: flux or lama (eraser).")
    transport: Literal["inbox", "http", "mqtt"] = Field(
        "inbox", description="How the job arrived; the HTTP and MQTT transports set it themselves."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """A field sent as null takes its default, as if it were left out (web forms send null)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return data


@dataclass(frozen=True)
class Job:
    """A validated job: its spec (with its id set) and its decoded images."""

    spec: JobSpec
    image: Image.Image | None = None
    mask: Image.Image | None = None

    @property
    def id(self) -> str:
        return self.spec.id  # type: ignore[return-value]

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def engine(self) -> str:
        """Which engine runs this job: ``flux``, ``lama`` or ``esrgan``."""
        if self.spec.type == "upscale":
            return "esrgan"
        return self.spec.model

    @property
    def output_name(self) -> str:
        return f"upscale_{self.id}.png" if self.spec.type == "upscale" else f"{self.id}.png"


def new_job_id() -> str:
    """A fresh job id: 16 hex digits."""
    return uuid.uuid4().hex[:16]


def is_valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def draw_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "multiple_of": "not_multiple_of_64",
    "literal_error": "invalid_choice",
    "string_pattern_mismatch": "invalid_format",
    "finite_number": "invalid_number",
}


def _from_validation_error(exc: ValidationError) -> JobError:
    item = exc.errors()[0]
    field = str(item["loc"][0]) if item["loc"] else None
    code = _CODES.get(item["type"])
    if code is None:
        code = "invalid_type" if item["type"].endswith(("_type", "_parsing")) else "invalid_value"
    message = item["msg"]
    if item["type"] == "extra_forbidden":
        message = "unknown field"
    elif field == "seed" and code == "out_of_range":
        message = f"must be from 0 to {SEED_MAX}; send null (or leave it out) for a random seed"
    return JobError(code, f"{field}: {message}" if field else message, field)


def parse_json(raw: bytes | str, max_bytes: int) -> Any:
    """Parse a job's JSON text; any failure is a ``JobError`` with code ``invalid_json``."""
    if len(raw) > max_bytes:
        raise JobError("too_large", f"the job is larger than the limit of {max_bytes} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers malformed text, bad UTF-8 and integers with too many digits.
        raise JobError("invalid_json", f"not valid JSON: {exc}") from None


def validate_spec(data: Any, limits: LimitsConfig) -> JobSpec:
    """Check a job object against the model and the configured limits, without decoding images."""
    if not isinstance(data, dict):
        raise JobError("invalid_job", f"a job must be a JSON object, not {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None

    given = spec.model_fields_set
    _check_id(spec.id, spec.type)
    if spec.type == "upscale":
        for name in GENERATE_ONLY:
            if name in given:
                raise JobError("unexpected_field", f"{name}: not used by upscale jobs", name)
        if spec.image is None:
            raise JobError("missing_field", "image: an upscale job needs an image", "image")
        return spec

    if spec.model == "lama":
        if spec.image is None:
            raise JobError("missing_field", "image: the lama eraser needs an image", "image")
        if spec.mask is None:
            raise JobError("missing_field", "mask: the lama eraser needs a mask (white = erase)", "mask")
    else:
        if spec.prompt is None:
            raise JobError("missing_field", "prompt: required", "prompt")
    if spec.prompt is not None:
        if not spec.prompt.strip():
            raise JobError("invalid_value", "prompt: must not be empty", "prompt")
        if len(spec.prompt) > limits.max_prompt_length:
            raise JobError(
                "invalid_length", f"prompt: longer than {limits.max_prompt_length} characters", "prompt"
            )
    if spec.mask is not None and spec.image is None:
        raise JobError("missing_field", "image: a mask needs the image it applies to", "image")
    if spec.width > limits.max_width:
        raise JobError("out_of_range", f"width: must be at most {limits.max_width}", "width")
    if spec.height > limits.max_height:
        raise JobError("out_of_range", f"height: must be at most {limits.max_height}", "height")
    return spec


def _check_id(job_id: str | None, job_type: str) -> None:
    if job_type == "generate" and job_id is not None and job_id.startswith(RESERVED_ID_PREFIX):
        raise JobError("invalid_id", f"id: {job_id!r} starts with {RESERVED_ID_PREFIX!r}, which is reserved: "
                       f"upscale jobs write their image as {RESERVED_ID_PREFIX}<id>.png", "id")


def parse_job(data: Any, limits: LimitsConfig, default_id: str | None = None) -> Job:
    """Validate a job object and decode its images.

    The id is the spec's ``id``, else ``default_id`` (the inbox file's name), else a new one.
    """
    spec = validate_spec(data, limits)
    if spec.id is None:
        spec = spec.model_copy(update={"id": default_id if is_valid_id(default_id) else new_job_id()})
        _check_id(spec.id, spec.type)
    image = mask = None
    if spec.image is not None:
        image = decode_base64_image(spec.image, "image", limits.max_image_bytes, limits.max_image_pixels)
        if spec.type == "upscale" and image.width * image.height > limits.max_upscale_pixels:
            raise JobError(
                "image_too_large",
                f"image: {image.width}x{image.height} is over the upscale limit of "
                f"{limits.max_upscale_pixels} pixels (limits.max_upscale_pixels)",
                "image",
            )
    if spec.mask is not None:
        mask = decode_base64_image(spec.mask, "mask", limits.max_image_bytes, limits.max_image_pixels)
    return Job(spec, image, mask)


def spec_json(spec: JobSpec) -> bytes:
    """The job as it is stored in the inbox: every field the client set, plus ``id`` and ``type``."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    data["id"] = spec.id
    data["type"] = spec.type
    if spec.seed is not None:
        data["seed"] = spec.seed
    return json.dumps(data, ensure_ascii=False).encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def done_record(job: Job, *, seed: int | None, width: int, height: int, timings: dict[str, float]) -> dict:
    """The completion record of a job that produced its image."""
    return {
        "id": job.id,
        "type": job.type,
        "status": "done",
        "url": f"/outputs/{job.output_name}",
        "file": job.output_name,
        "seed": seed,
        "model": job.engine,
        "width": width,
        "height": height,
        "timings": {key: round(value, 4) for key, value in timings.items()},
        "finished_at": now_iso(),
    }


def failed_record(job_id: str, error: JobError, job_type: str | None = None) -> dict:
    """The completion record of a job that failed or was refused."""
    return {
        "id": job_id,
        "type": job_type,
        "status": "failed",
        "error": error.to_dict(),
        "finished_at": now_iso(),
    }
