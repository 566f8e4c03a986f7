"""The OpenAI wire format: request bodies checked and turned into engine requests, results and
stream events turned into completion objects and chunks, errors as ``{"error": {...}}``.

Pure functions over dicts (no HTTP), so the rules are testable alone and the app stays thin.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from ..engine import Event, Request, Result

#: OpenAI's limit on stop sequences
MAX_STOP = 4
#: the longest stop sequence: the engine prepares each once per request, on the step every row waits for
MAX_STOP_CHARS = 4096
#: seeds above this are refused (numpy's generators take any integer, at a cost that grows with its digits)
MAX_SEED = 2**64 - 1
#: the most stop_token_ids a request may give
MAX_STOP_TOKEN_IDS = 64
#: what a loaded adapter may be called: safe in a URL path, a metric label and a log line
MODEL_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: the fields each endpoint implements (null: the default)
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
          "presence_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "n", "stream",
          "stream_options", "user"}
FIELDS = {True: COMMON | {"messages", "max_completion_tokens", "response_format"}, False: COMMON | {"prompt"}}
#: fields taken only at a neutral value, compared with their types (any other value would change the
#: answer, and ignoring it would be silent); every other field is refused
NEUTRAL = {
    True: {"logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
           "tool_choice": ("none",), "function_call": ("none",)},
    False: {"logprobs": (False,), "echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},)},
}
#: the fields of a chat message (null: absent)
MESSAGE_FIELDS = {"role", "content"}


class APIError(Exception):
    """A refused request: its HTTP status and the OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def name_problem(name) -> str | None:
    """Why ``name`` cannot name an adapter, or None."""
    if isinstance(name, str) and MODEL_NAME.fullmatch(name):
        return None
    return f"an adapter's name must be 1 to 64 of A-Z a-z 0-9 . _ : - (got {name!r})"


