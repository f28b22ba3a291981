import base64
import io
import json

import pytest
from PIL import Image

from conftest import png_b64
from fluxworker.config import LimitsConfig
from fluxworker.errors import JobError
from fluxworker.jobs import (
    Job, JobSpec, done_record, failed_record, is_valid_id, new_job_id, parse_job, parse_json, spec_json,
    validate_spec,
)

LIMITS = LimitsConfig()


def rejected(data, limits=LIMITS, default_id=None) -> JobError:
    with pytest.raises(JobError) as caught:
        parse_job(data, limits, default_id=default_id)
    error = caught.value
    assert error.code and error.message
    return error


def assert_rejected(data, code, field, limits=LIMITS):
    error = rejected(data, limits)
    assert (error.code, error.field) == (code, field), error
    if field:
        assert field in error.message


def test_defaults_follow_the_api_document():
    job = parse_job({"prompt": "a cat"}, LIMITS)
    spec = job.spec
    assert spec.type == "generate"
    assert spec.num_inference_steps == 4
    assert (spec.width, spec.height) == (1024, 1024)
    assert spec.seed is None
    assert spec.no_text is False
    assert spec.performance_mode == "balanced"
    assert spec.image is None and spec.mask is None
    assert spec.strength == 0.6
    assert spec.model == "flux"
    assert job.engine == "flux"


def test_id_is_generated_when_absent_and_kept_when_given():
    assert len(parse_job({"prompt": "x"}, LIMITS).id) == 16
    assert parse_job({"prompt": "x"}, LIMITS).id != parse_job({"prompt": "x"}, LIMITS).id
    assert parse_job({"prompt": "x", "id": "my_job-1"}, LIMITS).id == "my_job-1"
    assert parse_job({"prompt": "x"}, LIMITS, default_id="from-file").id == "from-file"
    assert parse_job({"prompt": "x"}, LIMITS, default_id="bad name!").id != "bad name!"


@pytest.mark.parametrize("job_id", ["", "a" * 65, "../etc", "a b", "é", "x.json", 12, "abc\n", "\nabc"])
def test_bad_ids_are_rejected(job_id):
    error = rejected({"prompt": "x", "id": job_id})
    assert error.field == "id"


@pytest.mark.parametrize("job_id", ["abc\n", "abc\r\n", "\nabc", "a\nb", "", "a" * 65, "a/b", None, 7])
def test_is_valid_id_takes_the_whole_string(job_id):
    assert not is_valid_id(job_id)


def test_a_file_name_with_a_newline_is_not_used_as_the_id():
    assert parse_job({"prompt": "x"}, LIMITS, default_id="nl\n").id != "nl\n"


def test_generate_ids_may_not_take_the_upscale_output_prefix():
    """An upscale job writes upscale_<id>.png: a generate job with id upscale_<id> would write
    the same file."""
    error = rejected({"prompt": "x", "id": "upscale_abc"})
    assert (error.code, error.field) == ("invalid_id", "id")
    assert "upscale_" in error.message and "reserved" in error.message
    assert rejected({"prompt": "x"}, default_id="upscale_abc").code == "invalid_id"
    assert parse_job({"type": "upscale", "id": "upscale_abc", "image": png_b64()}, LIMITS).id == "upscale_abc"
    assert parse_job({"prompt": "x", "id": "my_upscale_abc"}, LIMITS).id == "my_upscale_abc"


@pytest.mark.parametrize(
    "field, good, bad, code",
    [
        ("num_inference_steps", [1, 4, 10], [0, 11, -1], "out_of_range"),
        ("width", [64, 512, 1024], [0, 32, 1025, 2048], None),
        ("height", [64, 1024], [100, 1088], None),
        ("seed", [0, 12345, 2**32 - 1, None], [-1, 2**32, 10**30], "out_of_range"),
        ("strength", [0.01, 0.6, 1.0, 1], [0.0, 0.009, 1.01, 2], "out_of_range"),
        ("performance_mode", ["balanced", "fast"], ["turbo", ""], "invalid_choice"),
        ("model", ["flux"], ["sdxl", "LAMA"], "invalid_choice"),
        ("no_text", [True, False], [], None),
    ],
)
def test_field_bounds(field, good, bad, code):
    for value in good:
        spec = parse_job({"prompt": "x", field: value}, LimitsConfig(max_width=1024, max_height=1024)).spec
        assert getattr(spec, field) == value
    for value in bad:
        error = rejected({"prompt": "x", field: value}, LimitsConfig(max_width=1024, max_height=1024))
        assert error.field == field
        if code:
            assert error.code == code


