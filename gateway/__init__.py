"""The MechaMental Workspace Sync Gateway."""

__version__ = "0.1.0"
