"""fedtune's data-holder side: local data, the model factory, DP-SGD training and the Flower ClientApp."""
