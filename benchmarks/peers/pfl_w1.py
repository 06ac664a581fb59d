"""Workload W1 in pfl-research (Apple's `pfl`, PyTorch integration): training speed.

pfl's own pieces do the work: `FederatedDataset` (10,000 users, each user's data made lazily from
its id when the user is sampled), `SimulatedBackend`, `FederatedAveraging` with local SGD through
pfl's PyTorch bridge (`PyTorchModel`), and central DP as pfl does it: `GaussianMechanism`
(clipping bound 1.0, noise multiplier 1.0) wrapped in `CentrallyAppliedPrivacyMechanism` (each
user's update clipped, noise N(0, 1.0^2) added to the sum, then averaged over the cohort), its
noise parameter taken from pfl's `RDPPrivacyAccountant` (set up once, before training). The
server step is `torch.optim.SGD(lr=1.0, momentum=0.9, nesterov=True)` on the averaged update.

Only the user sampler is ours: it hands out PlainLoop's cohort for the round (50 distinct users,
uniform), so that users, data, minibatch order and initial weights are the same as fleet's plain
PyTorch baseline.

`--processes 1`: one process, torch on `--threads` threads (default: all cores).
`--processes P > 1`: pfl's own multi-worker simulation: this script relaunches itself under
`torchrun --standalone` (torch.distributed, gloo, loopback only); each worker trains its share of
the cohort on cores/P threads and pfl all-reduces the sums.

One warm-up round (not timed), then `--rounds` timed rounds; the last line on stdout is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import w1_common as w1  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, after 1 warm-up round")
    p.add_argument("--cohort", type=int, default=w1.COHORT)
    p.add_argument("--population", type=int, default=w1.POPULATION)
    p.add_argument(
        "--examples", type=int, default=w1.EXAMPLES, help="sequences a device (smoke tests: fewer)"
    )
    p.add_argument("--processes", type=int, default=1, help="pfl workers (torch.distributed via torchrun)")
    p.add_argument("--threads", type=int, default=0, help="torch threads a process (0: cores / processes)")
    p.add_argument("--seed", type=int, default=w1.SEED)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
    """Run the workers under torchrun; print rank 0's JSON line last."""
    threads = args.threads or max(1, w1.cores() // args.processes)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [a for a in sys.argv[1:]]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={args.processes}", os.path.abspath(__file__), *argv,
            "--threads", str(threads), "--json-out", out,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        rc = subprocess.call(cmd, env=env)
        if rc == 0 and os.path.exists(out):
            with open(out) as f:
                print(f.read().strip(), flush=True)
        return rc


def run(args: argparse.Namespace) -> dict:
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # pfl's noise
    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = args.threads or max(1, w1.cores() // world)
    torch.set_num_threads(threads)
    # Every worker must draw the same seeds (pfl's samplers and DP noise seeds come from numpy).
    np.random.seed(args.seed)

    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module as get_ops
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism, RDPPrivacyAccountant

    rank = get_ops().distributed.global_rank
    assert get_ops().distributed.world_size == world

    class CohortSampler:
        """PlainLoop's cohort of round r, handed out in order; pfl's multi-worker sampler calls
        it the same number of times on every worker, so call k is user k of the cohort on all."""

        def __init__(self) -> None:
            self.start_round(0)

        def start_round(self, r: int) -> None:
            self.round, self.pos = r, 0
            self.ids = w1.cohort_of(r, args.population, args.cohort, args.seed)

        def __call__(self) -> int:
            uid = int(self.ids[self.pos % len(self.ids)])
            self.pos += 1
            return uid

    sampler = CohortSampler()

    def make_dataset(uid: int) -> Dataset:
        x, y = w1.device_batches(uid, sampler.round, args.examples)
        return Dataset(raw_data=(x, y), user_id=str(uid))

    stamps: dict[int, float] = {}

    class Clock(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps[central_iteration] = time.perf_counter()
            sampler.start_round(central_iteration + 1)
            return False, Metrics()

    total_rounds = args.rounds + 1  # round 0 is the warm-up
    module = w1.build_model(args.seed)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(
            module.parameters(), lr=w1.SERVER_LR, momentum=w1.SERVER_MOMENTUM, nesterov=True
        ),
    )
    accountant = RDPPrivacyAccountant(
        num_compositions=total_rounds,
        sampling_probability=args.cohort / args.population,
        mechanism="gaussian",
        noise_parameter=w1.NOISE_MULTIPLIER,
        delta=1.0 / args.population**1.1,  # fleet's default delta
    )
    mechanism = GaussianMechanism.from_privacy_accountant(accountant=accountant, clipping_bound=w1.CLIP)
    assert mechanism.relative_noise_stddev == w1.NOISE_MULTIPLIER
    backend = SimulatedBackend(
        training_data=FederatedDataset(make_dataset, sampler),
        val_data=None,
        postprocessors=[CentrallyAppliedPrivacyMechanism(mechanism)],
    )
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=total_rounds,
        evaluation_frequency=total_rounds + 1,  # only round 0 (the warm-up) "evaluates": a no-op
        train_cohort_size=args.cohort,
        val_cohort_size=0,
    )
    train_params = NNTrainHyperParams(
        local_learning_rate=w1.CLIENT_LR,
        local_num_epochs=w1.LOCAL_EPOCHS,
        local_batch_size=w1.BATCH_SIZE,
    )
    FederatedAveraging().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        callbacks=[Clock()],
        send_metrics_to_platform=False,
    )
    wall = stamps[args.rounds] - stamps[0]
    return {
        "framework": "pfl",
        "version": pfl.__version__ if hasattr(pfl, "__version__") else _version("pfl"),
        "updates_per_s": args.rounds * args.cohort / wall,
        "rounds": args.rounds,
        "cohort": args.cohort,
        "processes": world,
        "threads": threads,
        "wall_s": wall,
        "population": args.population,
        "examples": args.examples,
        "params": w1.num_params(module),
        "dp": {
            "clip": w1.CLIP,
            "z": w1.NOISE_MULTIPLIER,
            "epsilon": accountant.epsilon,
            "delta": accountant.delta,
        },
        "torch": torch.__version__,
        "rank": rank,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    args = parse()
    if args.processes > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return launch(args)
    result = run(args)
    if result.pop("rank") == 0:
        line = json.dumps(result)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(line + "\n")
        else:
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