@dataclass
class Call:
    """A checked completion request: the engine request, the public model name, how to answer."""

    request: Request
    model: str
    chat: bool
    stream: bool
    include_usage: bool
    id: str
    created: int
    started: bool = False  # has its first token (holds a row)
    #: a text chunk's event serialized around its text (see :func:`stream_events`); False: none fits
    text_event: tuple[str, str] | bool | None = field(default=None, repr=False)


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{key} must be a number, got {value!r}", key)
    if not (low < value if low_open else low <= value) or value > high:
        raise bad(f"{key} must be in {'(' if low_open else '['}{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"≥ {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{key} must be an integer {bounds}, got {value!r}", key)
    return value


def _fields(body: dict, chat: bool) -> None:
    """Refuse every field this server would ignore: unknown ones, and known ones at a value it does
    not implement."""
    for key, value in body.items():
        if value is None or key in FIELDS[chat]:
            continue
        neutral = NEUTRAL[chat].get(key)
        if neutral is None:
            raise bad(f"{key} is not supported by this server", key)
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise bad(f"{key}={value!r} is not supported by this server (only {' or '.join(map(repr, neutral))})", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad(f"response_format {response_format!r} is not supported: only {{'type': 'text'}}", "response_format")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user")


def _stop_token_ids(body: dict) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise bad(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids ≥ 0", "stop_token_ids")
    return ids


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad(f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most {MAX_STOP} of "
                  "them", "stop")
    return stops


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        extra = sorted(k for k, v in message.items() if k not in MESSAGE_FIELDS and v is not None)
        if extra:
            raise bad(f"messages[{i}].{extra[0]} is not supported by this server", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can be rendered by a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _prompt(body: dict) -> dict:
    """The completions ``prompt`` as the engine's ``prompt`` or ``prompt_ids`` (one prompt: n=1)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt")
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": prompt}
    raise bad("prompt must be one non-empty string or one list of token ids (several prompts per request are "
              "not supported: send one request each)", "prompt")


def parse_call(body, *, chat: bool, models: list[str], base: str, default_max_tokens: int) -> Call:
    """Check an OpenAI completions / chat completions body; raises :class:`APIError` (400, 404)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: the base model's name or a loaded adapter's", "model")
    if model not in models:
        raise APIError(404, f"the model {model!r} does not exist (loaded: {', '.join(models)})",
                       param="model", code="model_not_found")
    if _integer(body, "n", 1, 1) != 1:
        raise bad("only n=1 is supported: send one request per completion", "n")
    _fields(body, chat)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: generate max_tokens whatever comes
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    source = {"messages": _messages(body)} if chat else _prompt(body)
    max_new_tokens = _integer(body, key, default_max_tokens, 1)
    min_tokens = _integer(body, "min_tokens", 0, 0)
    if min_tokens > max_new_tokens:
        raise bad(f"min_tokens ({min_tokens}) must not exceed {key} ({max_new_tokens})", "min_tokens")
    request = Request(
        **source,
        adapter=None if model == base else model,
        max_new_tokens=max_new_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(_integer(body, "top_k", 0, -1), 0),  # -1 and 0: no limit (vLLM's conventions)
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=_integer(body, "seed", None, 0, MAX_SEED),
        stop=_stop(body),
        stop_token_ids=_stop_token_ids(body),
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
    )
    prefix = "chatcmpl" if chat else "cmpl"
    return Call(request, model, chat, stream, bool((options or {}).get("include_usage")),
                f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def usage(result: Result) -> dict:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def finish_reason(result: Result) -> str:
    """The OpenAI finish reason: ``stop`` (end of sequence or a stop string) or ``length``."""
    return "length" if result.finish_reason == "length" else "stop"


def completion(call: Call, result: Result) -> dict:
    """The whole answer of a non-streamed request."""
    if call.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish_reason(result)}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}
    return {"id": call.id, "object": "chat.completion" if call.chat else "text_completion", "created": call.created,
            "model": call.model, "choices": [choice], "usage": usage(result)}


def chunk(call: Call, text: str | None, reason: str | None = None, *, role: bool = False) -> dict:
    """One streamed chunk: new text (None: no text field), and the finish reason on the last."""
    if call.chat:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    out = {"id": call.id, "object": "chat.completion.chunk" if call.chat else "text_completion",
           "created": call.created, "model": call.model, "choices": [choice]}
    if call.include_usage:
        out["usage"] = None
    return out


def chunks(call: Call, event: Event, first: bool) -> list[dict]:
    """The chunks one engine event becomes (a chat stream opens with the assistant role)."""
    out = [chunk(call, "", role=True)] if first and call.chat else []
    if event.text:
        out.append(chunk(call, event.text))
    if event.finished:
        out.append(chunk(call, None if call.chat else "", finish_reason(event.result)))
        if call.include_usage:
            out.append({**chunk(call, None), "choices": [], "usage": usage(event.result)})
    return out


#: stands for a text chunk's text while its template is serialized (no served name or id holds a NUL)
_TEXT_MARK = "\x00text\x00"


def stream_events(call: Call, event: Event, first: bool) -> str:
    """The server-sent events (``data: …`` each) one engine event becomes, as one string (one send). A
    streamed token's text chunk, all but the first and last events of a stream, is the call's serialized
    template around the text's JSON: exactly ``json.dumps`` of :func:`chunk`, without serializing the rest
    of it again for every token."""
    if event.text and not event.finished and not (first and call.chat):
        if call.text_event is None:
            whole, mark = json.dumps(chunk(call, _TEXT_MARK)), json.dumps(_TEXT_MARK)
            head, _, tail = whole.partition(mark)
            call.text_event = (f"data: {head}", f"{tail}\n\n") if whole.count(mark) == 1 else False
        if call.text_event:
            return call.text_event[0] + json.dumps(event.text) + call.text_event[1]
    return "".join(f"data: {json.dumps(part)}\n\n" for part in chunks(call, event, first))
