"""The OpenAPI 3.1 description of the HTTP API, built from the job model itself."""

from __future__ import annotations

import copy

from . import __version__
from .config import Config
from .jobs import RESERVED_ID_PREFIX, JobSpec

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again (queue_full, too_many_waiting, "
                                               "shutting_down, outputs_unwritable).",
                                "schema": {"type": "integer", "minimum": 1}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
_LOCATION = {"Location": {"required": True, "description": "Where the job is followed: /jobs/{id}.",
                          "schema": {"type": "string"}}}
_ALLOW = {"Allow": {"required": True, "description": "The methods the path answers.", "schema": {"type": "string"}}}


def _error(description: str, headers: dict | None = None) -> dict:
    answer = {"description": description,
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _json(description: str, ref: str, headers: dict | None = None) -> dict:
    answer = {"description": description,
              "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _or_null(prop: dict) -> dict:
    """Null stands for "left out" on every field (it takes the default)."""
    if any(option.get("type") == "null" for option in prop.get("anyOf", [])):
        return prop
    prop["type"] = [prop["type"], "null"]
    if "enum" in prop:
        prop["enum"] = [*prop["enum"], None]
    return prop


def _request_schemas(config: Config) -> tuple[dict, dict]:
    job = JobSpec.model_json_schema()
    props = {name: _or_null(prop) for name, prop in copy.deepcopy(job["properties"]).items()}
    props.pop("transport")
    props["width"]["maximum"] = config.limits.max_width
    props["height"]["maximum"] = config.limits.max_height
    prompt = props["prompt"]
    prompt["description"] += " Required unless model is lama."
    prompt["anyOf"][0].update(minLength=1, maxLength=config.limits.max_prompt_length, pattern=r"\S")
    upscale_id = copy.deepcopy(props["id"])
    props["id"]["anyOf"][0]["not"] = {"pattern": f"^{RESERVED_ID_PREFIX}"}
    props["id"]["description"] += f" Generate jobs may not use ids that start with {RESERVED_ID_PREFIX}."
    wait = {"type": ["boolean", "null"], "default": True,
            "description": "false: answer 202 with the job id at once and follow it at /jobs/{id}."}

    def job_type(value: str) -> dict:
        return {"enum": [value, None], "default": value, "description": f"Always {value} here; may be left out."}

    generate = {"type": "object", "additionalProperties": False,
                "description": "Every field but prompt may be null, which means the same as leaving it out.",
                "properties": {**props, "type": job_type("generate"), "wait": wait}}
    upscale = {
        "type": "object", "additionalProperties": False, "required": ["image"],
        "properties": {"id": upscale_id, "type": job_type("upscale"),
                       "image": {"type": "string", "description": props["image"]["description"]}, "wait": wait},
    }
    return generate, upscale


def _schemas(config: Config) -> dict:
    generate, upscale = _request_schemas(config)
    return {
        "GenerateRequest": generate,
        "UpscaleRequest": upscale,
        "GenerateResponse": {"type": "object", "required": ["url", "seed", "id"], "properties": {
            "url": {"type": "string", "example": "/outputs/a1b2c3d4.png"},
            "seed": {"type": "integer", "description": "The seed the image was made with."},
            "id": {"type": "string"}}},
        "UpscaleResponse": {"type": "object", "required": ["url", "id"], "properties": {
            "url": {"type": "string", "example": "/outputs/upscale_x1y2z3.png"}, "id": {"type": "string"}}},
        "Accepted": {"type": "object", "required": ["id", "status", "status_url"], "properties": {
            "id": {"type": "string"}, "status": {"const": "queued"}, "status_url": {"type": "string"}}},
        "JobState": {"type": "object", "required": ["id", "status"], "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
            "position": {"type": "integer"}, "step": {"type": "integer"},
            "total": {"type": ["integer", "null"]}, "url": {"type": "string"},
            "seed": {"type": ["integer", "null"], "description": "null for upscale jobs."},
            "error": {"$ref": "#/components/schemas/ErrorBody"}}},
        "JobList": {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobState"}}}},
        "Health": {"type": "object", "required": ["status", "version"], "properties": {
            "status": {"const": "ok"}, "version": {"type": "string"}}},
        "Readiness": {"type": "object", "required": ["ready", "worker", "engines", "unavailable", "error", "queued",
                                                     "waiting"], "properties": {
            "ready": {"type": "boolean"},
            "worker": {"type": ["string", "null"], "description": "The worker's state, or down."},
            "engines": {"type": "array", "items": {"type": "string"}},
            "unavailable": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "Engines that cannot run jobs, and why."},
            "error": {"anyOf": [{"$ref": "#/components/schemas/ErrorBody"}, {"type": "null"}]},
            "queued": {"type": "integer", "description": "Jobs in the queue."},
            "waiting": {"type": "integer", "description": "Requests waiting for their jobs."}}},
        "ErrorBody": {"type": "object", "required": ["code", "message", "field"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}},
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"$ref": "#/components/schemas/ErrorBody"},
            "id": {"type": ["string", "null"], "description": "The job's id, when the job exists (it stays queued "
                                                              "after 503 shutting_down and 504)."},
            "status_url": {"type": "string"}}},
    }


