"""The two-node cluster demo on one machine: ``python -m hotmodel.cluster.demo ROOT``.

``scripts/bootstrap.py cluster`` runs this after its set-up. It starts a
PostgreSQL of its own (data under ``ROOT/.hotmodel/cluster/postgres``, port
18432, what ``configs/cluster-*.toml`` name), then node A
(``configs/cluster-a.toml``, 127.0.0.1:18080) and node B
(``configs/cluster-b.toml``, 127.0.0.1:18081), each ``hotmodel serve`` with its
own llama-server and state dir. Ctrl-C (or SIGTERM) stops the nodes, each in
order (its llama-server with it), then PostgreSQL; a second Ctrl-C stops
waiting for them. A node that exits on its own stops the demo too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from hotmodel.cluster.postgres import LocalPostgres
from hotmodel.router.processes import spawn

PG_PORT = 18432
NODES = (("A", "cluster-a.toml", 18080), ("B", "cluster-b.toml", 18081))
STOP_S = 60.0  # each node stops its llama-server in order within this


class _Stop(Exception):  # noqa: N818  (a signal turned into control flow, never shown)
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _start(root: Path, config: str, port: int) -> subprocess.Popen[bytes]:
    """A node in a process group of its own (the terminal's Ctrl-C reaches us only, and
    we stop each node in order), tied to our life as hotmodel ties its router: were this
    process killed outright, each node is sent SIGTERM (Linux; a job object on Windows)
    and stops its llama-server in order."""
    argv = [sys.executable, "-m", "hotmodel", "serve", "--config", str(root / "configs" / config)]
    return spawn(argv, None, root)


def _interrupt(node: subprocess.Popen[bytes]) -> None:
    if node.poll() is not None:
        return
    if sys.platform == "win32":
        node.send_signal(signal.CTRL_BREAK_EVENT)
    else:
        node.send_signal(signal.SIGINT)


def main(root: Path) -> int:
    data = root / ".hotmodel" / "cluster" / "postgres"
    server = LocalPostgres(data, port=PG_PORT)
    signal.signal(signal.SIGINT, _raise_stop)
    if sys.platform != "win32":
        signal.signal(signal.SIGTERM, _raise_stop)
    nodes: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        print(f"PostgreSQL on 127.0.0.1:{PG_PORT} (data: {data})", flush=True)
        server.start()
        for name, config, port in NODES:
            print(f"node {name}: hotmodel serve --config configs/{config} (:{port})", flush=True)
            nodes.append(_start(root, config, port))
        print("cluster: GET http://127.0.0.1:18080/admin/cluster   (Ctrl-C stops it all)")
        while all(n.poll() is None for n in nodes):
            time.sleep(0.5)
        code = next(n.returncode for n in nodes if n.returncode is not None) or 1
        print("a node exited: stopping the cluster", flush=True)
    except _Stop:
        print("\nstopping the cluster (Ctrl-C again: stop waiting)", flush=True)
    finally:
        try:
            for node in nodes:
                _interrupt(node)
            deadline = time.monotonic() + STOP_S
            for node in nodes:
                try:
                    node.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.kill()
        except _Stop:
            for node in nodes:
                node.kill()
        finally:
            server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path.cwd()))
