"""What the review page lists: every written sample and every episode that wrote nothing, as
flat items to filter, sort and page, and the detail of one item.

An item's id names its kind and its store row: ``s12`` is the sample with id 12, ``e40`` the
rejected or failed episode 40. Files are reached only through these ids (``files_of``), never
through a path that came with a request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.storage import JobStore
from appliance.storage.reviews import ReviewLog

VERDICTS = ("accepted", "rejected", "failed")
REVIEW_STATES = ("approved", "rejected", "unreviewed")
SORTS = {"time": "created", "score": "score", "area": "area"}
MAX_PER_PAGE = 200


class NotFound(LookupError):
    """No item or file of that id."""


@dataclass(frozen=True)
class Query:
    """A page of items: filters (None = any), sort and page, as the page's form sends them."""

    category: str | None = None
    defect: str | None = None
    batch: str | None = None
    verdict: str | None = None
    review: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    sort: str = "time"
    descending: bool = True
    page: int = 1
    per_page: int = 48

    @classmethod
    def from_args(cls, args) -> "Query":
        """From a request's query string; values that make no sense are ignored, not errors."""
        def choice(name: str, allowed) -> str | None:
            value = args.get(name) or None
            return value if value is None or allowed is None or value in allowed else None

        def number(name: str) -> float | None:
            try:
                value = float(args.get(name, ""))
            except ValueError:
                return None
            return value if math.isfinite(value) else None

        def whole(name: str, default: int, low: int, high: int) -> int:
            try:
                return min(max(int(args.get(name, default)), low), high)
            except ValueError:
                return default

        return cls(category=choice("category", None), defect=choice("defect", None),
                   batch=choice("batch", None), verdict=choice("verdict", VERDICTS),
                   review=choice("review", REVIEW_STATES),
                   min_score=number("min_score"), max_score=number("max_score"),
                   sort=choice("sort", SORTS) or "time",
                   descending=args.get("order", "desc") != "asc",
                   page=whole("page", 1, 1, 1_000_000),
                   per_page=whole("per_page", 48, 1, MAX_PER_PAGE))


def _review_of(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"decision": row["decision"], "reason": row["reason"], "reviewer": row["reviewer"],
            "decided_at": row["decided_at"]}


def load_items(store: JobStore) -> list[dict]:
    """Every sample and every episode that wrote nothing, newest state of each."""
    decisions = ReviewLog(store).latest()
    items = []
    for row in store.samples("ok"):
        record = json.loads(row["record"])
        review = _review_of(decisions.get(row["id"]))
        items.append({
            "id": f"s{row['id']}", "kind": "sample", "category": row["category"],
            "defect": row["defect"], "batch": row["batch"], "verdict": "accepted",
            "score": record.get("score"), "area": record.get("mask_area_ratio"),
            "created": row["created"], "name": Path(row["image"]).name,
            "review": review, "review_state": review["decision"] if review else "unreviewed",
            "reason": None,
        })
    for row in store.episodes_with_status(("rejected", "failed")):
        result = json.loads(row["result"]) if row["result"] else {}
        scores = [s for s in result.get("scores", []) if s is not None]
        items.append({
            "id": f"e{row['id']}", "kind": "episode", "category": row["category"],
            "defect": row["defect"], "batch": row["batch"], "verdict": row["status"],
            "score": max(scores) if scores else None, "area": None,
            "created": row["finished_at"], "name": f"episode {row['id']}",
            "review": None, "review_state": None,
            "reason": result.get("reason") or row["error"],
        })
    return items


def select(items: list[dict], query: Query) -> tuple[list[dict], int]:
    """The page of ``items`` the query asks for, and how many items match in all."""
    def keep(item: dict) -> bool:
        for field in ("category", "defect", "batch", "verdict"):
            wanted = getattr(query, field)
            if wanted is not None and item[field] != wanted:
                return False
        if query.review is not None and item["review_state"] != query.review:
            return False
        score = item["score"]
        if query.min_score is not None and (score is None or score < query.min_score):
            return False
        if query.max_score is not None and (score is None or score > query.max_score):
            return False
        return True

    chosen = [item for item in items if keep(item)]
    key = SORTS[query.sort]
    # Items without the sort value (an episode has no mask area) go last either way.
    present = [i for i in chosen if i[key] is not None]
    absent = [i for i in chosen if i[key] is None]
    present.sort(key=lambda i: (i[key], i["id"]), reverse=query.descending)
    chosen = present + absent
    start = (query.page - 1) * query.per_page
    return chosen[start:start + query.per_page], len(chosen)


def facets(items: list[dict], store: JobStore) -> dict:
    """The values the filters offer."""
    batches = {row["id"]: row for row in store.db.query("select id, command, started_at "
                                                        "from batches")}
    return {
        "categories": sorted({i["category"] for i in items}),
        "defects": sorted({i["defect"] for i in items}),
        "batches": [{"id": b, "command": batches.get(b, {}).get("command", ""),
                     "started_at": batches.get(b, {}).get("started_at")}
                    for b in sorted({i["batch"] for i in items if i["batch"]}, reverse=True)],
    }


