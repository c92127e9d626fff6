"""Keys of the Flower records exchanged between ServerApp and ClientApp, in one place."""

from typing import Any

ARRAYS = "arrays"  # ArrayRecord: the adapter tensors (Flower strategies' default key)
CONFIG = "config"  # ConfigRecord sent with each instruction
COMPRESSED = "compressed"  # ArrayRecord: a coded adapter payload in place of ARRAYS (codecs)
BASE_DELTA = "base-delta"  # ArrayRecord: factored change of the frozen base (FLoRA, FedEx-LoRA)
METRICS = "metrics"  # MetricRecord in each reply
NODE_INFO = "node-info"  # ConfigRecord in each training reply: what the node trained on
GRADIENT = "mean-gradient"  # ArrayRecord a training reply carries to the compression mod only

# ConfigRecord keys
SERVER_ROUND = "server-round"  # set by Flower strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
SCENARIO = "scenario-json"  # the resolved scenario; the server is its single source of truth
TRAIN_FACTORS = "train-factors"  # comma-separated factors the client trains (lora_A, lora_B, head)
SEND_FACTORS = "send-factors"  # factors the client sends back
PERSONAL_FACTORS = "personal-factors"  # factors the client keeps locally across rounds
ALPHA_MODE = "alpha-mode"  # "per-rank" (peft's scaling at r_i) or "shared-scaling" (at r_max)
PRUNE_GAMMA = "prune-gamma"  # HetLoRA rank self-pruning regulariser weight
PRUNE_THRESHOLD = "prune-threshold"
STATE_DIR = "state-dir"  # where clients keep per-client state (simulation: under the run folder)
SECAGG_KEYS = "secagg-keys"  # a SecAgg+ masked reply: which tensors its vector holds, in order
RUN_TAG = "run-tag"  # the run's tag for that state; a resumed run keeps it


def factor_set(config: Any, key: str) -> set[str]:
    """A comma-separated factor list (TRAIN_FACTORS, ...) of a ConfigRecord; empty if absent."""
    return {f for f in str(config.get(key, "") if config is not None else "").split(",") if f}


# MetricRecord keys
NUM_EXAMPLES = "num-examples"  # Flower strategies' weighting key
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "lr"  # the learning rate of the round's first optimizer step
PARTITION_ID = "partition-id"
TRAIN_SECONDS = "train_seconds"
CLIENT_RANK = "rank"  # LoRA rank the client trained (and sent)
PERSONAL_ACCURACY = "personal_accuracy"  # evaluation with the client's own local part
PERSONAL_LOSS = "personal_loss"
MODEL_LOADS = "model_loads"  # times this client process built its base model so far
STEP_SECONDS = "step_seconds"  # mean wall time of one local training step
PEAK_MEMORY_MB = "peak_memory_mb"  # peak device memory in training (CPU: process peak RSS)

# NODE_INFO keys (strings, which a MetricRecord cannot hold)
INFO_DEVICE = "device"  # the torch device trained on: cpu, mps, "cuda:0 (NVIDIA H200)"
INFO_HOST = "host"  # the node's host name
INFO_RAY_NODE = "ray_node"  # simulation: the id of the Ray node whose worker ran the client

# Node-config keys (set by Flower's simulation engine, or by `flower-supernode --node-config`)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_RANK = "rank"  # a node's own LoRA rank, for heterogeneous-rank strategies
NODE_STATE_DIR = "state-dir"  # where a real node keeps its per-client state
NODE_DEVICE = "device"  # a real node's own torch device (cpu, cuda:N, mps)
NODE_DATA_PATH = "data-path"  # a real node's own data file, in place of its partition
NODE_TRAINER_SOCKET = "trainer-socket"  # a deployed node's trainer (fedpeft.clients.trainer)

# Run-config keys (pyproject's [tool.flwr.app.config])
RUN_SCENARIO = "scenario"
RUN_SCENARIO_JSON = "scenario-json"
RUN_OUT_DIR = "out-dir"
RUN_ENGINE = "engine"  # "deployment" or "simulation"; empty: told from the Grid
RUN_SECURE = "secure"  # the submitter's word that TLS and SuperNode authentication are on
RUN_RESUME = "resume"  # carry on from the out-dir's checkpoint (``fedpeft run --resume``)
RUN_COMMAND = "command"  # the command line that started the run (the adapter's model card)


def round_of(message: Any) -> int:
    """The server round of a Flower message: its config's ``server-round`` (0 without one)."""
    config = message.content.config_records.get(CONFIG) if message.has_content() else None
    return int(str(config.get(SERVER_ROUND, 0))) if config is not None else 0
