"""Anchor: the source article's PyTorch house-price script, rewritten in our words.

nn.Linear(1, 1) with MSELoss and Adam lr 0.01, a 500-epoch eager loop that prints the
loss every 100 epochs, then one prediction for 1800 sq ft. No seed, as in the article.
"""

import numpy as np
import torch

sizes = torch.from_numpy(np.arange(500.0, 2751.0, 250.0, dtype=np.float32)).unsqueeze(1)
prices = 0.2 * sizes

model = torch.nn.Linear(1, 1)
loss_function = torch.nn.MSELoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
for epoch in range(500):
    loss = loss_function(model(sizes), prices)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (epoch + 1) % 100 == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
model.eval()
with torch.no_grad():
    prediction = model(torch.tensor([[1800.0]])).item()
weight, bias = model.weight.item(), model.bias.item()
print(f"torch: price = {weight:.4f} * size + {bias:.4f}; 1800 sq ft -> {prediction:.2f}")
