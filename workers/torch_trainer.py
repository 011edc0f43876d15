"""PyTorch trainer: an nn.Linear(1 feature or more, 1) trained on the device Ray assigned.

PyTorch's quickest path for a two-parameter model is its plain eager loop; torch.compile
costs seconds of compilation that 500 tiny steps never win back, so `fast` and
`article` run the same loop here. Importing this module imports torch; only a worker
that trains with torch imports it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from workers.devices import choose_device
from workers.training import Device, TrainerOutcome, TrainingData, batch_size_for

# torch.__version__ is a TorchVersion object; unpickling one in the driver would import
# torch there (about 1 s), so results carry a plain str.
VERSION = str(torch.__version__)


def initialise(gpu_ids: tuple[str, ...], allow_cpu_fallback: bool) -> Device:
    """Pick the device for Ray's assignment: CUDA_VISIBLE_DEVICES makes it cuda:0."""
    visible = torch.cuda.device_count() if gpu_ids and torch.cuda.is_available() else 0
    device = choose_device(
        "torch",
        gpu_ids,
        visible,
        "cuda:0",
        allow_cpu_fallback,
        f"torch {VERSION} built with CUDA {torch.version.cuda}",
    )
    torch.zeros(1, device=device.name)  # start the runtime (and CUDA context) now
    # The first optimizer construction imports torch._dynamo (about 1 s here); that is
    # framework start-up, so pay it now rather than inside the job's set-up time.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return device


def train(spec, data: TrainingData, device: Device) -> TrainerOutcome:
    setup_started = time.perf_counter()
    torch.manual_seed(spec.seed)
    target_device = torch.device(device.name)
    feature_count = data.features.shape[1]
    model = torch.nn.Linear(feature_count, 1).to(target_device)
    if spec.initial_value is not None:
        with torch.no_grad():
            model.weight.fill_(spec.initial_value)
            model.bias.fill_(spec.initial_value)
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=spec.lr, betas=(spec.beta_1, spec.beta_2), eps=spec.epsilon
        )
    loss_function = torch.nn.MSELoss()
    features = torch.from_numpy(data.features).to(target_device)
    target = torch.from_numpy(data.target).to(target_device)
    rows = data.rows
    batch = batch_size_for(spec.batch_size, rows)
    shuffler = torch.Generator().manual_seed(spec.seed)
    synchronise = torch.cuda.synchronize if target_device.type == "cuda" else (lambda: None)

    def step(batch_features, batch_target):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(batch_features), batch_target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    setup_s = time.perf_counter() - setup_started
    epoch_losses = []
    epoch_seconds = []
    train_started = time.perf_counter()
    for _ in range(spec.epochs):
        epoch_started = time.perf_counter()
        if batch >= rows:
            epoch_losses.append(step(features, target))
        else:
            order = torch.randperm(rows, generator=shuffler).to(target_device)
            total = torch.zeros((), device=target_device)
            for start in range(0, rows, batch):
                indices = order[start : start + batch]
                total += step(features[indices], target[indices]) * len(indices)
            epoch_losses.append(total / rows)
        synchronise()
        epoch_seconds.append(time.perf_counter() - epoch_started)
    # One transfer for the whole history instead of a .item() sync every epoch.
    losses = torch.stack(epoch_losses).cpu().tolist() if epoch_losses else []
    train_s = time.perf_counter() - train_started

    predict_started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        inputs = torch.from_numpy(data.prediction_inputs).to(target_device)
        predictions = model(inputs).reshape(-1).cpu().numpy() if len(inputs) else np.zeros(0)
    predict_s = time.perf_counter() - predict_started

    return TrainerOutcome(
        weights=model.weight.detach().reshape(-1).cpu().numpy().astype(np.float64),
        bias=float(model.bias.detach().cpu()[0]),
        loss_history=[float(value) for value in losses],
        epoch_seconds=epoch_seconds,
        predictions=predictions,
        setup_s=setup_s,
        train_s=train_s,
        predict_s=predict_s,
    )
