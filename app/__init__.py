"""Deskbridge: reach a desktop application's local socket API from the cloud."""

__version__ = "0.1.0"
