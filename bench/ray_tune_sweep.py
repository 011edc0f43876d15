"""Anchor: the 8-job sweep as Ray Tune users write it, the article's code in function trainables.

framework {tensorflow, torch} x lr {0.01, 0.1} x seed {0, 1}, 500 epochs on the 10
houses: Keras Sequential/compile/fit for TensorFlow, the article's eager loop for torch,
each trial reporting its final loss. Run as a fresh process with its own local Ray.
"""

import tempfile

import numpy as np
import ray
from ray import tune


def article_trainable(config):
    sizes = np.arange(500.0, 2751.0, 250.0)
    prices = 0.2 * sizes
    if config["framework"] == "tensorflow":
        import tensorflow as tf

        tf.keras.utils.set_random_seed(config["seed"])
        model = tf.keras.Sequential([tf.keras.Input(shape=(1,)), tf.keras.layers.Dense(1)])
        model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=config["lr"]), loss="mse")
        history = model.fit(sizes, prices, epochs=500, verbose=0)
        loss = history.history["loss"][-1]
    else:
        import torch

        torch.manual_seed(config["seed"])
        x = torch.from_numpy(sizes.astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(prices.astype(np.float32)).unsqueeze(1)
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
        for _ in range(500):
            loss_tensor = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss_tensor.backward()
            optimizer.step()
        loss = loss_tensor.item()
    tune.report({"loss": float(loss)})


if __name__ == "__main__":
    ray.init(address="local")
    with tempfile.TemporaryDirectory() as storage:
        tuner = tune.Tuner(
            article_trainable,
            param_space={
                "framework": tune.grid_search(["tensorflow", "torch"]),
                "lr": tune.grid_search([0.01, 0.1]),
                "seed": tune.grid_search([0, 1]),
            },
            run_config=tune.RunConfig(storage_path=storage, name="article-sweep", verbose=0),
        )
        results = tuner.fit()
        print("ray tune:", len(results), "trials,", sum(not result.error for result in results), "succeeded")
    ray.shutdown()
