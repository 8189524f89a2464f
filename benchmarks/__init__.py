"""fedtune benchmarks: scripts that measure speed, memory, bytes and utility, and write JSON (see README.md)."""
