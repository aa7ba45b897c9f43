"""The one agent loop: thought -> tool call -> tool response, for batches of episodes.

An episode is (normal image, category, defect type, seed) -> trajectory -> (defect image, mask).
The environment owns the rules (turn limit, tool order, acceptance bar) and records every message;
a policy only writes assistant messages. Batch runs, SFT trajectory export and GRPO rollouts all
go through ``AgentEnvironment.run``/``step``: there is no second loop.

Many episodes step in lockstep so a GPU backend can answer each tool with one batched call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from appliance.agent import schemas
from appliance.agent.episode import Attempt, EnvConfig, EpisodeResult, EpisodeSpec, EpisodeState
from appliance.agent.policy import Policy, PolicyReply
from appliance.agent.protocol import (
    Answer,
    ProtocolError,
    ToolCall,
    parse_assistant_message,
    tool_response_text,
)
from appliance.names import normalize_name
from appliance.tools.interfaces import (
    Box,
    EditRequest,
    ImageGenerator,
    KnowledgeRetriever,
    MaskGenerator,
    MaskRequest,
    PromptGenerator,
    PromptRequest,
    QualityEvaluator,
    QualityRequest,
    ToolFailure,
)


@dataclass
class Toolbox:
    prompt_gen: PromptGenerator
    image_gen: ImageGenerator
    quality_eval: QualityEvaluator
    knowledge: KnowledgeRetriever
    mask_gen: MaskGenerator

    def backends(self) -> dict[str, str]:
        return {schemas.PROMPT_GEN: self.prompt_gen.name, schemas.IMAGE_GEN: self.image_gen.name,
                schemas.QUALITY_EVAL: self.quality_eval.name,
                schemas.KNOWLEDGE_RETRIEVAL: self.knowledge.name, schemas.MASK_GEN: self.mask_gen.name}


@dataclass
class _PendingCall:
    state: EpisodeState
    call: ToolCall


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(index: int) -> dict:
    return {"type": "image", "image_index": index}


def _attempt_seed(episode_seed: int, attempt: int) -> int:
    return int(np.random.SeedSequence([episode_seed, attempt]).generate_state(1)[0])


class AgentEnvironment:
    def __init__(self, tools: Toolbox, config: EnvConfig | None = None):
        self.tools = tools
        self.config = config or EnvConfig()

    # 1. Start -----------------------------------------------------------------------------------

    def reset(self, spec: EpisodeSpec) -> EpisodeState:
        messages = [
            {"role": "system", "content": [_text(schemas.system_prompt(
                self.config.max_image_gen, self.config.max_turns))]},
            {"role": "user", "content": [_image(1), _text(schemas.task_prompt(spec.category, spec.defect))]},
        ]
        return EpisodeState(spec=spec, config=self.config, messages=messages, images=[spec.image])

    # 2. Loop ------------------------------------------------------------------------------------

    def run(self, specs: Sequence[EpisodeSpec], policy: "Policy",
            on_step: Callable[[list[EpisodeState]], None] | None = None) -> list[EpisodeResult]:
        """Run episodes to the end in lockstep and return their results in order."""
        states = [self.reset(spec) for spec in specs]
        while active := [s for s in states if not s.done]:
            messages = policy.act(active)
            self.step(active, messages)
            if on_step is not None:
                on_step(states)
        return [self.result(state, policy.name) for state in states]

    def step(self, states: Sequence[EpisodeState],
             assistant_messages: Sequence[str | PolicyReply]) -> None:
        """Apply one assistant message to each state, then answer all tool calls, batched by tool."""
        if len(states) != len(assistant_messages):
            raise ValueError("one assistant message per episode state is required")
        pending: dict[str, list[_PendingCall]] = defaultdict(list)
        for state, message in zip(states, assistant_messages):
            if state.done:
                raise ValueError("step() on an episode that has already ended")
            reply = message if isinstance(message, PolicyReply) else PolicyReply(message)
            text = reply.text
            state.messages.append({"role": "assistant", "content": [_text(text)]})
            state.turns += 1
            if reply.generation:
                state.generation.append({"turn": state.turns, **reply.generation})
            if reply.abort:
                state.errors.append(reply.abort)
                state.done = True
                state.end_reason = reply.abort
                continue
            parsed = parse_assistant_message(text)
            action = parsed.action
            if isinstance(action, ProtocolError):
                self._error(state, "environment", action.message)
            elif isinstance(action, Answer):
                self._finish(state, action.payload)
            else:
                problem = schemas.validate_arguments(action.name, action.arguments) \
                    or self._order_problem(state, action)
                if problem:
                    self._error(state, action.name if action.name in schemas.TOOL_NAMES
                                else "environment", problem)
                else:
                    pending[action.name].append(_PendingCall(state, action))
        for name, calls in pending.items():
            self._execute(name, calls)
        for state in states:
            if not state.done and state.turns >= self.config.max_turns:
                state.done = True
                state.end_reason = f"turn limit of {self.config.max_turns} messages reached"

    # 3. Rules -----------------------------------------------------------------------------------

    def _order_problem(self, state: EpisodeState, call: ToolCall) -> str | None:
        args = call.arguments
        seq = state.tool_sequence
        for key in ("item_name", "anomaly_type"):
            expected = state.spec.category if key == "item_name" else state.spec.defect
            if key in args and normalize_name(args[key]) != normalize_name(expected):
                return f"{call.name}: {key} must be {expected!r} exactly as the task names it"
        if call.name == schemas.PROMPT_GEN:
            if seq:
                return "prompt_gen must be the first tool and is called only once; revise the " \
                       "instruction yourself from the review"
            if args["image"] != 1:
                return "prompt_gen works on the normal photo: image must be 1"
        elif call.name == schemas.IMAGE_GEN:
            if schemas.PROMPT_GEN not in seq:
                return "call prompt_gen before the first image_gen"
            if state.mask is not None:
                return "the mask is already made; give the answer"
            if args["target_image"] != 1:
                return "image_gen always edits the normal photo: target_image must be 1"
            if state.image_gen_count >= self.config.max_image_gen:
                return (f"all {self.config.max_image_gen} image_gen attempts are used; call "
                        "mask_gen on the best image")
            if "region" in args:
                try:
                    _region_box(args["region"], state.spec.image.shape)
                except ValueError as exc:
                    return f"image_gen: {exc}"
        elif call.name == schemas.QUALITY_EVAL:
            if args["anomaly_image"] not in state.attempts:
                return f"image {args['anomaly_image']} is not an edited image of this episode"
        elif call.name == schemas.KNOWLEDGE_RETRIEVAL:
            last = state.last_report()
            if last is None or state.attempts[last[0]].passed:
                return "knowledge_retrieval is for improving a rejected attempt; judge an " \
                       "attempt first"
        elif call.name == schemas.MASK_GEN:
            index = args["anomaly_image"]
            attempt = state.attempts.get(index)
            if state.mask is not None:
                return "mask_gen is called once; give the answer"
            if attempt is None or attempt.report is None:
                return f"image {index} has not been judged; call quality_eval on it first"
            exhausted = state.image_gen_count >= self.config.max_image_gen
            if not attempt.passed and not exhausted:
                return f"image {index} did not pass; improve it with another image_gen attempt"
        return None

    # 4. Tools -----------------------------------------------------------------------------------

    def _execute(self, name: str, calls: list[_PendingCall]) -> None:
        """Run one tool for many episodes at once; isolate a failing item if the batch raises."""
        started = time.perf_counter()
        try:
            outputs = self._run_tool(name, calls)
        except Exception:  # noqa: BLE001 - a tool failure must not end the batch
            outputs = []
            for call in calls:
                try:
                    outputs.extend(self._run_tool(name, [call]))
                except Exception as exc:  # noqa: BLE001
                    outputs.append(exc)
        elapsed = (time.perf_counter() - started) / max(len(calls), 1)
        for call, output in zip(calls, outputs):
            call.state.tool_seconds[name] += elapsed
            if isinstance(output, ToolFailure):
                self._error(call.state, name, f"the tool could not answer: {output}")
            elif isinstance(output, Exception):
                self._error(call.state, name, f"the tool failed: {type(output).__name__}: {output}")
            else:
                call.state.tool_sequence.append(name)
                self._respond(call.state, name, output)

    def _run_tool(self, name: str, calls: list[_PendingCall]) -> list[tuple[dict, int | None]]:
        """Returns (response payload, index of a new image or None) per call."""
        if name == schemas.PROMPT_GEN:
            prompts = self.tools.prompt_gen.generate_prompts(
                [PromptRequest(c.state.spec.image, c.state.spec.category, c.state.spec.defect)
                 for c in calls])
            return [p if isinstance(p, ToolFailure) else ({"status": "success", "prompt": p}, None)
                    for p in prompts]
        if name == schemas.IMAGE_GEN:
            requests = []
            for c in calls:
                seed = _attempt_seed(c.state.spec.seed, c.state.image_gen_count + 1)
                requests.append(EditRequest(
                    image=c.state.spec.image, category=c.state.spec.category,
                    defect=c.state.spec.defect, prompt=c.call.arguments["prompt"], seed=seed,
                    region=_region_box(c.call.arguments.get("region"), c.state.spec.image.shape)))
            results = self.tools.image_gen.generate(requests)
            outputs = []
            for c, request, result in zip(calls, requests, results):
                c.state.images.append(result.image)
                index = len(c.state.images)
                c.state.attempts[index] = Attempt(index, request.prompt, request.seed, result)
                outputs.append(({"status": "success", "image_index": index,
                                 "attempt": len(c.state.attempts),
                                 "attempts_left": self.config.max_image_gen - len(c.state.attempts)},
                                index))
            return outputs
        if name == schemas.QUALITY_EVAL:
            attempts = [c.state.attempts[c.call.arguments["anomaly_image"]] for c in calls]
            reports = self.tools.quality_eval.evaluate(
                [QualityRequest(c.state.spec.image, a.result.image, c.state.spec.category,
                                c.state.spec.defect, a.prompt) for c, a in zip(calls, attempts)])
            outputs = []
            for attempt, report in zip(attempts, reports):
                if isinstance(report, ToolFailure):
                    outputs.append(report)  # the attempt stays unjudged; the policy may ask again
                    continue
                attempt.report = report
                attempt.passed = self.config.passes(report)
                outputs.append(({"status": "success", "anomaly_image": attempt.image_index,
                                 "location_score": report.location_score,
                                 "quality_score": report.quality_score, "score": report.score,
                                 "passed": attempt.passed, "issues": list(report.issues),
                                 "review": report.review}, None))
            return outputs
        if name == schemas.KNOWLEDGE_RETRIEVAL:
            outputs = []
            for c in calls:
                knowledge = self.tools.knowledge.retrieve(c.state.spec.category, c.state.spec.defect)
                c.state.knowledge = knowledge
                entries = [{"id": e.id, "subject": e.subject, "kind": e.kind,
                            "material": e.material, "defect": e.defect, "renderer": e.renderer,
                            "appearance": e.appearance, "location": e.location, "size": e.size,
                            "source": e.source, "relevance": round(float(s), 3)}
                           for e, s in zip(knowledge.entries, knowledge.scores)]
                outputs.append(({"status": "success", "query": knowledge.query,
                                 "entries": entries}, None))
            return outputs
        if name == schemas.MASK_GEN:
            attempts = [c.state.attempts[c.call.arguments["anomaly_image"]] for c in calls]
            masks = self.tools.mask_gen.generate_masks(
                [MaskRequest(c.state.spec.image, a.result.image, a.result.mask)
                 for c, a in zip(calls, attempts)])
            outputs = []
            for c, attempt, mask in zip(calls, attempts, masks):
                c.state.mask = mask
                c.state.mask_image_index = attempt.image_index
                outputs.append(({"status": "success", "anomaly_image": attempt.image_index,
                                 "mask_pixels": int(mask.mask.sum()),
                                 "area_ratio": round(mask.area_ratio, 5),
                                 "confidence": round(float(mask.confidence), 3),
                                 "method": mask.method}, None))
            return outputs
        raise ValueError(f"unknown tool {name}")

    # 5. Bookkeeping -----------------------------------------------------------------------------

    def _respond(self, state: EpisodeState, name: str, output: tuple[dict, int | None]) -> None:
        payload, new_image = output
        content = [_text(tool_response_text(name, payload))]
        if new_image is not None:
            content.append(_image(new_image))
        state.messages.append({"role": "tool", "name": name, "content": content})

    def _error(self, state: EpisodeState, name: str, message: str) -> None:
        state.errors.append(message)
        state.messages.append({"role": "tool", "name": name, "content": [
            _text(tool_response_text(name, {"status": "error", "error": message}))]})

    def _finish(self, state: EpisodeState, payload: dict) -> None:
        if payload.get("status") == "failed":
            state.done = True
            state.end_reason = f"the policy gave up: {payload.get('summary', '')}".strip()
            return
        if state.mask is None:
            self._error(state, "environment", "the answer comes after mask_gen; make the mask first")
            return
        index = payload.get("final_image_index")
        if index != state.mask_image_index:
            self._error(state, "environment", f"final_image_index must be {state.mask_image_index}, "
                                              "the image that was masked")
            return
        state.answer = payload
        state.done = True
        state.end_reason = "answered"

    def result(self, state: EpisodeState, policy_name: str) -> EpisodeResult:
        final_index = state.mask_image_index if state.answer is not None else None
        attempt = state.attempts.get(final_index) if final_index else None
        if attempt is None:
            status = "failed"
        elif attempt.passed:
            status = "accepted"
        else:
            status = "rejected"
        return EpisodeResult(
            spec=state.spec, status=status, end_reason=state.end_reason,
            final_image_index=final_index,
            final_image=attempt.result.image if attempt else None,
            mask=state.mask if attempt else None, report=attempt.report if attempt else None,
            attempts=list(state.attempts.values()), messages=state.messages, images=state.images,
            tool_sequence=state.tool_sequence, errors=state.errors, turns=state.turns,
            seconds=time.perf_counter() - state.started, tool_seconds=dict(state.tool_seconds),
            backends=self.tools.backends(), policy=policy_name, generation=state.generation)


def _region_box(region: list | None, shape: tuple[int, ...]) -> Box | None:
    """A policy's 0-1000 box in pixels of the normal photo."""
    if region is None:
        return None
    height, width = shape[:2]
    x0, y0, x1, y1 = (max(0.0, min(1000.0, float(v))) for v in region)
    box = Box(int(x0 * width / 1000), int(y0 * height / 1000),
              int(round(x1 * width / 1000)), int(round(y1 * height / 1000)))
    if box.width < 2 or box.height < 2:
        raise ValueError(f"region {region} is empty; give [x0, y0, x1, y1] with x0 < x1, y0 < y1")
    return box