def test_sizes_must_be_multiples_of_64_and_within_the_configured_maximum():
    assert_rejected({"prompt": "x", "width": 100}, "not_multiple_of_64", "width")
    assert_rejected({"prompt": "x", "height": 1088}, "out_of_range", "height", LimitsConfig(max_height=1024))
    assert parse_job({"prompt": "x", "width": 2048}, LIMITS).spec.width == 2048


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", 5), ("prompt", ["a"]), ("num_inference_steps", "4"), ("num_inference_steps", 4.0),
        ("num_inference_steps", True), ("width", "1024"), ("seed", "42"), ("seed", 4.2),
        ("no_text", "true"), ("no_text", 1), ("strength", "0.5"), ("image", 12), ("mask", {}),
    ],
)
def test_wrong_types_are_rejected_with_the_field(field, value):
    job = {"prompt": "x", field: value}
    if field == "mask":
        job["image"] = png_b64()
    error = rejected(job)
    assert (error.code, error.field) == ("invalid_type", field)


def test_null_takes_the_default_of_every_optional_field():
    """Web forms send null for fields left empty: null means "absent", on every way in."""
    optional = ["id", "num_inference_steps", "width", "height", "seed", "no_text", "performance_mode", "image",
                "mask", "strength", "model", "type", "transport"]
    assert set(optional) == set(JobSpec.model_fields) - {"prompt"}
    nulls = parse_job({"prompt": "x", **{name: None for name in optional}}, LIMITS).spec
    assert nulls.model_dump(exclude={"id"}) == parse_job({"prompt": "x"}, LIMITS).spec.model_dump(exclude={"id"})
    assert set(json.loads(spec_json(nulls))) == {"prompt", "id", "type"}  # the job file keeps no nulls
    assert parse_job({"type": "upscale", "image": png_b64(), "prompt": None, "seed": None}, LIMITS).engine == "esrgan"
    assert_rejected({"prompt": "x", "steps": None}, "unknown_field", "steps")


def test_a_negative_seed_is_refused_with_a_pointer_to_null():
    error = rejected({"prompt": "x", "seed": -1})
    assert (error.code, error.field) == ("out_of_range", "seed")
    assert "null" in error.message


def test_prompt_is_required_non_empty_and_bounded():
    assert_rejected({}, "missing_field", "prompt")
    assert_rejected({"prompt": None}, "missing_field", "prompt")
    assert_rejected({"prompt": "   "}, "invalid_value", "prompt")
    assert_rejected({"prompt": "x" * 2001}, "invalid_length", "prompt")
    assert parse_job({"prompt": "x" * 2000}, LIMITS).spec.prompt


def test_unknown_fields_are_rejected():
    assert_rejected({"prompt": "x", "steps": 4}, "unknown_field", "steps")


def test_job_must_be_an_object():
    for data in ([], "text", 3, None):
        error = rejected(data)
        assert error.code == "invalid_job" and error.field is None


def test_nan_and_infinity_are_rejected():
    assert_rejected({"prompt": "x", "strength": float("nan")}, "invalid_number", "strength")
    assert_rejected({"prompt": "x", "strength": float("inf")}, "invalid_number", "strength")


def test_images_as_data_url_or_bare_base64_in_png_jpeg_webp():
    for fmt in ("PNG", "JPEG", "WEBP"):
        for data_url in (True, False):
            job = parse_job({"prompt": "x", "image": png_b64((80, 48), fmt=fmt, data_url=data_url)}, LIMITS)
            assert job.image.size == (80, 48)
    job = parse_job({"prompt": "x", "image": "data:image/jpg;base64," + png_b64(fmt="JPEG", data_url=False)}, LIMITS)
    assert job.image.size == (64, 64)


def test_base64_with_line_breaks_is_accepted():
    encoded = png_b64(data_url=False)
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert parse_job({"prompt": "x", "image": wrapped}, LIMITS).image.size == (64, 64)


