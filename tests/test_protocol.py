"""The message protocol parser: well-formed actions, and every kind of malformed output."""

import json

import pytest

from appliance.agent.protocol import (Answer, ProtocolError, ToolCall, format_answer,
                                      format_tool_call, parse_assistant_message,
                                      parse_tool_response, tool_response_text)
from appliance.agent.schemas import TOOL_SCHEMAS, system_prompt, validate_arguments


def test_round_trip_tool_call():
    text = format_tool_call("first a prompt", "prompt_gen",
                            {"image": 1, "item_name": "bottle", "anomaly_type": "crack"})
    parsed = parse_assistant_message(text)
    assert parsed.thinking == "first a prompt"
    assert parsed.action == ToolCall("prompt_gen", {"image": 1, "item_name": "bottle",
                                                    "anomaly_type": "crack"})


def test_round_trip_answer():
    parsed = parse_assistant_message(format_answer("done", {"status": "success", "final_image_index": 2}))
    assert isinstance(parsed.action, Answer)
    assert parsed.action.payload["final_image_index"] == 2


def test_qwen_think_tags_and_string_arguments_are_accepted():
    text = ('<think>reasoning</think>\n<tool_call>{"name": "mask_gen", '
            '"arguments": "{\\"anomaly_image\\": 3}"}</tool_call>')
    parsed = parse_assistant_message(text)
    assert parsed.thinking == "reasoning"
    assert parsed.action == ToolCall("mask_gen", {"anomaly_image": 3})


def test_unterminated_final_block_is_recovered():
    parsed = parse_assistant_message('<thinking>x</thinking><tool_call>{"name": "mask_gen", '
                                     '"arguments": {"anomaly_image": 2}}')
    assert parsed.action == ToolCall("mask_gen", {"anomaly_image": 2})


def test_fenced_json_is_accepted():
    parsed = parse_assistant_message('<tool_call>```json\n{"name": "mask_gen", "arguments": '
                                     '{"anomaly_image": 2}}\n```</tool_call>')
    assert parsed.action == ToolCall("mask_gen", {"anomaly_image": 2})


@pytest.mark.parametrize("text, words", [
    ("I will just think about it.", "no <tool_call> or <answer>"),
    ("<tool_call>{name: prompt_gen}</tool_call>", "malformed"),
    ("<tool_call>[1, 2]</tool_call>", "must be an object"),
    ('<tool_call>{"arguments": {}}</tool_call>', "needs a string 'name'"),
    ('<tool_call>{"name": "x", "arguments": [1]}</tool_call>', "must be an object"),
    ('<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>', "more than one"),
    ('<tool_call>{"name": "a"}</tool_call><answer>{}</answer>', "more than one"),
    ("<answer>not json</answer>", "<answer>: the JSON is malformed"),
    ("", "no <tool_call>"),
])
def test_malformed_messages_become_protocol_errors(text, words):
    action = parse_assistant_message(text).action
    assert isinstance(action, ProtocolError)
    assert words in action.message


def test_tool_response_round_trip():
    text = tool_response_text("quality_eval", {"score": 7, "review": "fine"})
    assert text.startswith("[Tool Response from quality_eval]\n")
    assert parse_tool_response(text) == ("quality_eval", {"score": 7, "review": "fine"})
    assert parse_tool_response("hello") is None


@pytest.mark.parametrize("name, args, words", [
    ("paint", {}, "unknown tool"),
    ("mask_gen", {}, "missing argument"),
    ("mask_gen", {"anomaly_image": "2"}, "must be an integer"),
    ("mask_gen", {"anomaly_image": True}, "must be an integer"),
    ("mask_gen", {"anomaly_image": 2, "colour": "red"}, "unknown argument"),
    ("image_gen", {"prompt": " ", "target_image": 1}, "non-empty string"),
    ("image_gen", {"prompt": "x", "target_image": 1, "region": [1, 2]}, "four numbers"),
])
def test_argument_validation(name, args, words):
    assert words in validate_arguments(name, args)


def test_valid_arguments_pass():
    assert validate_arguments("image_gen", {"prompt": "x", "target_image": 1,
                                            "region": [0, 0, 500, 500]}) is None


def test_system_prompt_describes_the_task_not_the_wire_format():
    """The tools reach the model through its chat template's tool block (``tools=``); the
    system prompt names them in its rules but carries neither their schemas nor the call format."""
    prompt = system_prompt(max_image_gen=3, max_turns=12)
    for schema in TOOL_SCHEMAS:
        name = schema["function"]["name"]
        assert name in prompt
        assert f'"name": "{name}"' not in prompt
    assert "<tool_call>" not in prompt and '"parameters"' not in prompt
    assert "<answer>" in prompt  # our own closing action is described there
    assert "At most 3 image_gen attempts and 12 messages" in prompt
    json.dumps(TOOL_SCHEMAS)  # serialisable for chat templates
