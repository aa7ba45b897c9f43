"""A retraining run: its options and its directory. ``appliance retrain``: the plant's real defects train the policy, stage by stage, in a run
directory that survives a crash.

    RUN/run.json             options, and each finished stage with its figures
    (calibrate)              CPU engine: a calibration profile into MODELS/calibration/
    RUN/trajectories/        stage 1: expert trajectories (the batch's format) + index.jsonl
    RUN/sft/checkpoints/     stage 2: TRL checkpoints (``--resume`` continues from the last)
    RUN/sft/adapter/         stage 2: the trained LoRA adapter
    RUN/grpo/checkpoints/    stage 3: TRL checkpoints of GRPO on top of the SFT adapter
    RUN/grpo/adapter/        stage 3: the GRPO adapter
    RUN/report.json, .md     the figures: data, trajectories, training, held-out gate

A stage is recorded as finished in ``run.json`` (atomically) only after its outputs are
complete, so ``--resume`` after ``kill -9`` redoes at most the unfinished stage, and training
resumes from its last checkpoint. The active adapter changes only by the gate's atomic
``promote`` (``appliance.models.adapters``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


from appliance.cluster.settings import ClusterSettings
from appliance.evaluation.data import Skipped, load_defect_folder
from appliance.imaging import write_atomic
from appliance.training.grpo import GRPOSettings
from appliance.training.sft import SFTSettings

STAGES = ("calibrate", "trajectories", "sft", "grpo", "gate")


class RetrainError(RuntimeError):
    pass


@dataclass
class RetrainOptions:
    defects: Path
    category: str
    out: Path
    # Normal photos of the part: each defect's normal counterpart borrows the best-matching
    # one's pixels (reverse_synthesis); None: inpainted from the photo's own surroundings.
    normal: Path | None = None
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    size: int = 256  # square side the photos are brought to (the engine works at this size)
    holdout: float = 0.2  # share of each defect type never trained on
    steps: tuple[int, ...] = (1, 2, 3)  # image_gen steps of the expert trajectories
    margin: float = 0.02  # held-out reward a new adapter must gain over the active one
    # Relative rise of the held-out pixel AP (a detector trained on the engine's samples) a
    # calibration profile must reach; negative accepts a loss, -1 promotes whatever it measures.
    calibration_margin: float = 0.05
    # Share of the bootstrap resamples of the held-out photos and detector seeds in which the
    # profile must reach that margin: on a few held-out photos a gain can be luck.
    calibration_confidence: float = 0.8
    # Episodes per held-out photo in the gate (other seeds, other tool draws); in the CPU
    # engine's calibration check, per training photo (raised to 100 episodes, cut at 300).
    heldout_repeats: int = 2
    sft: SFTSettings = field(default_factory=SFTSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    # GRPO's rollouts on the engines of this Ray cluster (docs/cluster.md); None: here.
    cluster: ClusterSettings | None = None

    def as_dict(self) -> dict:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str))


@dataclass
class RunState:
    """``run.json``: the options the run started with and its finished stages."""

    path: Path
    options: dict
    finished: dict[str, dict]

    @classmethod
    def open(cls, out: Path, options: RetrainOptions, resume: bool) -> "RunState":
        path = Path(out) / "run.json"
        if path.is_file():
            if not resume:
                raise RetrainError(f"{out} already holds a run; pass --resume to continue it, or "
                                   "choose another --out")
            data = json.loads(path.read_text(encoding="utf-8"))
            mine = {k: v for k, v in options.as_dict().items()
                    if k not in ("stages", "out", "cluster")}  # where rollouts run may change
            # An option added since the run started counts as its default.
            theirs = {k: data["options"].get(k, v) for k, v in mine.items()}
            if mine != theirs:
                changed = sorted(k for k in mine if mine.get(k) != theirs.get(k))
                raise RetrainError(f"--resume with other settings than the run started with "
                                   f"({', '.join(changed)}); start a new run with another --out")
            return cls(path, data["options"], data.get("finished", {}))
        if resume:
            raise RetrainError(f"nothing to resume: {path} does not exist")
        Path(out).mkdir(parents=True, exist_ok=True)
        state = cls(path, options.as_dict(), {})
        state.save()
        return state

    def save(self) -> None:
        write_atomic(self.path, (json.dumps({"options": self.options, "finished": self.finished},
                                            indent=1) + "\n").encode())

    def finish(self, stage: str, figures: dict) -> None:
        self.finished[stage] = figures
        self.save()


def read_normals(options: RetrainOptions, skipped: list[Skipped]) -> list:
    """The photos of ``--normal``, brought to the defects' size; unreadable ones left out."""
    from appliance.evaluation.data import find_images, load_normals
    from appliance.imaging import ImageReadError

    if options.normal is None:
        return []
    try:
        paths = find_images(options.normal)
    except FileNotFoundError as exc:
        raise RetrainError(f"--normal: {exc}") from None
    normals = []
    for path in paths:
        try:
            normals += load_normals([path], options.size)
        except (ImageReadError, OSError) as exc:
            skipped.append(Skipped(str(path), f"normal photo unreadable: {exc}"))
    if not normals:
        raise RetrainError(f"--normal {options.normal}: no readable photo in it")
    return [n.image for n in normals]


def read_defects(options: RetrainOptions):
    """The plant's defects (one reader with ``appliance eval``) and what was left out."""
    skipped: list[Skipped] = []
    try:
        items = load_defect_folder(options.defects, options.size, skipped=skipped, nonempty=True)
    except FileNotFoundError as exc:
        raise RetrainError(str(exc)) from None
    return items, skipped
