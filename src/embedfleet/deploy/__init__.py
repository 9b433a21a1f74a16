"""``embedfleet deploy``: Compose, nginx and Kubernetes files generated from the config ``serve`` reads."""
