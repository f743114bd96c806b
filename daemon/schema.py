"""ResolveScan request and response types, validation errors, and the OpenAPI document.

One set of msgspec types gives decoding, validation with exact field paths, and the JSON
Schema that the OpenAPI document embeds, so the served document cannot drift from the code.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, Literal

import msgspec

UUID_PATTERN = r"^[0-9a-fA-F]{8}\-[0-9a-fA-F]{4}\-[0-9a-fA-F]{4}\-[0-9a-fA-F]{4}\-[0-9a-fA-F]{12}$"
# Python's "$" also matches before a trailing newline, so the exact length closes that gap.
UUID_LENGTH = 36
MAX_STORE_ID_LENGTH = 255
MAX_VALUE_LENGTH = 1000
MAX_ID_LENGTH = 255

Location = Literal["ENTRY", "EXIT", "MANUAL_IN_STORE"]
Channel = Literal["OPTICAL", "RADIO", "CONTACT"]
IdentityType = Literal["SHOPPER", "ASSOCIATE", "CASH", "LOYALTY"]
Action = Literal["ACCEPT", "REJECT"]

LOCATIONS: tuple[str, ...] = ("ENTRY", "EXIT", "MANUAL_IN_STORE")
CHANNELS: tuple[str, ...] = ("OPTICAL", "RADIO", "CONTACT")


class ScanEvent(msgspec.Struct, kw_only=True):
    id: Annotated[
        str,
        msgspec.Meta(
            pattern=UUID_PATTERN,
            min_length=UUID_LENGTH,
            max_length=UUID_LENGTH,
            description="UUID of one interaction with a gate; repeated calls reuse it.",
        ),
    ]
    timestamp: Annotated[
        dt.datetime,
        msgspec.Meta(tz=True, description="When the scan happened, RFC 3339 with an offset."),
    ]
    location: Annotated[Location, msgspec.Meta(description="Where the scan happened.")]
    value: Annotated[
        str,
        msgspec.Meta(
            max_length=MAX_VALUE_LENGTH, description="The scanned payload (QR code, badge, card)."
        ),
    ]
    channel: Annotated[Channel, msgspec.Meta(description="How the key was read.")]


class ResolveScanRequest(msgspec.Struct, kw_only=True):
    requestId: Annotated[
        str,
        msgspec.Meta(
            pattern=UUID_PATTERN,
            min_length=UUID_LENGTH,
            max_length=UUID_LENGTH,
            description="UUID Amazon makes for each call.",
        ),
    ]
    storeId: Annotated[
        str,
        msgspec.Meta(
            max_length=MAX_STORE_ID_LENGTH, description="Store id assigned at onboarding."
        ),
    ]
    scanEvent: ScanEvent


class ResolveScanResponse(msgspec.Struct, kw_only=True):
    id: Annotated[
        str,
        msgspec.Meta(max_length=MAX_ID_LENGTH, description="Identifier Amazon associates."),
    ]
    type: IdentityType
    action: Action


class FieldError(msgspec.Struct, kw_only=True):
    field: Annotated[str, msgspec.Meta(description="Dotted path of the field, e.g. scanEvent.id")]
    message: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class RequestInvalid(Exception):
    """A ResolveScan body that does not match the contract."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors


_REQUEST_DECODER = msgspec.json.Decoder(ResolveScanRequest)
_ANY_DECODER = msgspec.json.Decoder()

_FIELD_RULES: dict[str, str] = {
    "requestId": "uuid",
    "storeId": "store",
    "scanEvent.id": "uuid",
    "scanEvent.timestamp": "timestamp",
    "scanEvent.location": "location",
    "scanEvent.value": "value",
    "scanEvent.channel": "channel",
}


class BodyInvalid(Exception):
    """A body that is not a JSON object at all; the message gives the cause."""


_UTF8_BOM = b"\xef\xbb\xbf"


