"""Anchor: the article's torch job as Ray Train users write it, TorchTrainer with 2 workers.

The article's model and loop (nn.Linear(1, 1), Adam lr 0.01, 500 epochs on the 10
houses) in a train_loop_per_worker, the model wrapped by ray.train.torch.prepare_model
(DDP with gloo on CPU), metrics reported once at the end. Run as a fresh process; it
starts and stops its own local Ray.
"""

import tempfile

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def train_loop_per_worker(config):
    sizes = torch.from_numpy(np.arange(500.0, 2751.0, 250.0, dtype=np.float32)).unsqueeze(1)
    prices = 0.2 * sizes
    model = ray.train.torch.prepare_model(torch.nn.Linear(1, 1))
    loss_function = torch.nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(config["epochs"]):
        loss = loss_function(model(sizes), prices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ray.train.report({"loss": loss.item()})


if __name__ == "__main__":
    ray.init(address="local")  # a fresh local Ray, as runjobs starts
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"epochs": 500},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=storage, name="article-ddp"),
        )
        result = trainer.fit()
        print("ray train:", result.metrics)
    ray.shutdown()
