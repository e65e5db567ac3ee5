"""Wire formats of the Workspace Sync API: pure values and encoders, no I/O."""
