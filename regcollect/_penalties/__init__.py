"""Penalties: the Keras-small base class, each penalty with its kernels and step math."""
