"""Benchmark: runjobs' training loop for an mlp against an idiomatic loop written by hand, per framework.

An mlp (2 x 64, relu) on 100,000 rows of synthetic sine data with 4 features, 100 epochs,
minibatches of 1,024, Adam lr 0.001: runjobs' `train_s` (workers.entry.run_job, no Ray,
so only the loop is measured) beside the same training written the way an expert would
in that framework:

- TensorFlow: the whole run in one `tf.function` over shuffled index batches, Keras Adam;
- torch: the plain eager loop with `torch.optim.Adam` (its default foreach kernels);
- JAX: one `jax.jit`-compiled run (`lax.scan` over the batches, `fori_loop` over the
  epochs) with `optax.adam`.

Compilation and tracing are left out of both sides' train time (runjobs counts them as
set-up). Each measurement is a fresh process; the medians of `--rounds` rounds are
printed, with the ratio runjobs / hand-written (target: at most 1.2).

    .venv/bin/python bench/bench_models.py [--rounds 3] [--frameworks tensorflow,torch,jax]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DATA = "synthetic:rows=100000,features=4,noise=0.1,seed=0,function=sine"
EPOCHS, BATCH, HIDDEN, LR = 100, 1024, (64, 64), 0.001


def runjobs_train_s(framework: str) -> float:
    from jobs.plan.spec import make_spec
    from workers.data import load_dataset
    from workers.entry import run_job

    spec = make_spec(
        {"framework": framework, "model": "mlp", "hidden": HIDDEN, "data": DATA, "epochs": EPOCHS,
         "batch_size": BATCH, "lr": LR}
    )  # fmt: skip
    result = run_job(spec.for_worker(), load_dataset(DATA), time.time())
    return result["timings"]["train_s"]


def arrays():
    from workers.data import load_dataset

    dataset = load_dataset(DATA)
    return dataset.features.astype("float32"), dataset.target.astype("float32").reshape(-1, 1)


def hand_tensorflow() -> float:
    import tensorflow as tf

    features, target = arrays()
    rows = len(features)
    keras = tf.keras
    model = keras.Sequential(
        [keras.Input((features.shape[1],))]
        + [keras.layers.Dense(size, activation="relu") for size in HIDDEN]
        + [keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.Adam(LR)
    optimizer.build(model.trainable_variables)
    x, y = tf.constant(features), tf.constant(target)

    @tf.function
    def run(epochs):
        for _ in tf.range(epochs):
            order = tf.random.shuffle(tf.range(rows))
            for start in tf.range(0, rows, BATCH):
                indices = order[start : tf.minimum(start + BATCH, rows)]
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(model(tf.gather(x, indices)) - tf.gather(y, indices)))
                gradients = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    compiled = run.get_concrete_function(tf.constant(EPOCHS))
    started = time.perf_counter()
    compiled(tf.constant(EPOCHS)).numpy()
    return time.perf_counter() - started


def hand_torch() -> float:
    import torch

    features, target = arrays()
    x, y = torch.from_numpy(features), torch.from_numpy(target)
    rows = len(features)
    layers: list[torch.nn.Module] = []
    sizes = (features.shape[1], *HIDDEN)
    for inputs, outputs in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(inputs, outputs), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(HIDDEN[-1], 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    started = time.perf_counter()
    for _ in range(EPOCHS):
        order = torch.randperm(rows)
        for start in range(0, rows, BATCH):
            indices = order[start : start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = ((model(x[indices]) - y[indices]) ** 2).mean()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def hand_jax() -> float:
    import jax
    import jax.numpy as jnp
    import optax

    features, target = arrays()
    rows = len(features)
    steps = rows // BATCH  # whole batches: lax.scan needs one shape
    key = jax.random.PRNGKey(0)
    sizes = (features.shape[1], *HIDDEN, 1)
    parameters = []
    for inputs, outputs in zip(sizes[:-1], sizes[1:]):
        key, subkey = jax.random.split(key)
        limit = (6 / (inputs + outputs)) ** 0.5
        parameters += [jax.random.uniform(subkey, (inputs, outputs), minval=-limit, maxval=limit),
                       jnp.zeros(outputs)]  # fmt: skip
    optimizer = optax.adam(LR)
    x, y = jnp.asarray(features), jnp.asarray(target)

    def forward(parameters, batch):
        for index in range(0, len(parameters) - 2, 2):
            batch = jax.nn.relu(batch @ parameters[index] + parameters[index + 1])
        return batch @ parameters[-2] + parameters[-1]

    def loss(parameters, batch_x, batch_y):
        return jnp.mean((forward(parameters, batch_x) - batch_y) ** 2)

    def epoch(index, state):
        parameters, optimizer_state = state
        order = jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(1), index), rows)
        batches = order[: steps * BATCH].reshape(steps, BATCH)

        def step(carry, indices):
            parameters, optimizer_state = carry
            gradients = jax.grad(loss)(parameters, x[indices], y[indices])
            updates, optimizer_state = optimizer.update(gradients, optimizer_state)
            return (optax.apply_updates(parameters, updates), optimizer_state), None

        return jax.lax.scan(step, (parameters, optimizer_state), batches)[0]

    run = jax.jit(lambda state: jax.lax.fori_loop(0, EPOCHS, epoch, state))
    state = (parameters, optimizer.init(parameters))
    compiled = run.lower(state).compile()
    started = time.perf_counter()
    jax.block_until_ready(compiled(state))
    return time.perf_counter() - started


HAND = {"tensorflow": hand_tensorflow, "torch": hand_torch, "jax": hand_jax}


def measure(kind: str, framework: str) -> float:
    """One measurement in a fresh process: `kind` is runjobs or hand."""
    shown = subprocess.run(
        [sys.executable, __file__, "--one", kind, framework], capture_output=True, text=True, check=True
    )
    return float(shown.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frameworks", default="tensorflow,torch,jax")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "FRAMEWORK"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        kind, framework = arguments.one
        print(runjobs_train_s(framework) if kind == "runjobs" else HAND[framework]())
        return
    from bench_submit import machine

    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}")
    results = {}
    for framework in arguments.frameworks.split(","):
        samples: dict[str, list[float]] = {"runjobs": [], "hand": []}
        for _ in range(arguments.rounds):
            for kind in ("runjobs", "hand"):  # side by side, alternating
                samples[kind].append(measure(kind, framework))
        runjobs, hand = statistics.median(samples["runjobs"]), statistics.median(samples["hand"])
        results[framework] = {"runjobs_train_s": runjobs, "hand_train_s": hand, "ratio": runjobs / hand,
                              "samples": samples}  # fmt: skip
        print(f"{framework}: runjobs {runjobs:.2f} s, by hand {hand:.2f} s, ratio {runjobs / hand:.2f}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
