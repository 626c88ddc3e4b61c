"""Plumbing: what every floor of the package uses and none of it is LoRMA: the bottom room.

- :mod:`~lorma.plumbing.errors`: the one-line error types (bad input is an ``InputError``: exit code 2).
- :mod:`~lorma.plumbing.fileio`: atomic writes, strict JSON, append-only logs, the advisory lock, a full disk as
  one error naming the file.
- :mod:`~lorma.plumbing.named_registry`: :class:`Registry`, the one way inflations, variants, methods and tasks
  are registered and found by name (each family's own registry lives with the family, e.g.
  ``lorma/variants/registry.py``).
- :mod:`~lorma.plumbing.quiet`: third-party noise, avoided or filtered around the call that makes it.
- :mod:`~lorma.plumbing.processes`: which process of a (distributed) run this is, from the environment.
- :mod:`~lorma.plumbing.sharding`: whole tensors from FSDP2 / ZeRO-3 shards for reads outside a forward.
- :mod:`~lorma.plumbing.callbacks`: the ``Trainer`` callback AdaLoRMA's (and AdaLoRA's) rank budget needs.

May import: nothing of lorma outside this folder (third-party libraries and the standard library only), so that
any module, from the math to the commands, can use it without a cycle.
"""