def decode_request(body: bytes) -> ResolveScanRequest:
    """Decode and validate a ResolveScan body.

    Raises BodyInvalid when the body is not a JSON object, and RequestInvalid listing every
    offending field when it is one that breaks the contract. A UTF-8 byte order mark before
    the JSON is ignored, as RFC 8259 allows.
    """
    if body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM) :]
    try:
        return _REQUEST_DECODER.decode(body)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        if not _json_module_may_read(body, exc):
            raise BodyInvalid(_describe_decode_error(body, exc)) from None
    except RecursionError:
        raise BodyInvalid("the JSON body is nested too deeply") from None

    # The fast decoder stops at the first error; walk the document again to report all.
    try:
        document = _ANY_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        # The typed decoder can fail on the first value before it reaches trailing garbage.
        document = _decode_with_json_module(body, exc)
    except RecursionError:
        raise BodyInvalid("the JSON body is nested too deeply") from None
    if not isinstance(document, dict):
        raise BodyInvalid(f"the JSON body must be an object, got {_json_type(document)}")
    errors: list[FieldError] = []
    _collect_errors(document, ResolveScanRequest, "", errors)
    if errors:
        raise RequestInvalid(errors)

    # The walk found no error when an object repeats a key: the typed decoder validates every
    # occurrence, and the document keeps the last one. The last one wins, as it does in the
    # typed decoder when every occurrence is valid. Unknown attributes are left out, because
    # msgspec cannot convert a name that contains an unpaired surrogate.
    try:
        return msgspec.convert(_known_fields(document, ResolveScanRequest), ResolveScanRequest)
    except msgspec.ValidationError:  # pragma: no cover - the walk checks every field first
        raise RequestInvalid(
            [FieldError(field="(body)", message="does not match the request schema")]
        ) from None


_OUT_OF_RANGE = re.compile(r"(Integer value|Number) out of range")
# A \u escape in the range of UTF-16 surrogates, D800 to DFFF.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _json_module_may_read(body: bytes, exc: msgspec.DecodeError) -> bool:
    """Tell whether a msgspec decode error may come from JSON that Python's json module reads.

    msgspec rejects numbers it cannot hold, and a surrogate escape without its pair. The
    message for the latter depends on what follows the escape ("Input data was truncated"
    among them), so the body is searched for the escape instead.
    """
    return bool(_OUT_OF_RANGE.search(str(exc)) or _SURROGATE_ESCAPE.search(body))


