"""The message protocol between a policy and the environment.

An assistant message is a reasoning block followed by exactly one action, in Qwen3's native form::

    <think>
    why this step
    </think>

    <tool_call>
    {"name": ..., "arguments": {...}}
    </tool_call>

or, at the end, ``<answer>{...}</answer>`` in place of the tool call. Qwen3 Thinking models get
``<think>`` from their chat template's generation prompt, so a reply often has no opening tag: the
reasoning is everything up to the last ``</think>`` (``</thinking>`` is read the same way), and the
action is read only from the text after it. Drafts of a call inside the reasoning are not actions;
a reasoning block that was opened and never closed is "reasoning not finished", whatever it
mentions. Tool results come back as a tool message whose text starts with ``[Tool Response from
NAME]`` followed by a JSON object. Parsing never raises: malformed output becomes a
``ProtocolError`` value that the environment turns into an error observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from appliance.vlm.chat import split_reasoning

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Models sometimes stop generating before the closing tag; accept an unterminated final block.
_TOOL_CALL_OPEN = re.compile(r"<tool_call>(.*)\Z", re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>(.*)\Z", re.DOTALL)
_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)

REASONING_NOT_FINISHED = ("reasoning not finished: the <think> block was never closed, so no "
                          "action was taken; close the reasoning with </think> and then call "
                          "exactly one tool or give the answer")


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Answer:
    payload: dict


@dataclass
class ProtocolError:
    message: str


@dataclass
class ParsedMessage:
    thinking: str
    action: ToolCall | Answer | ProtocolError
    raw: str = field(repr=False, default="")


def _load_json_object(text: str) -> dict | ProtocolError:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return ProtocolError(f"the JSON is malformed ({exc.msg} at position {exc.pos})")
    if not isinstance(value, dict):
        return ProtocolError("the JSON must be an object")
    return value


def parse_assistant_message(text: str) -> ParsedMessage:
    """Split one assistant message into its reasoning and its single action (read only from the
    text after the reasoning)."""
    reasoning = split_reasoning(text)
    thinking = reasoning.text
    if not reasoning.finished:
        return ParsedMessage(thinking, ProtocolError(REASONING_NOT_FINISHED), text)
    action = reasoning.rest
    calls = _TOOL_CALL.findall(action)
    answers = _ANSWER.findall(action)
    if not calls and not answers:
        unterminated_call = _TOOL_CALL_OPEN.search(action)
        unterminated_answer = _ANSWER_OPEN.search(action)
        if unterminated_call:
            calls = [unterminated_call.group(1)]
        elif unterminated_answer:
            answers = [unterminated_answer.group(1)]
    if len(calls) + len(answers) == 0:
        return ParsedMessage(thinking, ProtocolError(
            "no <tool_call> or <answer> block found; call exactly one tool or give the answer"), text)
    if len(calls) + len(answers) > 1:
        return ParsedMessage(thinking, ProtocolError(
            "more than one <tool_call>/<answer> block; give exactly one action per message"), text)
    if answers:
        payload = _load_json_object(answers[0])
        if isinstance(payload, ProtocolError):
            return ParsedMessage(thinking, ProtocolError(f"<answer>: {payload.message}"), text)
        return ParsedMessage(thinking, Answer(payload), text)
    body = _load_json_object(calls[0])
    if isinstance(body, ProtocolError):
        return ParsedMessage(thinking, ProtocolError(f"<tool_call>: {body.message}"), text)
    name = body.get("name")
    arguments = body.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ParsedMessage(thinking, ProtocolError("<tool_call> needs a string 'name'"), text)
    if isinstance(arguments, str):
        # Some chat templates serialise arguments as a JSON string.
        arguments = _load_json_object(arguments)
        if isinstance(arguments, ProtocolError):
            return ParsedMessage(thinking, ProtocolError(f"<tool_call> arguments: {arguments.message}"), text)
    if not isinstance(arguments, dict):
        return ParsedMessage(thinking, ProtocolError("<tool_call> 'arguments' must be an object"), text)
    return ParsedMessage(thinking, ToolCall(name, arguments), text)


def _reasoning_block(thinking: str) -> str:
    return f"<think>\n{thinking.strip()}\n</think>\n\n"


def format_tool_call(thinking: str, name: str, arguments: dict) -> str:
    """A tool call as Qwen3 writes it: reasoning, then the call on its own lines."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{_reasoning_block(thinking)}<tool_call>\n{call}\n</tool_call>"


def format_answer(thinking: str, payload: dict) -> str:
    return f"{_reasoning_block(thinking)}<answer>{json.dumps(payload, ensure_ascii=False)}</answer>"


def tool_response_text(name: str, payload: dict) -> str:
    return f"[Tool Response from {name}]\n{json.dumps(payload, ensure_ascii=False)}"


_RESPONSE_HEADER = re.compile(r"^\[Tool Response from ([A-Za-z_]+)\]\n", re.DOTALL)


def parse_tool_response(text: str) -> tuple[str, dict] | None:
    """Inverse of ``tool_response_text``; None when the text is not a tool response."""
    match = _RESPONSE_HEADER.match(text)
    if not match:
        return None
    payload = _load_json_object(text[match.end():])
    if isinstance(payload, ProtocolError):
        return None
    return match.group(1), payload
