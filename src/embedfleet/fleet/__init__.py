"""The fleet: supervised worker instances, their models and persisted desired state, behind /admin."""
