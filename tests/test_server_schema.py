"""``llama4 serve`` matches its own OpenAPI schema, as a property-based client sees it: schemathesis
(code no one here wrote) reads ``/openapi.json`` from the server on loopback, generates requests
for every operation, valid ones (positive) and invalid ones (negative: wrong types, missing
fields, out-of-range values), and runs all its response checks on each answer: no 5xx, every
status code, content type, header and body documented in the schema, invalid data refused, valid
data accepted. Valid data may be refused only for what a JSON schema cannot state (SEMANTIC).
Every path also answers a method it does not have with 405 and ``Allow``, and an empty body
names the missing field.
"""

from __future__ import annotations

import re

import pytest

from oracles import require
from serving import serving, write_tiny_model_dir

from llama4.infer.model_dir import load_model_dir

schemathesis = require("schemathesis")
hypothesis = require("hypothesis")
st = require("hypothesis.strategies")
httpx = require("httpx")
require("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_EXAMPLES = 40  # per operation (positive and negative drawn together); the run takes seconds
# a drawn chat holding a tool message is refused unless that message answers a call just before it
# (no JSON schema states order), so chat gets more draws to keep accepted requests among them
CHAT_EXAMPLES = 120
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

# A schema-valid request the server still refuses, only for what a JSON schema cannot state (it
# depends on several fields or on the prompt's length), each with its error code.
SEMANTIC = {
    "POST /v1/chat/completions": {"context_length_exceeded", "invalid_value"},  # top_logprobs without logprobs
    # echo with stream; max_tokens 0 without echo (nothing to score, nothing to generate)
    "POST /v1/completions": {"context_length_exceeded", "unsupported_parameter", "invalid_value"},
}

# ... and the tool fields whose rules span several fields: a tool message answering no call of the
# assistant message before it, call arguments that are not a JSON object, a tool_choice naming no
# declared function (or requiring one with no tools), a function declared twice
TOOL_SEMANTIC = re.compile(r"messages\.\d+\.(role|tool_call_id|tool_calls\.\d+\.function\.arguments)|tool_choice"
                           r"|tools\.\d+\.function\.name")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from llama4.infer.engine import Engine, EngineConfig

    model, tok, name = load_model_dir(write_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny"))
    engine = Engine(model, EngineConfig(max_batch=4, max_context=256, prefill_chunk=64))
    with serving(engine, tok, name, default_max_tokens=4) as u:
        yield u, name


@pytest.fixture()
def url(served):
    return served[0]


def _positive_data_accepted(case, response) -> None:
    """schemathesis's positive_data_acceptance (a schema-valid request gets 2xx, 3xx, 401, 403,
    404, 409, 429 or 5xx), with the SEMANTIC 400s allowed."""
    from schemathesis.generation.modes import GenerationMode

    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    status = response.status_code
    if status // 100 in (2, 3, 5) or status in (401, 403, 404, 409, 429):
        return
    label = case.operation.label
    assert status == 400, (label, status, response.text)
    err = response.json()["error"]
    assert err["code"] in SEMANTIC.get(label, ()), (
        f"{label}: a schema-valid request was refused: {err} (body: {str(case.body)[:3000]})")
    if err["code"] == "invalid_value" and label == "POST /v1/chat/completions":
        assert (err["param"] == "top_logprobs" and not case.body.get("logprobs")) or \
            TOOL_SEMANTIC.fullmatch(err["param"] or ""), err
    if err["code"] == "invalid_value" and label == "POST /v1/completions":
        assert err["param"] == "max_tokens" and case.body["max_tokens"] == 0 and not case.body.get("echo"), err
    if err["code"] == "unsupported_parameter":
        assert case.body.get("echo") and case.body.get("stream"), err


def test_schemathesis_all_checks(served):
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    url, name = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[str, list[int]] = {}
    failures = {}
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 8, f"only {len(ops)} operations in the schema"
    for op in ops:
        strategies = [op.as_strategy(GenerationMode.POSITIVE)]
        if op.body or op.path_parameters or op.query:  # something to get wrong
            strategies.append(op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=st.one_of(strategies), served_model=st.booleans())
        @settings(max_examples=CHAT_EXAMPLES if op.label == "POST /v1/chat/completions" else MAX_EXAMPLES,
                  deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case, served_model):
            if served_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = name  # else nearly every valid request is a 404 for an unknown model
            # every built-in check; positive_data_acceptance in its form above
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            statuses.setdefault(op.label, []).append(response.status_code)
            _positive_data_accepted(case, response)

        try:
            check()
        except (Exception, BaseExceptionGroup) as e:  # schemathesis raises one group of every failed check
            subs = getattr(e, "exceptions", ())
            failures[op.label] = "\n".join([str(e)] + [f"  - {x!r}"[:1500] for x in subs])[:4000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    for label in SEMANTIC:  # the generation routes really generated, and really refused bad input
        assert 200 in statuses[label] and 400 in statuses[label], (label, sorted(set(statuses[label])))
    print({k: {c: v.count(c) for c in sorted(set(v))} for k, v in statuses.items()})


def test_every_undocumented_method_is_405_with_allow(url):
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    for path, ops in paths.items():
        documented = {m.upper() for m in ops}
        concrete = path.replace("{model_id}", "tiny")
        for method in METHODS:
            if method in documented:
                continue
            r = httpx.request(method, f"{url}{concrete}")
            assert r.status_code == 405, (method, path, r.status_code)
            allow = set(r.headers.get("allow", "").split(", "))
            assert documented <= allow <= documented | {"HEAD"}, (method, path, r.headers)
            assert r.json()["error"]["code"] == "method_not_allowed"


def test_empty_body_names_the_missing_field(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "missing_required_parameter", err
    assert err["param"] in ("model", "messages") and f"'{err['param']}'" in err["message"], err
    for path, first in (("/v1/completions", "model"), ("/v1/chat/completions", "model"), ("/tokenize", "prompt")):
        r = httpx.post(f"{url}{path}", content=b"", headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == first and "None" not in err["message"], (path, err)
