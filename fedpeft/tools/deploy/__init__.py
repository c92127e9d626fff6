"""``fedpeft deploy``: certificates, SuperNode keys, Flower's processes, and a local federation.

A thin, documented layer over Flower's own deployment engine (``flower-superlink``,
``flower-supernode``, ``flwr``); it writes no transport of its own. What it adds is safe
defaults: TLS and SuperNode authentication unless ``--insecure`` is asked for explicitly,
certificates whose names cover every address in use, one key pair per node in the format
Flower 1.42 reads, no runtime dependency installation, no telemetry
(docs/dev/flower-1.42-deployment-notes.md).

:mod:`.certs` writes certificates and node keys, :mod:`.flower` builds the SuperLink's and
SuperNodes' command lines, :mod:`.submit` submits a run with ``flwr run``,
:mod:`.processes` starts and stops processes by PID, and :mod:`.local` puts them together
into ``fedpeft deploy local``: a whole federation on 127.0.0.1.
"""

from fedpeft.tools.deploy.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    make_certs,
    make_node_key,
)
from fedpeft.tools.deploy.errors import DeployError
from fedpeft.tools.deploy.flower import (
    SuperLinkOptions,
    SuperNodeOptions,
    check_superlink_address,
    deploy_env,
    flower_bin,
    node_config,
    superlink_command,
    supernode_command,
)
from fedpeft.tools.deploy.local import (
    READY_SUPERLINK,
    READY_SUPERNODE,
    REFUSED_SUPERNODE,
    deploy_local,
)
from fedpeft.tools.deploy.processes import Processes, descendants, free_port, wait_for_text
from fedpeft.tools.deploy.submit import (
    APP_CONFIG,
    CONNECTION,
    flwr_run_command,
    submit_run,
    write_app,
    write_connection,
    write_run_config,
)
from fedpeft.tools.deploy.trainer import TrainerSupervisor, run_supernode_with_trainer

__all__ = [
    "APP_CONFIG",
    "CA_CERT",
    "CA_KEY",
    "CONNECTION",
    "READY_SUPERLINK",
    "READY_SUPERNODE",
    "REFUSED_SUPERNODE",
    "SERVER_CERT",
    "SERVER_KEY",
    "DeployError",
    "Processes",
    "SuperLinkOptions",
    "SuperNodeOptions",
    "TrainerSupervisor",
    "check_superlink_address",
    "deploy_env",
    "deploy_local",
    "descendants",
    "flower_bin",
    "flwr_run_command",
    "free_port",
    "make_certs",
    "make_node_key",
    "node_config",
    "run_supernode_with_trainer",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "wait_for_text",
    "write_app",
    "write_connection",
    "write_run_config",
]
