"""Ignite handlers: thin adapters of dgst_monai's core to MONAI engines."""
