"""The layers: what a LoRMA adapter wraps, one module per kind of wrapped layer (peft's LoRA keeps one file per
backend the same way, so a reader finds a layer type by its file name).

- :mod:`~lorma.layers.base`: :class:`LormaLayer`, the peft tuner layer every kind specialises: the adapters'
  parameters, the order they compose in, merge / unmerge, how the base weight is read (:class:`FloatWeight`).
- :mod:`~lorma.layers.linear`: ``nn.Linear`` and transformers' ``Conv1D``.
- :mod:`~lorma.layers.conv`: ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (the transform on the channels).
- :mod:`~lorma.layers.embedding`: ``nn.Embedding`` (on the embedding dimension), and the output layer tied to it.
- :mod:`~lorma.layers.experts`: 2-D / 3-D parameters (``target_parameters``: MoE experts, one transform each).
- :mod:`~lorma.layers.bnb`: bitsandbytes 4 / 8-bit bases (QLoRMA: only the weight object differs).
- :mod:`~lorma.layers.tying`: weights tied by identity: ties output layers to an adapted embedding, refuses
  unsafe merges.
- :mod:`~lorma.layers.mixed_batch`: one adapter per row of a batch (``adapter_names``): the per-layer forward every
  layer calls, and the model-wide hooks. Here, beside the layers, because the layers' forward calls it: in
  :mod:`lorma.export` it would make this room import the one above it.

May import: the core below it (:mod:`lorma.functional`, :mod:`lorma.inflations`, :mod:`lorma.variants`,
:mod:`lorma.config`) and :mod:`lorma.plumbing`; never :mod:`lorma.model`, :mod:`lorma.export` or a floor above
(``tests/test_package_layout.py`` checks the direction). Nothing is re-exported here: ``lorma.LormaLayer`` is the
public name.
"""