def _answers(responses: dict, public: bool = False) -> dict:
    """An operation's answers, with those every operation may give: 401 (unless the path is
    public), 405 to the other methods of its path, and 500 for a bug."""
    unauthorized = {} if public else {
        "401": _error("Missing or wrong API key (only when a key is configured).", _WWW_AUTHENTICATE)}
    return {**responses, **unauthorized,
            "405": _error("Another method on this path than those it answers, which Allow lists: the "
                          "documented one, HEAD beside GET, and OPTIONS.", _ALLOW),
            "500": _error("A bug: logged by the server.")}


def openapi_document(config: Config) -> dict:
    common = {
        "400": _error("Invalid input (the error names the field), malformed JSON, or a body that cannot be read."),
        "409": _error("id_in_use: the id belongs to a job of the other type."),
        "413": _error("Body over http.max_body_bytes, or a job over limits.max_job_bytes."),
        "415": _error("Body is not application/json."),
        "503": _error("Queue full, too many waiting requests, outputs unwritable or the service stopping "
                      "(with Retry-After), or a job that failed for want of its engine, model or memory.",
                      _RETRY_AFTER),
        "504": _error("The job outlasted the wait; it goes on and its result lands in /outputs."),
    }

    output = {"image/png": {}, "application/json": {}}

    def post(summary: str, schema_ref: str, ok: str) -> dict:
        return {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": schema_ref}}}},
            "responses": _answers({"200": _json("The job is done.", ok),
                                   "202": _json("Queued (wait: false).", "Accepted", _LOCATION), **common}),
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "fluxworker", "version": __version__,
                 "description": "FLUX.1-schnell generation, inpainting and x4 upscaling on one resident worker."},
        "paths": {
            "/generate": {"post": post("Generate an image (text2img, img2img, inpainting)",
                                       "#/components/schemas/GenerateRequest", "GenerateResponse")},
            "/upscale": {"post": post("Upscale an image x4", "#/components/schemas/UpscaleRequest",
                                      "UpscaleResponse")},
            "/jobs": {"get": {
                "summary": "Recent completion records, newest first",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["done", "failed"]}},
                ],
                "responses": _answers({"200": _json("Records.", "JobList"), "400": _error("Bad query.")}),
            }},
            "/jobs/{id}": {"get": {
                "summary": "Where a job stands: queued (position), running (step/total), done or failed",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _answers({"200": _json("The job's state.", "JobState"),
                                       "404": _error("Unknown job id.")}),
            }},
            "/outputs/{name}": {"get": {
                "summary": "An output image (PNG) or completion record (JSON)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _answers({
                    "200": {"description": "The file.", "content": output},
                    "206": {"description": "The byte range a Range header asked for.", "content": output},
                    "304": {"description": "Not modified (If-None-Match or If-Modified-Since): outputs never change."},
                    "404": _error("No such output."),
                    "416": _error("A Range header that asks for no byte of the file."),
                }),
            }},
            "/health": {"get": {"summary": "The API process is alive", "security": [],
                                "responses": _answers({"200": _json("Alive.", "Health")}, public=True)}},
            "/ready": {"get": {"summary": "The worker is running with its models loaded",
                               "responses": _answers({"200": _json("Ready.", "Readiness"),
                                                      "503": _json("Not ready: the same body says why.",
                                                                   "Readiness")})}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": _answers({"200": {"description": "OpenAPI.",
                                                                     "content": {"application/json": {}}}})}},
            "/metrics": {"get": {"summary": "Prometheus metrics: jobs, durations, queue, GPU memory",
                                 "responses": _answers({"200": {"description": "Text exposition format.",
                                                                "content": {"text/plain": {}}}})}},
            "/": {"get": {"summary": "The playground: a page to generate images and browse recent outputs",
                          "security": [],
                          "responses": _answers({"200": {"description": "The page.", "content": {"text/html": {}}}},
                                                public=True)}},
            "/playground.js": {"get": {"summary": "The playground's script", "security": [],
                                       "responses": _answers({"200": {"description": "The script.",
                                                                      "content": {"text/javascript": {}}}},
                                                             public=True)}},
        },
        "components": {
            "schemas": _schemas(config),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }
