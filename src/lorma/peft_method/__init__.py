"""What peft is told about LoRMA: the ``PeftType.LORMA`` member (:mod:`~lorma.peft_method.peft_type`, the one
place that touches peft's closed enum) and the registration of the method with peft as soon as peft is imported
(:mod:`~lorma.peft_method.registration`, a post-import hook). Apart from lorma's own registries
(:mod:`lorma.plumbing.named_registry`): this is peft's mechanism, used once.

May import: :mod:`lorma.plumbing` only (the hook runs peft's import with bitsandbytes' notice dropped:
:func:`lorma.plumbing.quiet.known_noise_dropped`). ``LormaConfig`` imports the member from here; the classes to
register are handed to :func:`~lorma.peft_method.registration.register_when_peft_is_imported` by
``lorma/__init__``, so this room never imports the core above it.
"""
