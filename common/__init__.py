"""Federated learning of Keras models whose weights are evolved by PyGAD.

The modules, from the wire up:

- ``protocol``: frames, message encoding, the allow-list decoder, errors.
- ``security``: the shared-secret handshake and TLS contexts.
- ``model``: the XOR model, a user's model file, weights <-> vector, model
  JSON checks.
- ``datasets``: a client's own data from CSV or .npz, fitted to the model;
  splits for simulations.
- ``training``: local GA training with a batched population fitness.
- ``aggregation``: FedAvg and friends, pure numpy.
- ``evaluation``: federated evaluation and the stopping rule, pure numpy.
- ``server``: the rounds (quorum, aggregation, evaluation, outputs);
  ``connections``: its thread per client; ``checkpoint``: atomic state for
  ``--resume``.
- ``client``: connect, train each round, reply, reconnect.
- ``config``: settings and command lines; ``data``: the XOR rows.
- ``progress``, ``report``, ``plotting``: what a person sees (progress bar,
  round lines and summary, history.png).
- ``loopback``: a whole federation on this machine (simulate.py);
  ``launcher``: start the scripts as processes and watch their output;
  ``simulation``: the rounds in one process, for convergence studies.

Importing this package is cheap: TensorFlow is imported (quietly, through
``quiet_tf``) only by ``model`` and ``training``, and only the code that
trains or evaluates imports those.
"""
