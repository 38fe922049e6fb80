"""Runtime layer: trio tasks around the pure domain and the storage layer."""
