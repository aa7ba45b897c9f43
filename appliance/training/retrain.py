"""``appliance retrain``: run the asked stages in order, skipping those a resumed run finished.

The run directory and its crash safety are described in ``run.py``; the stages in ``stages.py``.
"""

from __future__ import annotations

from typing import Callable

from appliance.engine import EngineConfig
from appliance.names import normalize_name
from appliance.training import stages
from appliance.training.run import (STAGES, RetrainError, RetrainOptions, RunState, read_defects,
                                    read_normals)


def run_retrain(options: RetrainOptions, engine_config: EngineConfig, resume: bool = False,
                say: Callable[[str], None] = print, progress=None) -> dict:
    """Run the asked stages; returns the report (also written to RUN/report.json and .md).

    ``progress(total, label)`` makes a progress bar (a context manager with ``update(n)``).
    """
    category = normalize_name(options.category)
    if not category:
        raise RetrainError("--category is empty")
    state = RunState.open(options.out, options, resume)
    items, skipped = read_defects(options)
    normals = read_normals(options, skipped)
    say(f"{len(items)} defect photo(s) with masks in {options.defects}"
        + (f", {len(normals)} normal photo(s) in {options.normal}" if options.normal else "")
        + (f"; {len(skipped)} left out (see the report)" if skipped else ""))
    context = stages.StageContext(options, category, state, items, skipped, say, progress,
                                   engine_config, normals=normals)
    for stage in STAGES:
        if stage not in options.stages:
            continue
        if stage in state.finished:
            say(f"{stage}: finished before, kept")
            continue
        getattr(stages, f"run_{stage}")(context)
    report = stages.write_report(context)
    return report
