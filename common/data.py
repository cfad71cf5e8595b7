"""The XOR samples, and which client holds which rows.

Plain numpy, cheap to import: the client scripts load their rows from here
before TensorFlow is needed. Labels are one-hot: [1, 0] is 0, [0, 1] is 1.
"""

import numpy as np

# The truth table: inputs and one-hot labels ([1, 0] is 0, [0, 1] is 1).
XOR_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
XOR_LABELS = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.float32)

# Each client owns two rows of the truth table and never shares them.
CLIENT1_INPUTS = np.array([[0, 1], [0, 0]], dtype=np.float32)
CLIENT1_LABELS = np.array([[0, 1], [1, 0]], dtype=np.float32)
CLIENT2_INPUTS = np.array([[1, 0], [1, 1]], dtype=np.float32)
CLIENT2_LABELS = np.array([[0, 1], [1, 0]], dtype=np.float32)