def parse_id(item_id: str) -> tuple[str, int]:
    """("sample" | "episode", row id) of an item id; NotFound for anything else."""
    kinds = {"s": "sample", "e": "episode"}
    if len(item_id) < 2 or item_id[0] not in kinds or not re.fullmatch(r"[0-9]{1,18}", item_id[1:]):
        raise NotFound(item_id)
    return kinds[item_id[0]], int(item_id[1:])


def _sample_row(store: JobStore, sample_id: int) -> dict:
    rows = list(store.db.query("select * from samples where id = ? and status = 'ok'",
                               [sample_id]))
    if not rows:
        raise NotFound(f"s{sample_id}")
    return rows[0]


def _episode_row(store: JobStore, episode_id: int) -> dict:
    row = store.episode(episode_id)
    if row is None or row["status"] not in ("rejected", "failed"):
        raise NotFound(f"e{episode_id}")
    return row


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def trajectory_steps(messages: list[dict], item_id: str) -> list[dict]:
    """The conversation as steps the page shows: role, text, and image ids (served by index)."""
    steps = []
    for message in messages if isinstance(messages, list) else []:
        texts, images = [], []
        for part in message.get("content", []) if isinstance(message, dict) else []:
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image":
                stem = Path(str(part.get("image", ""))).stem
                if stem.isdigit():
                    images.append(f"/file/{item_id}/trajectory/{int(stem)}")
        steps.append({"role": str(message.get("role", "")), "text": "\n".join(texts),
                      "reasoning": message.get("reasoning") or None, "images": images})
    return steps


def detail(store: JobStore, item_id: str) -> dict:
    """Everything the detail view shows of one item."""
    kind, row_id = parse_id(item_id)
    if kind == "sample":
        row = _sample_row(store, row_id)
        record = json.loads(row["record"])
        folder = store.root / row["trajectory"]
        episode = _read_json(folder / "episode.json") or {}
        messages = _read_json(folder / "messages.json") or []
        log = ReviewLog(store)
        normal = store.normal(record.get("source_sha256", ""), row["category"])
        return {
            "id": item_id, "kind": kind, "category": row["category"], "defect": row["defect"],
            "verdict": "accepted", "record": record,
            "files": {"image": f"/file/{item_id}/image", "mask": f"/file/{item_id}/mask",
                      "normal": f"/file/{item_id}/normal" if normal else None},
            "attempts": episode.get("attempts", []) if isinstance(episode, dict) else [],
            "steps": trajectory_steps(messages, item_id),
            "history": [_review_of(r) for r in log.history(row_id)],
            "provenance": {k: record.get(k) for k in (
                "engine", "policy", "backends", "engine_detail", "seed", "ig_seed", "source",
                "source_sha256", "batch", "created", "seconds", "image")},
        }
    row = _episode_row(store, row_id)
    result = json.loads(row["result"]) if row["result"] else {}
    normal = store.normal(row["sha256"], row["category"])
    return {
        "id": item_id, "kind": kind, "category": row["category"], "defect": row["defect"],
        "verdict": row["status"], "record": result,
        "files": {"image": None, "mask": None,
                  "normal": f"/file/{item_id}/normal" if normal else None},
        "attempts": [], "steps": [], "history": [],
        "provenance": {"seed": row["seed"], "source_sha256": row["sha256"],
                       "batch": row["batch"], "attempts_started": row["attempts"],
                       "error": row["error"]},
    }


FILE_KINDS = ("image", "mask", "normal", "trajectory")


def file_of(store: JobStore, item_id: str, kind: str, index: int | None = None) -> Path:
    """The dataset file behind (item, kind): resolved, inside the dataset, a regular file."""
    item_kind, row_id = parse_id(item_id)
    if kind not in FILE_KINDS:
        raise NotFound(kind)
    if item_kind == "sample":
        row = _sample_row(store, row_id)
        sha256 = json.loads(row["record"]).get("source_sha256", "")
    else:
        if kind != "normal":
            raise NotFound(kind)
        row = _episode_row(store, row_id)
        sha256 = row["sha256"]
    if kind == "image":
        relative = row["image"]
    elif kind == "mask":
        relative = row["mask"]
    elif kind == "normal":
        normal = store.normal(sha256, row["category"])
        if normal is None:
            raise NotFound(item_id)
        relative = normal["path"]
    else:
        if index is None:
            raise NotFound(kind)
        relative = f"{row['trajectory']}/images/{int(index)}.png"
    root = store.root.resolve()
    path = (root / relative).resolve()
    if root not in path.parents or not path.is_file():
        raise NotFound(relative)
    return path
