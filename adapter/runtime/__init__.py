"""Sharded engines: the sharding driver (plan, split, write one artifact per rank), the
rank worker run by ``torchrun`` and the launcher around it."""
