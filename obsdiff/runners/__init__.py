"""Process-level runners: data-parallel helpers and the Lightning Fabric launcher."""
