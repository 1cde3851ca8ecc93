"""Glue between configs, data, backbones, methods and the training loop."""
