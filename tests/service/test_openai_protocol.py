"""The public OpenAI-shaped formats (tandem.protocol.openai): parsing, validation, encoding."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from tandem.protocol.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    ModelCard,
    ModelList,
    OpenAIError,
    TandemInfo,
    Usage,
    completion_prompt,
    decode_chat_request,
    decode_completion_request,
    encode_json,
    error_body,
    retry_after_seconds,
    stop_list,
)


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def rejected(data: bytes, *, completion: bool = False) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        if completion:
            decode_completion_request(data)
        else:
            decode_chat_request(data)
    return info.value


def test_chat_request_fields() -> None:
    req = decode_chat_request(
        body(
            max_tokens=10,
            temperature=0,
            top_p=0.9,
            top_k=-1,
            seed=3,
            stop="x",
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,
            presence_penalty=0.0,  # unknown fields are ignored
        )
    )
    assert req.max_tokens == 10 and req.effective_max_tokens() == 10
    assert req.temperature == 0.0 and req.top_p == 0.9 and req.top_k == -1 and req.seed == 3
    assert req.stream and req.stream_options is not None and req.stream_options.include_usage
    assert req.ignore_eos
    assert stop_list(req.stop) == ["x"]
    assert decode_chat_request(body(max_tokens=5, max_completion_tokens=7)).effective_max_tokens() == 7
    assert decode_chat_request(body()).effective_max_tokens() is None


def test_chat_content_parts() -> None:
    req = decode_chat_request(
        body(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ]
        )
    )
    assert [m.text() for m in req.messages] == ["be brief", "a\nb", ""]
    err = rejected(
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    )
    assert err.status == 400 and err.param == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("data", "param", "fragment"),
    [
        (b"{", None, "Malformed JSON"),
        (b"", None, "empty"),
        (b"[]", None, "Expected `object`"),
        (json.dumps({"model": "m"}).encode(), "messages", "Missing required parameter: 'messages'"),
        (body(model=...), "model", "'model'"),
        (body(messages=[{"content": "x"}]), "messages[0].role", "messages[0].role"),
        (body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "wizard"),
        (body(messages=[]), "messages", "at least one"),
        (body(max_tokens=-3), "max_tokens", "at least 1"),
        (body(max_completion_tokens=0), "max_completion_tokens", "at least 1"),
        (body(max_tokens=1.5), "max_tokens", "Expected `int"),
        (body(n=2), "n", "n=1"),
        (body(temperature=3), "temperature", "between 0 and 2"),
        (body(top_p=0), "top_p", "top_p"),
        (body(top_k=-5), "top_k", "top_k"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "At most 4"),
        (body(stream_options={"include_usage": True}), "stream_options", "stream"),
        (body(logprobs=True), "logprobs", "not supported"),
        (body(model=""), "model", "non-empty"),
    ],
)
def test_chat_request_errors(data: bytes, param: str | None, fragment: str) -> None:
    err = rejected(data)
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.param == param
    assert fragment in err.message


def test_completion_prompts() -> None:
    def prompt(p: Any) -> str | list[int]:
        return completion_prompt(decode_completion_request(json.dumps({"model": "m", "prompt": p}).encode()))

    assert prompt("hello") == "hello"
    assert prompt(["hello"]) == "hello"
    assert prompt([1, 2, 3]) == [1, 2, 3]
    assert prompt([[4, 5]]) == [4, 5]
    for bad, fragment in [
        (["a", "b"], "Batched"),
        ([[1], [2]], "Batched"),
        ([], "empty"),
        ("", "empty"),
        ([1, "a"], "must be a string"),
        ([-1], "must be a string"),
        ([True], "must be a string"),
        (5, "Expected"),
    ]:
        err = rejected(json.dumps({"model": "m", "prompt": bad}).encode(), completion=True)
        assert err.status == 400 and fragment in err.message, (bad, err.message)
    for field, value in [("echo", True), ("logprobs", 1), ("suffix", "x")]:
        err = rejected(json.dumps({"model": "m", "prompt": "p", field: value}).encode(), completion=True)
        assert err.param == field


def test_error_bodies() -> None:
    err = OpenAIError(404, "no such model", param="model", code="model_not_found")
    assert json.loads(err.body()) == {
        "error": {
            "message": "no such model",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(error_body(err, with_status=True))["status"] == 404
    assert OpenAIError(503, "x").type == "service_unavailable_error"
    assert OpenAIError(504, "x").type == "timeout_error"
    assert OpenAIError(500, "x").type == "internal_server_error"
    assert OpenAIError(400, "x", type="custom").type == "custom"
    assert OpenAIError(429, "x").type == "rate_limit_error"


def test_retry_after() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(0.2) == 1  # at least 1
    assert retry_after_seconds(0.0) == 1
    assert retry_after_seconds(-3.0) == 1
    assert retry_after_seconds(2.0) == 2
    assert retry_after_seconds(2.01) == 3  # rounded up
    assert retry_after_seconds(float("nan")) is None
    assert retry_after_seconds(float("inf")) is None

    busy = OpenAIError(503, "busy", retry_after_s=2.5)
    assert busy.retry_after() == 3
    # NATS bodies carry the hint next to the status; HTTP bodies stay OpenAI's (hint in a header)
    assert json.loads(error_body(busy, with_status=True)) == {
        "error": {"message": "busy", "type": "service_unavailable_error", "param": None, "code": None},
        "status": 503,
        "retry_after": 3,
    }
    assert set(json.loads(error_body(busy))) == {"error"}
    plain = OpenAIError(503, "down")
    assert plain.retry_after() is None
    assert set(json.loads(error_body(plain, with_status=True))) == {"error", "status"}


def test_response_encoding() -> None:
    chunk = ChatCompletionChunk(
        id="c", created=1, model="m", choices=[ChatChunkChoice(index=0, delta=ChatDelta(content="hi"))]
    )
    out = json.loads(encode_json(chunk))
    assert out["choices"][0] == {
        "index": 0,
        "delta": {"content": "hi"},
        "finish_reason": None,
        "logprobs": None,
    }
    assert "usage" not in out and "tandem" not in out  # UNSET fields are omitted
    chunk.usage = None
    assert json.loads(encode_json(chunk))["usage"] is None  # include_usage: null until the last chunk

    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    done = Completion(
        id="x",
        created=1,
        model="m",
        choices=[CompletionChoice(index=0, text="ok", finish_reason="length")],
        usage=usage,
        tandem=TandemInfo(
            request_id="x",
            prefill_worker="p",
            decode_worker="d",
            cached_tokens=16,
            ttft_ms=1.5,
            prefill_ms=0.75,
        ),
    )
    out = json.loads(encode_json(done))
    assert out["object"] == "text_completion"
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert out["tandem"] == {
        "request_id": "x",
        "prefill_worker": "p",
        "decode_worker": "d",
        "kv_transfer": None,
        "cached_tokens": 16,
        "ttft_ms": 1.5,
        "prefill_ms": 0.75,
    }
    models = json.loads(encode_json(ModelList(data=[ModelCard(id="m", created=2)])))
    assert models == {
        "object": "list",
        "data": [{"id": "m", "created": 2, "object": "model", "owned_by": "tandem"}],
    }
    # responses decode back with the same Structs (clients may use them)
    assert msgspec.json.decode(encode_json(done), type=Completion).choices[0].text == "ok"