def _decode_with_json_module(body: bytes, exc: msgspec.DecodeError) -> Any:
    """Decode valid JSON that msgspec rejects, so that the errors can name the field.

    Python's json module reads numbers msgspec cannot hold as int or inf, and an unpaired
    surrogate escape as that code point. Other decode errors, and integers beyond its digit
    limit, raise BodyInvalid as before.
    """
    if not _json_module_may_read(body, exc):
        raise BodyInvalid(_describe_decode_error(body, exc)) from None
    try:
        # The json module would also read UTF-16 text and NaN, which JSON does not allow.
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BodyInvalid(_describe_decode_error(body, exc)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _describe_decode_error(body: bytes, exc: msgspec.DecodeError) -> str:
    if not body.strip():
        return "the request body is empty; send a JSON object"
    # JSON text starts with an ASCII character, so a NUL byte among the first two bytes
    # means UTF-16 or UTF-32.
    if body.startswith(_UTF16_BOMS) or b"\x00" in body[:2]:
        return "the request body is UTF-16 or UTF-32 text; send the JSON in UTF-8"
    text = str(exc)
    if "UTF-8" in text:
        return "the request body is not valid UTF-8"
    return f"the request body is not valid JSON ({text})"


def _collect_errors(
    document: dict[str, Any], struct_type: type[msgspec.Struct], prefix: str, errors: list
) -> None:
    for field in msgspec.structs.fields(struct_type):
        path = f"{prefix}{field.encode_name}"
        if field.encode_name not in document:
            errors.append(FieldError(field=path, message="missing required field"))
            continue
        value = document[field.encode_name]
        if isinstance(value, str) and _has_lone_surrogate(value):
            errors.append(
                FieldError(
                    field=path,
                    message="contains a \\u escape of a UTF-16 surrogate without its pair;"
                    " send the text as UTF-8, or escape a character beyond U+FFFF as a pair",
                )
            )
            continue
        if field.type is ScanEvent:
            if not isinstance(value, dict):
                errors.append(
                    FieldError(field=path, message=f"must be an object, got {_json_type(value)}")
                )
            else:
                _collect_errors(value, ScanEvent, path + ".", errors)
            continue
        try:
            msgspec.convert(value, field.type)
        except msgspec.ValidationError:
            errors.append(FieldError(field=path, message=_describe_field(path, value)))


def _known_fields(document: dict[str, Any], struct_type: type[msgspec.Struct]) -> dict[str, Any]:
    known: dict[str, Any] = {}
    for field in msgspec.structs.fields(struct_type):
        value = document[field.encode_name]
        if field.type is ScanEvent:
            value = _known_fields(value, ScanEvent)
        known[field.encode_name] = value
    return known


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _describe_field(path: str, value: Any) -> str:
    rule = _FIELD_RULES[path]
    if value is None:
        return "must not be null"
    if not isinstance(value, str):
        expected = "an RFC 3339 date-time string" if rule == "timestamp" else "a string"
        return f"must be {expected}, got {_json_type(value)}"

    shown = _show(value)
    if rule == "uuid":
        return f"must be a UUID (8-4-4-4-12 hexadecimal digits), got {shown}"
    if rule == "store":
        return f"must be at most {MAX_STORE_ID_LENGTH} characters, got {len(value)}"
    if rule == "value":
        # The scanned value is a secret; report its length only.
        return f"must be at most {MAX_VALUE_LENGTH} characters, got {len(value)}"
    if rule == "location":
        return f"must be one of {', '.join(LOCATIONS)} (upper case), got {shown}"
    if rule == "channel":
        return f"must be one of {', '.join(CHANNELS)} (upper case), got {shown}"
    return (
        "must be an RFC 3339 date-time with a valid date and an offset,"
        f" such as 2024-04-25T13:03:14Z, got {shown}"
    )


def _show(value: str, limit: int = 64) -> str:
    if len(value) > limit:
        return repr(value[:limit] + "...")
    return repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


PROBLEM_MEDIA_TYPE = "application/problem+json"
_PROBLEM_ENCODER = msgspec.json.Encoder()
_RESPONSE_ENCODER = msgspec.json.Encoder()


def encode_response(response: ResolveScanResponse) -> bytes:
    return _RESPONSE_ENCODER.encode(response)


def encode_problem(problem: Problem) -> bytes:
    return _PROBLEM_ENCODER.encode(problem)


def openapi_document() -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for the gateway-facing API from the types above."""
    (request, response, problem), components = msgspec.json.schema_components(
        [ResolveScanRequest, ResolveScanResponse, Problem],
        ref_template="#/components/schemas/{name}",
    )

    def problem_response(description: str) -> dict[str, Any]:
        return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": problem}}}

    health = {
        "200": {
            "description": "Up (healthz) or ready (readyz).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "503": {
            "description": "Not ready.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Identity Connector",
            "version": "1.0.0",
            "description": (
                "ResolveScan as called by Amazon's Identity Gateway, answered by an"
                " on-premises identity cache."
            ),
        },
        "paths": {
            "/v1/identity/scan": {
                "post": {
                    "operationId": "ResolveScan",
                    "summary": "Resolve a scanned key to an identity and an ACCEPT or REJECT.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": request}},
                    },
                    "responses": {
                        "200": {
                            "description": "The decision.",
                            "content": {"application/json": {"schema": response}},
                        },
                        "400": problem_response("The body breaks the contract; see errors."),
                        "401": problem_response(
                            "An API key is configured and the request carries none, several"
                            " or an invalid one ([auth] api_key_header)."
                        ),
                        "403": problem_response(
                            "The client is outside [auth] allow_networks, or its client"
                            " certificate names none of [tls] client_names."
                        ),
                        "408": problem_response(
                            "The body did not arrive within [server] client_timeout."
                        ),
                        "413": problem_response("The body is larger than the configured limit."),
                        "415": problem_response(
                            "The body is not sent as application/json, not in UTF-8, or"
                            " with a Content-Encoding other than gzip or deflate."
                        ),
                        "422": problem_response(
                            "The scanEvent.id was used before with a different payload."
                        ),
                        "429": {
                            **problem_response(
                                "The client sent more than [auth] rate_limit requests per"
                                " second or rate_burst at once."
                            ),
                            "headers": {
                                "Retry-After": {
                                    "description": "Seconds to wait before the next request.",
                                    "schema": {"type": "integer", "minimum": 1},
                                }
                            },
                        },
                        "500": problem_response("The connector failed; see its log."),
                        "503": {
                            **problem_response(
                                "The connector began to stop before it admitted the request;"
                                " nothing was decided, so send the request again."
                            ),
                            "headers": {
                                "Retry-After": {
                                    "description": "Seconds to wait before the next request.",
                                    "schema": {"type": "integer", "minimum": 1},
                                }
                            },
                        },
                    },
                }
            },
            "/healthz": {"get": {"operationId": "Healthz", "responses": health}},
            "/readyz": {"get": {"operationId": "Readyz", "responses": health}},
        },
        "components": {"schemas": components},
    }
