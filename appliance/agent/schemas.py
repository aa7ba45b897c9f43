"""The tools as the policy sees them, and the system and task prompts (our own wording).

The schemas are OpenAI-style function definitions, the form chat templates (Qwen3-VL's included)
accept as ``tools=``: the template renders them, with the call format, into the system turn. The
system prompt describes the task and its rules, not the wire format.
"""

from __future__ import annotations


PROMPT_GEN = "prompt_gen"
IMAGE_GEN = "image_gen"
QUALITY_EVAL = "quality_eval"
KNOWLEDGE_RETRIEVAL = "knowledge_retrieval"
MASK_GEN = "mask_gen"
TOOL_NAMES = (PROMPT_GEN, IMAGE_GEN, QUALITY_EVAL, KNOWLEDGE_RETRIEVAL, MASK_GEN)


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


_IMAGE_INDEX = "1-based position of an image in this conversation: 1 is the normal photo, " \
               "2 the first edited result, and so on."
_CATEGORY = "The part or product category exactly as the task names it."
_DEFECT = "The defect type exactly as the task names it; never swap in a different defect."

TOOL_SCHEMAS: list[dict] = [
    _function(
        PROMPT_GEN,
        "Drafts the first editing instruction for the defect from the normal photo, the part "
        "and the defect type. Call it once, as the very first tool. Later attempts are revised "
        "by you from the judge's review, not by calling this again.",
        {"image": {"type": "integer", "description": "Index of the normal photo; always 1."},
         "item_name": {"type": "string", "description": _CATEGORY},
         "anomaly_type": {"type": "string", "description": _DEFECT}},
        ["image", "item_name", "anomaly_type"]),
    _function(
        IMAGE_GEN,
        "Edits the normal photo locally to add the defect described by the instruction and "
        "returns the edited photo as a new image. The instruction should name the exact spot, "
        "the defect's look, its size and severity, and say that everything else stays as it is.",
        {"prompt": {"type": "string", "description": "The local editing instruction."},
         "target_image": {"type": "integer", "description": "Image to edit; edits always start "
                          "from the normal photo, so this is 1."},
         "region": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
                    "description": "Optional box [x0, y0, x1, y1] in 0-1000 coordinates of the "
                                   "normal photo where the defect must go."}},
        ["prompt", "target_image"]),
    _function(
        QUALITY_EVAL,
        "Judges an edited photo against the normal one: location_score 0-5 (is the defect on "
        "the part, where it physically happens) and quality_score 0-5 (does it look real), a "
        "written review, a list of issues, and whether it passes the acceptance bar.",
        {"anomaly_image": {"type": "integer", "description": _IMAGE_INDEX},
         "item_name": {"type": "string", "description": _CATEGORY},
         "anomaly_type": {"type": "string", "description": _DEFECT}},
        ["anomaly_image", "item_name", "anomaly_type"]),
    _function(
        KNOWLEDGE_RETRIEVAL,
        "Looks up how this defect really looks on this part or material: appearance, typical "
        "location and size. Use it only after the judge rejected an attempt, to improve the "
        "next instruction.",
        {"item_name": {"type": "string", "description": _CATEGORY},
         "anomaly_type": {"type": "string", "description": _DEFECT}},
        ["item_name", "anomaly_type"]),
    _function(
        MASK_GEN,
        "Produces the pixel mask of the defect in an edited photo by comparing it with the "
        "normal photo. Call it once, on the image the judge accepted.",
        {"anomaly_image": {"type": "integer", "description": _IMAGE_INDEX}},
        ["anomaly_image"]),
]

SYSTEM_PROMPT_TEMPLATE = """\
You are the planner of an industrial defect synthesis station. You receive a photo of a normal \
part and must produce a realistic, physically plausible defect of a requested type on it, \
together with its pixel mask, by calling the tools one at a time.

How to work:
- Think first, then take exactly one action per message: one tool call, or, once the mask \
exists, the final answer instead of a call:
  <answer>{{"status": "success", "final_image_index": <n>}}</answer>
- Order: prompt_gen once first; then image_gen and quality_eval in turns; knowledge_retrieval \
only after a rejected attempt; mask_gen once on the accepted image; then the answer.
- At most {max_image_gen} image_gen attempts and {max_turns} messages. If no attempt passes, \
mask the best one and answer with "status": "rejected".
- A tool's result starts with [Tool Response from <tool>] and a JSON object. Its values are \
authoritative: read the scores and issues from it, never guess them.
- Editing instructions must be local: name the exact spot on the part where this defect occurs \
in real production, describe its shape, texture, size and contrast against the material, and \
state that the rest of the image stays unchanged."""

TASK_PROMPT_TEMPLATE = """\
Image 1 is a normal {category}. Add a realistic "{defect}" defect to it and produce its mask.
Use the defect type "{defect}" and the part name "{category}" exactly as written here in every \
tool call."""


def system_prompt(max_image_gen: int, max_turns: int) -> str:
    """The task and its rules. The tools themselves reach a model through its chat template
    (``tools=TOOL_SCHEMAS``), in the form and with the call format it was trained on."""
    return SYSTEM_PROMPT_TEMPLATE.format(max_image_gen=max_image_gen, max_turns=max_turns)


def task_prompt(category: str, defect: str) -> str:
    return TASK_PROMPT_TEMPLATE.format(category=category, defect=defect)


def validate_arguments(name: str, arguments: dict) -> str | None:
    """Check a call against its schema; return a message naming the problem, or None."""
    schema = next((s["function"]["parameters"] for s in TOOL_SCHEMAS
                   if s["function"]["name"] == name), None)
    if schema is None:
        return f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}"
    missing = [key for key in schema["required"] if key not in arguments]
    if missing:
        return f"{name}: missing argument(s) {missing}"
    unknown = [key for key in arguments if key not in schema["properties"]]
    if unknown:
        return f"{name}: unknown argument(s) {unknown}"
    for key, value in arguments.items():
        expected = schema["properties"][key]["type"]
        if expected == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
            return f"{name}: argument {key!r} must be an integer, got {value!r}"
        if expected == "string" and (not isinstance(value, str) or not value.strip()):
            return f"{name}: argument {key!r} must be a non-empty string"
        if expected == "array" and (not isinstance(value, list) or len(value) != 4
                                    or not all(isinstance(v, (int, float)) for v in value)):
            return f"{name}: argument {key!r} must be a list of four numbers"
    return None
