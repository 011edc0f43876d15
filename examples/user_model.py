"""A user model for runjobs: a small residual network, built the same way in Keras and in torch.

    input -> Dense(width, tanh) = h -> h + Dense(width, tanh)(h), `blocks` times -> Dense(1)

runjobs calls `build_tensorflow(features, config)` for TensorFlow jobs and
`build_torch(features, config)` for torch jobs: `features` is the number of input
columns; `config` holds the job's `dtype`, `seed`, `normalize` and `model_args` (the
spec's `model_args: {width: 16, blocks: 2}`, or `--set model_args={width: 16}`).
runjobs owns the rest: the data and its order, the optimizer, the loop, the loss (mean
squared error on one output per row).

With `init: shared` (the default for user models) runjobs draws every parameter once in
numpy and loads it into both models by order and shape, so both must create their
parameters in the same order with the same shapes: here each dense layer's kernel
[inputs, outputs] then its bias, layer by layer (torch's nn.Linear keeps its weight as
[outputs, inputs]; runjobs transposes it). The framework imports are inside the
builders, so a process that builds only one model imports only its framework.
"""


def build_tensorflow(features, config):
    import keras

    width, blocks = _sizes(config)
    dtype = config["dtype"]
    inputs = keras.Input(shape=(features,), dtype=dtype)
    hidden = keras.layers.Dense(width, activation="tanh", dtype=dtype)(inputs)
    for _ in range(blocks):
        hidden = keras.layers.Add(dtype=dtype)(
            [hidden, keras.layers.Dense(width, activation="tanh", dtype=dtype)(hidden)]
        )
    outputs = keras.layers.Dense(1, dtype=dtype)(hidden)
    return keras.Model(inputs, outputs)


def build_torch(features, config):
    import torch

    class Residual(torch.nn.Module):
        def __init__(self, width, blocks):
            super().__init__()
            self.first = torch.nn.Linear(features, width)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
            self.last = torch.nn.Linear(width, 1)

        def forward(self, inputs):
            hidden = torch.tanh(self.first(inputs))
            for block in self.blocks:
                hidden = hidden + torch.tanh(block(hidden))
            return self.last(hidden)

    return Residual(*_sizes(config))


def _sizes(config):
    """The model's own arguments, with their defaults: width of each layer, residual blocks."""
    arguments = config["model_args"]
    return int(arguments.get("width", 16)), int(arguments.get("blocks", 1))
