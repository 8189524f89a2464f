"""fedtune's coordinator: the Flower ServerApp that samples clients, aggregates, evaluates and exports."""
