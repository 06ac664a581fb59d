"""Workload W1 in Flower's Simulation Engine (flwr, Ray backend): training speed.

A `ServerApp` and a `ClientApp` (Flower's Message API) run by `flwr.simulation.run_simulation` on
10,000 virtual SuperNodes; node i's data is W1's device i (its `partition-id`), made when the node
is sampled. Each round Flower's `FedAvg` samples 50 nodes uniformly without replacement and
sends them the global model; each runs W1's local SGD (1 epoch, batch 16, lr 0.5, PlainLoop's
minibatch order) in a Ray actor with 1 CPU and 1 torch thread, so `--cpus` clients (default: all
cores) train at once, and sends its whole model back. Central DP is Flower's
`DifferentialPrivacyServerSideFixedClipping` (clip each update to 1.0 on the server, FedAvg,
Gaussian noise of std z * clip / cohort on the average, z = 1.0). Flower has no Nesterov server
optimiser (FedAvgM is heavy-ball, and the DP wrapper would add the noise after its step), so this
script's strategy takes W1's server step itself on the noised average: SGD lr 1.0 with Nesterov
momentum 0.9, as torch.optim.SGD does it.

One warm-up round (not timed), then `--rounds` timed rounds; the last line on stdout is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here
# Ray runs its workers at niceness 15 by default; fleet's bench sets 0 for its own Ray workers so
# that a shared machine's other users do not take their cores. Same here.
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import w1_common as w1  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, after 1 warm-up round")
    p.add_argument("--cohort", type=int, default=w1.COHORT)
    p.add_argument("--population", type=int, default=w1.POPULATION, help="virtual SuperNodes")
    p.add_argument(
        "--examples", type=int, default=w1.EXAMPLES, help="sequences a device (smoke tests: fewer)"
    )
    p.add_argument("--cpus", type=int, default=0, help="CPUs given to Ray (0: all cores); 1 a client")
    p.add_argument("--seed", type=int, default=w1.SEED)
    return p.parse_args(argv)


# ---- client side -------------------------------------------------------------------------------
client = ClientApp()
_MODEL: dict[str, w1.W1Model] = {}


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one CPU a client (Ray also sets OMP_NUM_THREADS=1 in the actor)
    model = _MODEL.get("m")
    if model is None:  # one model object a Ray actor, reused: building it is not W1's work
        model = _MODEL["m"] = w1.W1Model()
    config = msg.content["config"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = int(context.node_config["partition-id"])
    x, y = w1.device_batches(device, int(config["server-round"]) - 1, int(config["examples"]))
    w1.local_sgd(model, x, y)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": int(config["examples"])}),
        }
    )
    return Message(content=reply, reply_to=msg)


# ---- server side -------------------------------------------------------------------------------
class W1CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping central DP around FedAvg, then W1's Nesterov server
    step on the noised average; stamps the end of every round."""

    def __init__(self, *args, stamps: dict[int, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps = stamps
        self.momentum: list[np.ndarray] | None = None

    def aggregate_train(self, server_round, replies):
        old = self.current_arrays  # the global model this round's clients started from
        arrays, metrics = super().aggregate_train(server_round, replies)  # clip, average, noise
        if arrays is not None:
            keys = list(arrays.keys())
            grads = [o - n for o, n in zip(old.to_numpy_ndarrays(), arrays.to_numpy_ndarrays(), strict=True)]
            if self.momentum is None:
                self.momentum = [g.copy() for g in grads]
            else:
                for buf, g in zip(self.momentum, grads, strict=True):
                    buf *= w1.SERVER_MOMENTUM
                    buf += g
            new = [
                o - w1.SERVER_LR * (g + w1.SERVER_MOMENTUM * buf)
                for o, g, buf in zip(old.to_numpy_ndarrays(), grads, self.momentum, strict=True)
            ]
            arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, new, strict=True)})
        self.stamps[server_round] = time.perf_counter()
        return arrays, metrics


def make_server(args: argparse.Namespace, stamps: dict[int, float]) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = w1.build_model(args.seed)
        fedavg = FedAvg(
            fraction_train=1e-12,  # sample exactly min_train_nodes
            fraction_evaluate=0.0,  # W1 does not evaluate
            min_train_nodes=args.cohort,
            min_available_nodes=args.population,
        )
        strategy = W1CentralDP(
            fedavg,
            noise_multiplier=w1.NOISE_MULTIPLIER,
            clipping_norm=w1.CLIP,
            num_sampled_clients=args.cohort,
            stamps=stamps,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=args.rounds + 1,  # round 1 is the warm-up
            train_config=ConfigRecord({"examples": args.examples}),
        )

    return server


def main() -> int:
    import warnings

    from flwr.simulation import run_simulation

    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
    args = parse()
    cpus = args.cpus or w1.cores()
    stamps: dict[int, float] = {}
    run_simulation(
        server_app=make_server(args, stamps),
        client_app=client,
        num_supernodes=args.population,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
        },
    )
    first, last = 1, args.rounds + 1
    if first not in stamps or last not in stamps:
        print(f"flower_w1: rounds finished: {sorted(stamps)}", file=sys.stderr)
        return 1
    wall = stamps[last] - stamps[first]
    from importlib.metadata import version

    print(
        json.dumps(
            {
                "framework": "flower",
                "version": version("flwr"),
                "updates_per_s": args.rounds * args.cohort / wall,
                "rounds": args.rounds,
                "cohort": args.cohort,
                "processes": cpus,  # Ray actors training at once, 1 CPU each
                "threads": 1,
                "wall_s": wall,
                "population": args.population,
                "examples": args.examples,
                "params": w1.num_params(w1.W1Model()),
                "dp": {"clip": w1.CLIP, "z": w1.NOISE_MULTIPLIER, "epsilon": None},
                "ray": version("ray"),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
