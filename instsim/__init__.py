"""instsim: learn which synthetic training images to make (Neural-Sim over Instant-NeRF renders)."""

__version__ = "0.1.0"
