"""Anchor: the source article's Keras house-price script, rewritten in our words.

Sequential Dense(1), compiled with Keras' default Adam and mse, fit for 500 epochs with
verbose=0, then one prediction for 1800 sq ft. No seed, as in the article.
"""

import numpy as np
import tensorflow as tf

sizes = np.arange(500.0, 2751.0, 250.0)
prices = 0.2 * sizes

model = tf.keras.Sequential([tf.keras.Input(shape=(1,)), tf.keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
model.fit(sizes, prices, epochs=500, verbose=0)
prediction = model.predict(np.array([1800.0]), verbose=0)[0][0]
kernel, bias = model.get_weights()
print(f"keras: price = {kernel[0][0]:.4f} * size + {bias[0]:.4f}; 1800 sq ft -> {prediction:.2f}")
