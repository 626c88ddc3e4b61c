"""Benchmarks of LoRMA against peft's LoRA, OFT, BOFT, HRA and two reference orderings (``make bench``)."""
