"""Adapters for existing trainers: only this package knows a host's arguments and modules."""
