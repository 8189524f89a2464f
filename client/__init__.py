"""fedtune's data-holder side: local data, the model factory, DP-SGD training and the Flower ClientApp."""

from fedtune.client.auto_classes import register_when_transformers_loads

# An exported mean-pooled model then loads with a plain `transformers.pipeline(...)` wherever fedtune is imported.
register_when_transformers_loads()
