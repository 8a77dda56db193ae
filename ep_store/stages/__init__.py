"""Pipeline stages: capture activations, harvest, build and assign dictionaries, engines, corpus readers."""
