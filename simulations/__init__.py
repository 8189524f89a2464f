"""fedtune's local simulation: many data holders on one machine, composed from client and coordinator."""
