"""The cluster settings a run uses: the ``[cluster]`` table, with the command line's choices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config


@dataclass
class ClusterSettings:
    address: str
    token_file: Path
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    chunks_per_engine: int = 2

    @classmethod
    def from_config(cls, config: Config, address: str | None = None,
                    token_file: Path | None = None) -> "ClusterSettings | None":
        """None when neither ``address`` nor the configuration names a cluster."""
        address = address or config.cluster.address
        if not address:
            return None
        return cls(address=address, token_file=token_file or config.cluster_token_file,
                   cpus_per_engine=config.cluster.cpus_per_engine,
                   gpus_per_engine=config.cluster.gpus_per_engine,
                   chunks_per_engine=config.cluster.chunks_per_engine)
