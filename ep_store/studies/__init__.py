"""Causal studies: interventions, generation, fine-tuning, the refusal study."""
