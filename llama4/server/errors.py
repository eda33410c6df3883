"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Codes follow OpenAI's where it has one (``invalid_value``, ``integer_above_max_value``,
``context_length_exceeded``, ``model_not_found``...), so clients can branch on ``code`` and
``param`` rather than on words.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from llama4.server import protocol as P


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, P.ErrorResponse(
            error=P.ErrorDetail(message=message, type=type, param=param, code=code))


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, param, code, type).body.model_dump(), status_code=status)


def check_range(value: int | None, lo: int, hi: int, param: str) -> None:
    """An integer parameter outside [lo, hi] is a 400 with OpenAI's range codes."""
    if value is None:
        return
    if value < lo:
        raise APIError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, but "
                       f"got {value} instead.", param, "integer_below_min_value")
    if value > hi:
        raise APIError(400, f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, but "
                       f"got {value} instead.", param, "integer_above_max_value")


_RANGE_CODES = {"greater_than_equal": "below_min_value", "greater_than": "below_min_value",
                "less_than_equal": "above_max_value", "less_than": "above_max_value"}


def _param(err: dict) -> str | None:
    """The request field an error is about: its location without "body" and without the tags
    pydantic adds for the members of a union ("str", "list[int]")."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    loc = [x for x in loc if x.isdigit() or (x.isidentifier() and x not in _UNION_TAGS)]
    return ".".join(loc) or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def validation_error(exc: RequestValidationError, required: tuple[str, ...] | list[str] = ()
                     ) -> tuple[str, str | None, str]:
    """(message, param, code) of a request body pydantic refused. ``required``: the body's
    required fields, named when the whole body is missing."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "We could not parse the JSON body of your request: malformed JSON.", None, "invalid_json"
    if not errs:
        return "Invalid request.", None, "invalid_request"
    e = errs[0]
    param = _param(e)
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        if param is None:  # no body at all: every required field is missing; name them
            if not required:
                return "Missing request body.", None, "missing_required_parameter"
            names = ", ".join(f"'{n}'" for n in required)
            return (f"Missing required parameter: '{required[0]}' (the request body is empty; required: "
                    f"{names})."), required[0], "missing_required_parameter"
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if len(errs) > 1:  # a union (prompt: string | strings | ids | lists of ids): every member's reason
        parts = [(_param(x) or "").split(".") for x in errs]
        common = [p[0] for p in zip(*parts) if len(set(p)) == 1]
        param = ".".join(common) or param
        msg = "no accepted form matches (" + "; ".join(list(dict.fromkeys(x.get("msg", "") for x in errs))[:4]) + ")"
    if param:
        msg = f"Invalid value for '{param}': {msg}."
    code = "invalid_value"
    if e.get("type") in _RANGE_CODES:
        bound = next(iter((e.get("ctx") or {}).values()), None)  # the limit's type is the field's
        kind = "integer" if isinstance(bound, int) and not isinstance(bound, bool) else "decimal"
        code = f"{kind}_{_RANGE_CODES[e['type']]}"
    return msg, param, code
