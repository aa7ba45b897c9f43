"""What every node must hold for its samples to be the head's samples.

The head lists, for the engine it asked for, the sha256 of every installed model bundle the
engine uses, the knowledge base's digest and the promoted adapters and calibration profiles. A
node computes the same list from its own disk and checks every bundle file's bytes; a node whose
list differs is refused by name, never used with a different model.

On a node, the models are at ``$APPLIANCE_MODELS`` of its Ray processes when that is set, else
at the head's models folder (the same path on every box).
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from dataclasses import replace
from pathlib import Path

import appliance
from appliance.engine import EngineConfig, model_roles, promoted_versions
from appliance.models.bundle import verify_files
from appliance.models.manifest import ManifestError, default_models_dir, load_installed, model_for
from appliance.tools.knowledge.base import load_knowledge_base


def for_this_node(config: EngineConfig) -> EngineConfig:
    """The head's engine configuration with this node's models folder."""
    local = os.environ.get("APPLIANCE_MODELS")
    return replace(config, models_dir=Path(local)) if local else config


def with_models_dir(config: EngineConfig) -> EngineConfig:
    """The configuration with its models folder spelled out (the head's, for the nodes)."""
    return replace(config, models_dir=Path(config.models_dir or default_models_dir()).resolve())


# Libraries whose version changes pixels or model outputs: a node on another release could make
# other samples from the same seeds. (Not onnxruntime or faiss: a GPU box has their -gpu builds
# under other names; not a build's local tag either: torch is 2.13.0+cpu here, +cu130 there.)
PACKAGES = ("numpy", "pillow", "opencv-python-headless", "scipy", "scikit-image", "torch",
            "transformers", "diffusers", "peft")


def engine_fingerprint(config: EngineConfig) -> dict[str, str]:
    """``what -> digest or version`` for everything the engine loads that must match across
    nodes. A bundle this box lacks is listed as ``missing: ...``."""
    items: dict[str, str] = {"appliance": appliance.__version__}
    for package in PACKAGES:
        try:
            items[f"package {package}"] = metadata.version(package).split("+")[0]
        except metadata.PackageNotFoundError:
            items[f"package {package}"] = "not installed"
    for role, backend in sorted(model_roles(config).items()):
        try:
            entry, _ = model_for(config.models_dir, role, backend)
        except (FileNotFoundError, ManifestError) as exc:
            items[f"{role} bundle ({backend})"] = f"missing: {exc}"
            continue
        files = "".join(f"{item.path}\0{item.sha256}\0"
                        for item in sorted(entry.files, key=lambda item: item.path))
        items[f"{role} bundle {entry.name}"] = hashlib.sha256(files.encode()).hexdigest()
    items["knowledge base"] = load_knowledge_base(config.knowledge_base).digest
    for kind, actives in sorted(promoted_versions(config).items()):
        for category, digest in sorted(actives.items()):
            items[f"promoted {kind} {category}"] = str(digest)
    return items


def _shown(value: str) -> str:
    return f"sha256 {value[:12]}..." if len(value) == 64 else value


def node_problems(config: EngineConfig, expected: dict[str, str]) -> list[str]:
    """Why this node cannot run the head's engine (empty when it can): a missing or different
    bundle, knowledge base or promoted profile, or a bundle file whose bytes are not the
    manifest's."""
    mine = engine_fingerprint(config)
    problems = []
    for what in sorted(set(expected) | set(mine)):
        here, head = mine.get(what), expected.get(what)
        if here == head:
            continue
        if here is None or here.startswith("missing"):
            problems.append(f"{what}: not on this node ({here or 'not installed'})")
        elif head is None:
            problems.append(f"{what}: on this node but not on the head")
        else:
            problems.append(f"{what}: {_shown(here)} here, {_shown(head)} on the head")
    used = [what.split()[-1] for what, digest in mine.items()
            if " bundle " in what and not digest.startswith("missing")]
    if used:
        manifest = load_installed(config.models_dir)
        root = Path(config.models_dir or default_models_dir())
        if manifest is not None:
            problems += [f"bundle {p.model}: {p.path}: {p.reason}"
                         for p in verify_files(manifest, root, names=used)]
    return problems
