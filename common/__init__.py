"""Federated learning of Keras models whose weights are evolved by PyGAD.

The modules, from the wire up:

- ``protocol``: frames, message encoding, the allow-list decoder, errors.
- ``model``: the XOR model, weights <-> vector, model JSON checks.
- ``training``: local GA training with a batched population fitness.
- ``aggregation``: FedAvg and friends, pure numpy.
- ``server`` and ``client``: the two ends of a federation.

Importing this package is cheap: TensorFlow is imported only by ``model`` and
``training``, and only the code that trains or evaluates imports those.
"""
