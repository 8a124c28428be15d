"""M3D plugin (in progress)."""
