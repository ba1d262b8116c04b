"""Test scaffolding (not installed): a loopback Hub server, tiny models built from configs, the
in-process CLI runner, low-rank factor builders, and the bad-input corpus generator as a module."""
