"""``ray start`` and ``ray stop`` as the appliance runs them: token authentication always on,
no dashboard unless the config asks, bound to the configured address, and every port fixed so
that docs/cluster.md can list exactly what to open between the boxes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from appliance.cluster.auth import ClusterError, ray_auth_env
from appliance.config import Config

# Fixed ports (Ray's defaults pick some at random): the head's GCS port is cluster.port.
NODE_MANAGER_PORT = 6380
OBJECT_MANAGER_PORT = 6381
RUNTIME_ENV_AGENT_PORT = 6382
DASHBOARD_AGENT_GRPC_PORT = 6383
DASHBOARD_AGENT_LISTEN_PORT = 6384
METRICS_EXPORT_PORT = 6385
DASHBOARD_PORT = 8265
WORKER_PORTS = (10002, 10199)  # one per Ray worker process on the box


def ray_executable() -> str:
    """The ``ray`` command of this environment (the cluster extra installs it)."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError("Ray is not installed: install the cluster extra "
                           "(pip install '.[cluster]')")
    return found


def start_command(config: Config, join: str | None = None, num_cpus: int | None = None,
                  num_gpus: int | None = None, block: bool = False) -> tuple[list[str], dict]:
    """The ``ray start`` command line and its environment: the head when ``join`` is None,
    else a worker node joining the head at ``join`` (HOST:PORT)."""
    cluster = config.cluster
    env = {**os.environ, **ray_auth_env(config.cluster_token_file)}
    env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the token file
    args = [ray_executable(), "start", "--disable-usage-stats",
            f"--node-manager-port={NODE_MANAGER_PORT}",
            f"--object-manager-port={OBJECT_MANAGER_PORT}",
            f"--runtime-env-agent-port={RUNTIME_ENV_AGENT_PORT}",
            f"--dashboard-agent-grpc-port={DASHBOARD_AGENT_GRPC_PORT}",
            f"--dashboard-agent-listen-port={DASHBOARD_AGENT_LISTEN_PORT}",
            f"--metrics-export-port={METRICS_EXPORT_PORT}",
            f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}"]
    if join is None:
        # No Ray Client server: it needs ray[client], which the extra does not install.
        args += ["--head", f"--port={cluster.port}",
                 f"--include-dashboard={'true' if cluster.dashboard else 'false'}"]
        if cluster.dashboard:
            args += [f"--dashboard-port={DASHBOARD_PORT}",
                     f"--dashboard-host={cluster.node_ip or '127.0.0.1'}"]
    else:
        args += [f"--address={join}"]
    if cluster.node_ip:
        args += [f"--node-ip-address={cluster.node_ip}"]
    if num_cpus is not None:
        args += [f"--num-cpus={num_cpus}"]
    if num_gpus is not None:
        args += [f"--num-gpus={num_gpus}"]
    if block:
        args += ["--block"]
    return args, env


def stop_command() -> list[str]:
    return [ray_executable(), "stop"]
