"""Meshes, logical-axis rules and sharded initialisation."""