@pytest.mark.parametrize(
    "value, code",
    [
        ("not base64 at all!", "invalid_base64"),
        ("data:image/png;base64,@@@@", "invalid_base64"),
        (base64.b64encode(b"hello world, not an image").decode(), "invalid_image"),
        ("data:image/png,rawbytes", "invalid_image"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_image_type"),
        ("", "invalid_image"),
        ("data:image/png;base64,", "invalid_image"),
    ],
)
def test_bad_images_are_rejected_with_their_field(value, code):
    assert_rejected({"prompt": "x", "image": value}, code, "image")


def test_gif_is_not_accepted():
    assert_rejected({"prompt": "x", "image": png_b64(fmt="GIF", mode="P", color=1)}, "unsupported_image_type", "image")


def test_truncated_png_is_rejected():
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 50).save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 2]).decode()
    assert_rejected({"prompt": "x", "image": truncated}, "invalid_image", "image")


def test_image_over_the_pixel_limit_is_rejected_before_decoding():
    limits = LimitsConfig(max_image_pixels=100 * 100)
    assert_rejected({"prompt": "x", "image": png_b64((101, 100))}, "image_too_large", "image", limits)


def test_image_over_the_byte_limit_is_rejected():
    limits = LimitsConfig(max_image_bytes=1024)
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 80).convert("RGB").save(buffer, format="PNG")
    big = base64.b64encode(buffer.getvalue()).decode()
    assert_rejected({"prompt": "x", "image": big}, "image_too_large", "image", limits)


def test_mask_rules():
    assert_rejected({"prompt": "x", "mask": png_b64()}, "missing_field", "image")
    assert_rejected({"prompt": "x", "image": png_b64(), "mask": "zz"}, "invalid_base64", "mask")
    job = parse_job({"prompt": "x", "image": png_b64(), "mask": png_b64(color=(255, 255, 255))}, LIMITS)
    assert job.mask.size == (64, 64)


def test_lama_needs_an_image_and_a_mask_but_no_prompt():
    assert_rejected({"model": "lama"}, "missing_field", "image")
    assert_rejected({"model": "lama", "image": png_b64()}, "missing_field", "mask")
    job = parse_job({"model": "lama", "image": png_b64(), "mask": png_b64()}, LIMITS)
    assert job.engine == "lama"


def test_upscale_jobs_take_an_image_only():
    job = parse_job({"type": "upscale", "image": png_b64()}, LIMITS)
    assert job.engine == "esrgan"
    assert job.output_name == f"upscale_{job.id}.png"
    assert_rejected({"type": "upscale"}, "missing_field", "image")
    assert_rejected({"type": "upscale", "image": png_b64(), "prompt": "x"}, "unexpected_field", "prompt")
    assert_rejected({"type": "resize", "image": png_b64()}, "invalid_choice", "type")


def test_exif_rotated_photo_is_turned_upright():
    image = Image.new("RGB", (80, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    job = parse_job({"prompt": "x", "image": base64.b64encode(buffer.getvalue()).decode()}, LIMITS)
    assert job.image.size == (40, 80)


def test_parse_json_errors():
    for raw in (b"{", b"not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"seed": ' + b"9" * 5000 + b"}"):
        with pytest.raises(JobError) as caught:
            parse_json(raw, 10**7)
        assert caught.value.code == "invalid_json"
    with pytest.raises(JobError) as caught:
        parse_json(b"{}" + b" " * 2000, 1000)
    assert caught.value.code == "too_large"


def test_spec_json_round_trips_and_keeps_only_what_was_set():
    job = parse_job({"prompt": "a cat", "seed": 7, "id": "abc"}, LIMITS)
    stored = json.loads(spec_json(job.spec))
    assert stored == {"prompt": "a cat", "seed": 7, "id": "abc", "type": "generate"}
    assert validate_spec(stored, LIMITS) == job.spec


def test_records_have_the_shared_shape():
    job = Job(JobSpec(id="j1", prompt="x"))
    done = done_record(job, seed=5, width=64, height=64, timings={"run_s": 0.123456})
    assert done["status"] == "done" and done["url"] == "/outputs/j1.png" and done["seed"] == 5
    assert done["timings"] == {"run_s": 0.1235}
    failed = failed_record("j1", JobError("out_of_memory", "too big", None), "generate")
    assert failed["error"] == {"code": "out_of_memory", "message": "too big", "field": None}
    assert len(new_job_id()) == 16
