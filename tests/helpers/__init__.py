"""Test scaffolding (not installed): a loopback Hub server and tiny models built from configs."""
