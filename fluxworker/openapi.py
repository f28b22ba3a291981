"""The OpenAPI 3.1 description of the HTTP API, built from the job model itself."""

from __future__ import annotations

import copy

from . import __version__
from .config import Config
from .jobs import JobSpec


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, ref: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _request_schemas(config: Config) -> tuple[dict, dict]:
    job = JobSpec.model_json_schema()
    props = copy.deepcopy(job["properties"])
    props.pop("type")
    props.pop("transport")
    props["width"]["maximum"] = config.limits.max_width
    props["height"]["maximum"] = config.limits.max_height
    props["prompt"]["description"] += " Required unless model is lama."
    wait = {"type": "boolean", "default": True,
            "description": "false: answer 202 with the job id at once and follow it at /jobs/{id}."}
    generate = {"type": "object", "additionalProperties": False, "properties": {**props, "wait": wait}}
    upscale = {
        "type": "object", "additionalProperties": False, "required": ["image"],
        "properties": {"id": props["id"], "image": props["image"], "wait": wait},
    }
    return generate, upscale


def openapi_document(config: Config) -> dict:
    generate, upscale = _request_schemas(config)
    common = {
        "400": _error("Invalid input: the error names the field."),
        "401": _error("Missing or wrong API key (only when a key is configured)."),
        "413": _error("Body over the size limit."),
        "415": _error("Body is not application/json."),
        "503": _error("Queue full (with Retry-After), engine unavailable, or the service is stopping."),
        "504": _error("The job outlasted the wait; it goes on and its result lands in /outputs."),
    }
    post = lambda summary, schema_ref, ok: {  # noqa: E731
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": schema_ref}}}},
        "responses": {"200": _json("The job is done.", ok), "202": _json("Queued (wait: false).", "Accepted"),
                      **common, "500": _error("A bug: logged by the server.")},
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
                "responses": {"200": _json("Records.", "JobList"), "400": _error("Bad query."),
                              "401": common["401"]},
            }},
            "/jobs/{id}": {"get": {
                "summary": "Where a job stands: queued (position), running (step/total), done or failed",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json("The job's state.", "JobState"), "404": _error("Unknown job id."),
                              "401": common["401"]},
            }},
            "/outputs/{name}": {"get": {
                "summary": "An output image (PNG) or completion record (JSON)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file.", "content": {"image/png": {}, "application/json": {}}},
                              "404": _error("No such output."), "401": common["401"]},
            }},
            "/health": {"get": {"summary": "The API process is alive", "security": [],
                                "responses": {"200": {"description": "Alive."}}}},
            "/ready": {"get": {"summary": "The worker is running with its models loaded",
                               "responses": {"200": {"description": "Ready."}, "503": {"description": "Not ready."},
                                             "401": common["401"]}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI."}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics: jobs, durations, queue, GPU memory",
                                 "responses": {"200": {"description": "Text exposition format.",
                                                       "content": {"text/plain": {}}},
                                               "401": common["401"]}}},
        },
        "components": {
            "schemas": {
                "GenerateRequest": generate,
                "UpscaleRequest": upscale,
                "GenerateResponse": {"type": "object", "required": ["url", "seed"], "properties": {
                    "url": {"type": "string", "example": "/outputs/a1b2c3d4.png"},
                    "seed": {"type": "integer"}, "id": {"type": "string"}}},
                "UpscaleResponse": {"type": "object", "required": ["url"], "properties": {
                    "url": {"type": "string", "example": "/outputs/upscale_x1y2z3.png"}, "id": {"type": "string"}}},
                "Accepted": {"type": "object", "required": ["id", "status", "status_url"], "properties": {
                    "id": {"type": "string"}, "status": {"const": "queued"}, "status_url": {"type": "string"}}},
                "JobState": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
                    "position": {"type": "integer"}, "step": {"type": "integer"},
                    "total": {"type": ["integer", "null"]}, "url": {"type": "string"},
                    "seed": {"type": ["integer", "null"]}, "error": {"$ref": "#/components/schemas/ErrorBody"}}},
                "JobList": {"type": "object", "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobState"}}}},
                "ErrorBody": {"type": "object", "required": ["code", "message", "field"], "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}},
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"$ref": "#/components/schemas/ErrorBody"}}},
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }
