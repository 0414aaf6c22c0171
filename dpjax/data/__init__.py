"""Input pipelines (Grain): group state-tracking tasks (``groups``, ``state_tracking``) and text."""
